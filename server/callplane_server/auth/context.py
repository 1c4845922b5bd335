"""The principal of the RPC being served. Set once per RPC by the API layer before the servicer runs;
services read it where a rule depends on who is calling."""

from __future__ import annotations

from contextvars import ContextVar

from callplane_server.auth.tokens import SERVER, Principal

_current: ContextVar[Principal] = ContextVar("callplane_principal", default=SERVER)


def current_principal() -> Principal:
    """Internal work (timers, the tailer) runs with the server's authority."""
    return _current.get()


def set_principal(principal: Principal) -> None:
    _current.set(principal)
