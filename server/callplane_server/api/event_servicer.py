"""EventService: the streaming RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message

from callplane.v1 import event_service_pb2, event_service_pb2_grpc
from callplane_server.messages import (
    call_message,
    duration_to_timedelta,
    member_message,
    pin_messages,
    session_message,
    set_timestamp,
)
from callplane_server.services.streams import (
    EventFilter,
    EventStreamService,
    Live,
    ProgressMark,
    Snapshot,
)
from callplane_server.store.events import StoredEvent

# Servicers never look at their context's message types (the generated base leaves them open too).
Context = grpc.aio.ServicerContext[Message, Message]


# The `event` field of each stream message: field number and wire type 2 (length-delimited).
_WATCH_CALL_EVENT = b"\x12"  # WatchCallResponse.event = 2
_EVENT_1 = b"\x0a"  # WatchUserResponse.event = 1, SubscribeEventsResponse.event = 1


def _event_frame(item: StoredEvent, tag: bytes) -> bytes:
    """The serialized stream message holding just this event (`oneof` with one field set is exactly
    tag + length + the event's bytes), built once per event however many subscribers get it."""
    frame = item.frames.get(tag)
    if frame is None:
        payload = item.event.SerializeToString()
        frame = item.frames[tag] = tag + _varint(len(payload)) + payload
    return frame


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _progress(mark: ProgressMark) -> event_service_pb2.Progress:
    message = event_service_pb2.Progress(seq=mark.seq)
    set_timestamp(message.at, mark.at)
    return message


async def _send_headers(context: Context) -> None:
    """For `Live`: the stream is up with nothing to send yet. The response headers go now (otherwise they
    go with the first message), so a client waiting for the stream to start need not wait for an event."""
    await context.send_initial_metadata(())


def _snapshot(state: Snapshot) -> event_service_pb2.CallSnapshot:
    message = event_service_pb2.CallSnapshot(
        seq=state.seq,
        call=call_message(state.view),
        members=[member_message(m) for m in state.view.members],
        pins=pin_messages(state.pins),
    )
    if state.session is not None:
        message.session.CopyFrom(session_message(state.session, state.participants, state.at))
    return message


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, service: EventStreamService) -> None:
        self._service = service

    # Also yields pre-serialized frames (bytes), which errors._passing_bytes sends as they are.
    async def WatchCall(  # type: ignore[override]
        self, request: event_service_pb2.WatchCallRequest, context: Context
    ) -> AsyncIterator[event_service_pb2.WatchCallResponse | bytes]:
        items = self._service.watch_call(
            request.type,
            request.id,
            snapshot=request.snapshot,
            after_seq=request.after_seq if request.HasField("after_seq") else None,
            participant_session_id=request.participant_session_id,
            progress_interval=duration_to_timedelta(request, "progress_interval", "progress_interval"),
        )
        async for item in items:
            if isinstance(item, StoredEvent):
                yield _event_frame(item, _WATCH_CALL_EVENT)
            elif isinstance(item, Snapshot):
                yield event_service_pb2.WatchCallResponse(snapshot=_snapshot(item))
            elif isinstance(item, ProgressMark):
                yield event_service_pb2.WatchCallResponse(progress=_progress(item))
            else:
                await _send_headers(context)

    # Also yields pre-serialized frames (bytes), which errors._passing_bytes sends as they are.
    async def WatchUser(  # type: ignore[override]
        self, request: event_service_pb2.WatchUserRequest, context: Context
    ) -> AsyncIterator[event_service_pb2.WatchUserResponse | bytes]:
        items = self._service.watch_user(
            request.user_id,
            after_seq=request.after_seq if request.HasField("after_seq") else None,
            progress_interval=duration_to_timedelta(request, "progress_interval", "progress_interval"),
        )
        async for item in items:
            if isinstance(item, StoredEvent):
                yield _event_frame(item, _EVENT_1)
            elif isinstance(item, ProgressMark):
                yield event_service_pb2.WatchUserResponse(progress=_progress(item))
            elif isinstance(item, Live):
                await _send_headers(context)

    # Also yields pre-serialized frames (bytes), which errors._passing_bytes sends as they are.
    async def SubscribeEvents(  # type: ignore[override]
        self, request: event_service_pb2.SubscribeEventsRequest, context: Context
    ) -> AsyncIterator[event_service_pb2.SubscribeEventsResponse | bytes]:
        filters = EventFilter(tuple(request.call_types), tuple(request.call_cids), tuple(request.event_types))
        items = self._service.subscribe(
            filters,
            after_position=request.after_position if request.HasField("after_position") else None,
            progress_interval=duration_to_timedelta(request, "progress_interval", "progress_interval"),
        )
        async for item in items:
            if isinstance(item, StoredEvent):
                yield _event_frame(item, _EVENT_1)
            elif isinstance(item, ProgressMark):
                yield event_service_pb2.SubscribeEventsResponse(progress=_progress(item))
            elif isinstance(item, Live):
                await _send_headers(context)
