"""`Call`: a handle on one call that remembers the last state the server returned."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from callplane.client.convert import (
    SettingsLike,
    SortLike,
    dict_to_struct,
    to_member_requests,
    to_settings,
    to_sort_params,
    to_timestamp,
)
from callplane.client.custom import CustomData
from callplane.client.models import CallInfo, CallState, MemberInfo, MembersUpdate, QueryPage
from callplane.v1 import call_pb2, call_service_pb2

if TYPE_CHECKING:
    from callplane.client.client import CallplaneClient

__all__ = ["Call"]

MemberLike = Mapping[str, Any] | call_pb2.MemberRequest | str


class Call:
    """The call `type:id`. `get_or_create`, `get` and `update` refresh `data` and `members`;
    `end` and `delete` refresh `data`."""

    def __init__(self, client: CallplaneClient, call_type: str, call_id: str) -> None:
        self.client = client
        self.type = call_type
        self.id = call_id
        #: The call as last returned by the server (None before the first RPC).
        self.data: CallInfo | None = None
        #: Members as last returned by get_or_create/get/update (at most `members_limit`).
        self.members: list[MemberInfo] = []

    def __repr__(self) -> str:
        return f"Call({self.cid!r}, etag={self.etag!r})"

    @property
    def cid(self) -> str:
        """`type:id`."""
        return f"{self.type}:{self.id}"

    @property
    def etag(self) -> str | None:
        """The etag of the last state seen; pass it to `update(etag=...)` for optimistic concurrency."""
        return self.data.etag if self.data else None

    @property
    def custom(self) -> CustomData:
        """Custom data of the last state seen (empty before the first RPC)."""
        return self.data.custom if self.data else CustomData()

    def _keep(self, state: CallState) -> CallState:
        self.data = state.call
        self.members = list(state.members)
        return state

    async def get_or_create(
        self,
        *,
        created_by_id: str | None = None,
        members: Iterable[MemberLike] | None = None,
        custom: Mapping[str, Any] | Any | None = None,
        settings_override: SettingsLike | None = None,
        starts_at: _dt.datetime | None = None,
        team: str | None = None,
        members_limit: int | None = None,
    ) -> CallState:
        """Return the call, creating it with these values if it does not exist (`.created` says which)."""
        data = call_service_pb2.CallData(
            created_by_id=created_by_id or "",
            members=to_member_requests(members),
            custom=dict_to_struct(custom),
            settings_override=to_settings(settings_override, path="settings_override"),
            starts_at=to_timestamp(starts_at, path="starts_at"),
            team=team or "",
        )
        request = call_service_pb2.GetOrCreateCallRequest(
            type=self.type, id=self.id, data=data, members_limit=members_limit or 0
        )
        response = await self.client._rpc(self.client.call_service.GetOrCreateCall, request)
        return self._keep(CallState.from_proto(response, created=response.created))

    async def get(self, *, members_limit: int | None = None) -> CallState:
        """Fetch the call and up to `members_limit` members."""
        request = call_service_pb2.GetCallRequest(
            type=self.type, id=self.id, members_limit=members_limit or 0
        )
        response = await self.client._rpc(self.client.call_service.GetCall, request)
        return self._keep(CallState.from_proto(response))

    async def update(
        self,
        *,
        custom: Mapping[str, Any] | Any | None = None,
        set_custom: Mapping[str, Any] | None = None,
        unset_custom: Iterable[str] | None = None,
        settings_override: SettingsLike | None = None,
        starts_at: _dt.datetime | None = None,
        etag: str | None = None,
        members_limit: int | None = None,
    ) -> CallState:
        """Replace `custom`, or set/unset dotted custom paths; merge `settings_override`; move `starts_at`.

        With `etag` (e.g. ``etag=call.etag``) the update fails with ABORTED if the call changed since.
        """
        if isinstance(unset_custom, str):
            unset_custom = [unset_custom]
        request = call_service_pb2.UpdateCallRequest(
            type=self.type,
            id=self.id,
            custom=dict_to_struct(custom),
            set_custom=dict_to_struct(set_custom, path="set_custom"),
            unset_custom=list(unset_custom or ()),
            settings_override=to_settings(settings_override, path="settings_override"),
            starts_at=to_timestamp(starts_at, path="starts_at"),
            etag=etag or "",
            members_limit=members_limit or 0,
        )
        response = await self.client._rpc(self.client.call_service.UpdateCall, request)
        return self._keep(CallState.from_proto(response))

    async def end(self) -> CallInfo:
        """End the call (FAILED_PRECONDITION `CALL_ENDED` if it already ended)."""
        request = call_service_pb2.EndCallRequest(type=self.type, id=self.id)
        response = await self.client._rpc(self.client.call_service.EndCall, request)
        self.data = CallInfo.from_proto(response.call)
        return self.data

    async def delete(self, *, hard: bool = False) -> CallInfo:
        """Delete the call: soft by default, `hard` also frees the id. Returns the call as deleted."""
        request = call_service_pb2.DeleteCallRequest(type=self.type, id=self.id, hard=hard)
        response = await self.client._rpc(self.client.call_service.DeleteCall, request)
        self.data = CallInfo.from_proto(response.call)
        return self.data

    async def update_members(
        self,
        *,
        update_members: Iterable[MemberLike] | None = None,
        remove_members: Iterable[str] | None = None,
    ) -> MembersUpdate:
        """Add or update members (`{"user_id", "role", "custom"}`) and remove members by user id.

        Does not touch `self.members`; call `get()` to refresh.
        """
        if isinstance(remove_members, str):
            remove_members = [remove_members]
        request = call_service_pb2.UpdateCallMembersRequest(
            type=self.type,
            id=self.id,
            update_members=to_member_requests(update_members, path="update_members"),
            remove_members=list(remove_members or ()),
        )
        response = await self.client._rpc(self.client.call_service.UpdateCallMembers, request)
        return MembersUpdate(
            members=[MemberInfo.from_proto(m) for m in response.members],
            removed_user_ids=list(response.removed_user_ids),
            proto=response,
        )

    async def query_members(
        self,
        *,
        filter_conditions: Mapping[str, Any] | None = None,
        sort: Iterable[SortLike] | SortLike | None = None,
        limit: int | None = None,
        next: str | None = None,
        prev: str | None = None,
    ) -> QueryPage[MemberInfo]:
        """Find members of this call (filter on `user_id role created_at updated_at custom.*`)."""
        request = call_service_pb2.QueryMembersRequest(
            type=self.type,
            id=self.id,
            filter_conditions=dict_to_struct(filter_conditions, path="filter_conditions"),
            sort=to_sort_params(sort),
            limit=limit or 0,
            next=next or "",
            prev=prev or "",
        )
        response = await self.client._rpc(self.client.call_service.QueryMembers, request)
        return QueryPage(
            [MemberInfo.from_proto(m) for m in response.members],
            response.next or None,
            response.prev or None,
            response,
        )
