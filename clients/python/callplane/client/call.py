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
from callplane.client.models import (
    CallInfo,
    CallState,
    JoinInfo,
    MemberInfo,
    MembersUpdate,
    ParticipantInfo,
    ParticipantsPage,
    PinInfo,
    QueryPage,
    RingResult,
    SentEvent,
    SessionInfo,
    to_track,
)
from callplane.client.streams import EventStream, Reconnect, set_progress_interval
from callplane.v1 import (
    call_data_service_pb2,
    call_pb2,
    call_service_pb2,
    event_service_pb2,
    ring_service_pb2,
    session_pb2,
    session_service_pb2,
)

if TYPE_CHECKING:
    from callplane.client.client import CallplaneClient

__all__ = ["Call"]

MemberLike = Mapping[str, Any] | call_pb2.MemberRequest | str

_REJECT_REASONS = {
    "decline": ring_service_pb2.REJECT_REASON_DECLINE,
    "busy": ring_service_pb2.REJECT_REASON_BUSY,
    "cancel": ring_service_pb2.REJECT_REASON_CANCEL,
}
_MODES = {
    "replace": session_pb2.CUSTOM_DATA_MODE_REPLACE,
    "shallow-merge": session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
    "shallow_merge": session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
    "merge": session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
}


def _mode(mode: str) -> session_pb2.CustomDataMode.ValueType:
    try:
        return _MODES[mode.lower()]
    except KeyError:
        raise ValueError(f"mode must be 'replace' or 'shallow-merge', got {mode!r}") from None


def _strings(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return list(values)


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
        ring: bool = False,
        notify: bool = False,
        video: bool = False,
    ) -> CallState:
        """Return the call, creating it with these values if it does not exist (`.created` says which).

        When this request creates the call, `ring` rings the members (except the creator; `video` says
        whether it is a video call) and `notify` sends them `call.notification`."""
        data = call_service_pb2.CallData(
            created_by_id=created_by_id or "",
            members=to_member_requests(members),
            custom=dict_to_struct(custom),
            settings_override=to_settings(settings_override, path="settings_override"),
            starts_at=to_timestamp(starts_at, path="starts_at"),
            team=team or "",
        )
        request = call_service_pb2.GetOrCreateCallRequest(
            type=self.type,
            id=self.id,
            data=data,
            members_limit=members_limit or 0,
            ring=ring,
            notify=notify,
            video=video,
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

    # Sessions and participants

    async def join(
        self,
        user_id: str,
        *,
        participant_session_id: str | None = None,
        custom: Mapping[str, Any] | Any | None = None,
        create: bool = False,
        created_by_id: str | None = None,
        members: Iterable[MemberLike] | None = None,
        call_custom: Mapping[str, Any] | Any | None = None,
    ) -> JoinInfo:
        """Join the call's current session as `user_id` (starting one if none runs). The participant
        holds a lease: renew it with `keep_alive`, or hold it with ``watch(participant_session_id=...)``.
        With `create`, the call is created first if needed (with `created_by_id`, `members`,
        `call_custom`)."""
        data = None
        if create:
            data = call_service_pb2.CallData(
                created_by_id=created_by_id or "",
                members=to_member_requests(members),
                custom=dict_to_struct(call_custom),
            )
        request = session_service_pb2.JoinCallRequest(
            type=self.type,
            id=self.id,
            user_id=user_id,
            participant_session_id=participant_session_id or "",
            custom=dict_to_struct(custom),
            create=create,
            data=data,
        )
        response = await self.client._rpc(self.client.session_service.JoinCall, request)
        joined = JoinInfo.from_proto(response)
        self.data = joined.call
        return joined

    async def leave(self, participant_session_id: str) -> None:
        """Leave the session (the participant's connection `participant_session_id`)."""
        request = session_service_pb2.LeaveCallRequest(
            type=self.type, id=self.id, participant_session_id=participant_session_id
        )
        await self.client._rpc(self.client.session_service.LeaveCall, request)

    async def keep_alive(self, participant_session_id: str) -> ParticipantInfo:
        """Renew a participant's lease; returns it with the new `lease_expires_at`."""
        request = session_service_pb2.KeepAliveRequest(
            type=self.type, id=self.id, participant_session_id=participant_session_id
        )
        response = await self.client._rpc(self.client.session_service.KeepAlive, request)
        return ParticipantInfo.from_proto(response.participant)

    async def update_participant(
        self, participant_session_id: str, *, published_tracks: Iterable[str | int]
    ) -> ParticipantInfo:
        """Report the tracks a participant publishes now (`"audio"`, `"video"`, `"screen_share"`,
        `"screen_share_audio"`); replaces the list."""
        request = session_service_pb2.UpdateParticipantRequest(
            type=self.type,
            id=self.id,
            participant_session_id=participant_session_id,
            published_tracks=[to_track(t) for t in published_tracks],
        )
        response = await self.client._rpc(self.client.session_service.UpdateParticipant, request)
        return ParticipantInfo.from_proto(response.participant)

    async def query_participants(
        self,
        *,
        filter_conditions: Mapping[str, Any] | None = None,
        sort: Iterable[SortLike] | SortLike | None = None,
        limit: int | None = None,
        next: str | None = None,
        prev: str | None = None,
    ) -> ParticipantsPage:
        """Live participants (filter on `user_id role published_tracks custom.*`), with the session's
        total count and counts by role."""
        request = session_service_pb2.QueryCallParticipantsRequest(
            type=self.type,
            id=self.id,
            filter_conditions=dict_to_struct(filter_conditions, path="filter_conditions"),
            sort=to_sort_params(sort),
            limit=limit or 0,
            next=next or "",
            prev=prev or "",
        )
        response = await self.client._rpc(self.client.session_service.QueryCallParticipants, request)
        return ParticipantsPage(
            [ParticipantInfo.from_proto(p) for p in response.participants],
            response.next or None,
            response.prev or None,
            response,
            total_participants=response.total_participants,
            participants_by_role=dict(response.participants_by_role),
            session_id=response.session_id,
        )

    async def query_sessions(
        self,
        *,
        filter_conditions: Mapping[str, Any] | None = None,
        sort: Iterable[SortLike] | SortLike | None = None,
        limit: int | None = None,
        next: str | None = None,
        prev: str | None = None,
    ) -> QueryPage[SessionInfo]:
        """Session history, newest first (filter on `id started_at ended_at custom.*`)."""
        request = session_service_pb2.QueryCallSessionsRequest(
            type=self.type,
            id=self.id,
            filter_conditions=dict_to_struct(filter_conditions, path="filter_conditions"),
            sort=to_sort_params(sort),
            limit=limit or 0,
            next=next or "",
            prev=prev or "",
        )
        response = await self.client._rpc(self.client.session_service.QueryCallSessions, request)
        return QueryPage(
            [SessionInfo.from_proto(s) for s in response.sessions],
            response.next or None,
            response.prev or None,
            response,
        )

    async def go_live(self) -> CallInfo:
        """Take a backstage call live."""
        request = session_service_pb2.GoLiveRequest(type=self.type, id=self.id)
        response = await self.client._rpc(self.client.session_service.GoLive, request)
        self.data = CallInfo.from_proto(response.call)
        return self.data

    async def stop_live(self) -> CallInfo:
        """Put a live call back into backstage."""
        request = session_service_pb2.StopLiveRequest(type=self.type, id=self.id)
        response = await self.client._rpc(self.client.session_service.StopLive, request)
        self.data = CallInfo.from_proto(response.call)
        return self.data

    # Ringing

    async def ring(
        self, user_id: str, *, members_ids: Iterable[str] | None = None, video: bool = False
    ) -> RingResult:
        """Ring members as `user_id` (at most 25; default: every member not in the call but the caller)."""
        request = ring_service_pb2.RingCallRequest(
            type=self.type, id=self.id, user_id=user_id, members_ids=_strings(members_ids), video=video
        )
        response = await self.client._rpc(self.client.ring_service.RingCall, request)
        self.data = CallInfo.from_proto(response.call)
        return RingResult(list(response.members_ids), self.data, response)

    async def accept(self, user_id: str) -> None:
        """`user_id` accepts the ring."""
        request = ring_service_pb2.AcceptCallRequest(type=self.type, id=self.id, user_id=user_id)
        await self.client._rpc(self.client.ring_service.AcceptCall, request)

    async def reject(self, user_id: str, *, reason: str = "decline") -> None:
        """`user_id` rejects the ring: `"decline"` or `"busy"` (a callee), `"cancel"` (the caller)."""
        try:
            code = _REJECT_REASONS[reason.lower()]
        except KeyError:
            raise ValueError(f"reason must be one of {sorted(_REJECT_REASONS)}, got {reason!r}") from None
        request = ring_service_pb2.RejectCallRequest(type=self.type, id=self.id, user_id=user_id, reason=code)
        await self.client._rpc(self.client.ring_service.RejectCall, request)

    # Custom data, custom events, pins

    async def update_participant_custom(
        self,
        participant_session_id: str,
        user_id: str,
        custom: Mapping[str, Any] | Any | None = None,
        *,
        mode: str = "replace",
        keys_to_delete: Iterable[str] | None = None,
        etag: str | None = None,
    ) -> ParticipantInfo:
        """Change your own participant custom data: `mode="replace"` or `"shallow-merge"` (with
        `keys_to_delete`); with `etag` it applies only if unchanged since (else ABORTED)."""
        request = call_data_service_pb2.UpdateParticipantCustomRequest(
            type=self.type,
            id=self.id,
            participant_session_id=participant_session_id,
            user_id=user_id,
            mode=_mode(mode),
            custom=dict_to_struct(custom),
            keys_to_delete=_strings(keys_to_delete),
            etag=etag or "",
        )
        response = await self.client._rpc(self.client.call_data_service.UpdateParticipantCustom, request)
        return ParticipantInfo.from_proto(response.participant)

    async def update_session_custom(
        self,
        user_id: str,
        custom: Mapping[str, Any] | Any | None = None,
        *,
        mode: str = "replace",
        keys_to_delete: Iterable[str] | None = None,
        etag: str | None = None,
    ) -> SessionInfo:
        """Change the running session's custom data as participant `user_id` (modes and `etag` as in
        `update_participant_custom`)."""
        request = call_data_service_pb2.UpdateSessionCustomRequest(
            type=self.type,
            id=self.id,
            user_id=user_id,
            mode=_mode(mode),
            custom=dict_to_struct(custom),
            keys_to_delete=_strings(keys_to_delete),
            etag=etag or "",
        )
        response = await self.client._rpc(self.client.call_data_service.UpdateSessionCustom, request)
        return SessionInfo.from_proto(response.session)

    async def send_event(
        self,
        user_id: str,
        custom: Mapping[str, Any] | Any,
        *,
        to_user_ids: Iterable[str] | None = None,
        to_roles: Iterable[str] | None = None,
        request_id: str | None = None,
    ) -> SentEvent:
        """Send a `custom` event from `user_id` to everyone, or to users / roles. With `request_id`,
        a retry returns the first result (`duplicate=True`) and sends nothing again."""
        request = call_data_service_pb2.SendCallEventRequest(
            type=self.type,
            id=self.id,
            user_id=user_id,
            custom=dict_to_struct(custom),
            to_user_ids=_strings(to_user_ids),
            to_roles=_strings(to_roles),
            request_id=request_id or "",
        )
        response = await self.client._rpc(self.client.call_data_service.SendCallEvent, request)
        return SentEvent(response.seq, response.duplicate, response)

    async def pin(self, participant_session_id: str, user_id: str) -> list[PinInfo]:
        """Pin a participant for everyone; returns the pins in order."""
        request = call_data_service_pb2.PinParticipantRequest(
            type=self.type, id=self.id, participant_session_id=participant_session_id, user_id=user_id
        )
        response = await self.client._rpc(self.client.call_data_service.PinParticipant, request)
        return [PinInfo.from_proto(p) for p in response.pins]

    async def unpin(self, participant_session_id: str, user_id: str) -> list[PinInfo]:
        """Remove a pin; returns the pins in order."""
        request = call_data_service_pb2.UnpinParticipantRequest(
            type=self.type, id=self.id, participant_session_id=participant_session_id, user_id=user_id
        )
        response = await self.client._rpc(self.client.call_data_service.UnpinParticipant, request)
        return [PinInfo.from_proto(p) for p in response.pins]

    # Events

    def watch(
        self,
        *,
        snapshot: bool = False,
        after_seq: int | None = None,
        participant_session_id: str | None = None,
        progress_interval: float | None = None,
        include_progress: bool = True,
        reconnect: Reconnect | None = None,
    ) -> EventStream:
        """Follow this call: ``async for message in call.watch(snapshot=True)`` yields a
        `CallSnapshotMessage` first (with `snapshot`), then an `EventMessage` per event. With `after_seq`
        it starts exactly after that seq (0: from the first retained event); with neither, from now on,
        and its first message is a `ProgressMessage` saying where "now" is.

        With `progress_interval` (seconds; the server raises it to its minimum, 1 s by default) an idle
        stream also gets a `ProgressMessage` after each interval without a message, which advances the
        resume point; without, an idle stream receives nothing. `include_progress=False` keeps progress
        messages out of the iteration (they still advance the resume point).

        A dropped connection is resumed transparently after the last seq seen (no gap, no duplicate);
        see `Reconnect`. With `participant_session_id` the stream holds that participant's presence.
        """
        if snapshot and after_seq is not None:
            raise ValueError("give snapshot or after_seq, not both")
        stub = self.client.event_service

        def make_request(cursor: int | None) -> event_service_pb2.WatchCallRequest:
            request = event_service_pb2.WatchCallRequest(
                type=self.type, id=self.id, participant_session_id=participant_session_id or ""
            )
            if cursor is not None:
                request.after_seq = cursor
            elif snapshot:
                request.snapshot = True
            set_progress_interval(request, progress_interval)
            return request

        return EventStream(
            self.client,
            stub.WatchCall,
            make_request,
            lambda event: event.seq,
            cursor=after_seq,
            reconnect=reconnect or self.client.reconnect,
            include_progress=include_progress,
        )
