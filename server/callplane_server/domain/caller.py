"""Who is calling: the RPC's principal with its user record."""

from __future__ import annotations

from dataclasses import dataclass

from callplane_server.auth.tokens import Principal
from callplane_server.domain.records import UserRecord


@dataclass(frozen=True)
class Caller:
    """The principal of this RPC with its user record (None for a server token)."""

    principal: Principal
    user: UserRecord | None

    @property
    def is_server(self) -> bool:
        return self.principal.is_server

    @property
    def user_id(self) -> str | None:
        return self.principal.user_id

    @property
    def is_admin(self) -> bool:
        return self.is_server or (self.user is not None and self.user.role == "admin")
