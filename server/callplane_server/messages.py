"""Proto ↔ domain conversion shared by the API and the event log: Struct ↔ dict, Timestamp ↔ aware
datetime, Duration → timedelta, CallSettings ↔ dict, records → messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_type_pb2,
    query_pb2,
    session_pb2,
    session_service_pb2,
    user_pb2,
)
from callplane_server.domain.records import (
    CallTypeRecord,
    CallView,
    MemberInput,
    MemberRecord,
    PageRequest,
    ParticipantRecord,
    SessionRecord,
    SortDirection,
    SortInput,
    SortValueType,
    UserRecord,
)
from callplane_server.domain.validation import DEFAULT_PAGE_LIMIT, MAX_CUSTOM_DEPTH, TOO_DEEP
from callplane_server.errors import InvalidArgument

_DIRECTIONS: dict[int, SortDirection] = {
    query_pb2.SORT_DIRECTION_UNSPECIFIED: "asc",
    query_pb2.SORT_DIRECTION_ASC: "asc",
    query_pb2.SORT_DIRECTION_DESC: "desc",
}
_SORT_TYPES: dict[int, SortValueType | None] = {
    query_pb2.SORT_TYPE_UNSPECIFIED: None,
    query_pb2.SORT_TYPE_STRING: "string",
    query_pb2.SORT_TYPE_NUMBER: "number",
    query_pb2.SORT_TYPE_BOOLEAN: "boolean",
}

# The Query* requests: each has filter_conditions, sort, limit, next and prev.
PagedRequest = (
    user_pb2.QueryUsersRequest
    | call_service_pb2.QueryCallsRequest
    | call_service_pb2.QueryMembersRequest
    | session_service_pb2.QueryCallParticipantsRequest
    | session_service_pb2.QueryCallSessionsRequest
)


class _Rejected(Exception):
    """A value struct_to_dict refuses; `suffix` gathers the path below the field as it unwinds."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.suffix: list[str] = []


def struct_to_dict(value: struct_pb2.Struct, path: str) -> dict[str, Any]:
    """The Struct at request field `path` as a dict (numbers as floats, as json_format gives them).
    Non-finite numbers (no JSON for them) and nesting past MAX_CUSTOM_DEPTH are INVALID_ARGUMENT naming
    the place, e.g. `data.custom.score` or `filter_conditions.$or[1].custom.x`."""
    if not value.fields:
        return {}
    try:
        return _object(value, 1)
    except _Rejected as rejected:
        raise InvalidArgument.for_field(
            path + "".join(reversed(rejected.suffix)), rejected.description
        ) from None


def optional_struct(message: Message, field: str, path: str) -> dict[str, Any] | None:
    return struct_to_dict(getattr(message, field), path) if message.HasField(field) else None


def _object(struct: struct_pb2.Struct, depth: int) -> dict[str, Any]:
    if depth > MAX_CUSTOM_DEPTH:
        raise _Rejected(TOO_DEEP)
    result = {}
    for key, item in struct.fields.items():
        try:
            result[key] = _value(item, depth)
        except _Rejected as rejected:
            rejected.suffix.append(f".{key}")
            raise
    return result


def _list(values: struct_pb2.ListValue, depth: int) -> list[Any]:
    if depth > MAX_CUSTOM_DEPTH:
        raise _Rejected(TOO_DEEP)
    result = []
    for index, item in enumerate(values.values):
        try:
            result.append(_value(item, depth))
        except _Rejected as rejected:
            rejected.suffix.append(f"[{index}]")
            raise
    return result


def _value(item: struct_pb2.Value, depth: int) -> Any:
    kind = item.WhichOneof("kind")
    if kind == "string_value":
        return item.string_value
    if kind == "number_value":
        number = item.number_value
        if number - number != 0.0:  # NaN or ±Infinity
            raise _Rejected(f"must be a finite number, not {number}")
        return number
    if kind == "bool_value":
        return item.bool_value
    if kind == "struct_value":
        return _object(item.struct_value, depth + 1)
    if kind == "list_value":
        return _list(item.list_value, depth + 1)
    return None  # null_value, or no kind set (json_format reads that as null too)


def dict_to_struct(value: dict[str, Any] | None, target: struct_pb2.Struct) -> None:
    target.Clear()
    if value:
        target.update(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = int((datetime(1, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds())
_MAX_SECONDS = int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - _EPOCH).total_seconds())


def timestamp_to_datetime(message: Message, field: str, path: str) -> datetime | None:
    """The Timestamp `field` of `message` (request field `path`), None when unset; outside Timestamp's
    range (or nanos outside 0..999,999,999) it is INVALID_ARGUMENT naming `path`."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    if not 0 <= stamp.nanos <= 999_999_999:
        raise InvalidArgument.for_field(path, f"nanos must be 0..999999999, got {stamp.nanos}")
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS:
        raise InvalidArgument.for_field(
            path, f"seconds {stamp.seconds} is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z"
        )
    return stamp.ToDatetime(tzinfo=UTC)


# Duration's valid range: ±10,000 years (in seconds), as the Duration type's comment defines it.
_MAX_DURATION_SECONDS = 315_576_000_000


def duration_to_timedelta(message: Message, field: str, path: str) -> timedelta | None:
    """The Duration `field` of `message` (request field `path`), None when unset; outside Duration's range
    (seconds beyond ±315,576,000,000, nanos beyond ±999,999,999 or of the other sign) it is
    INVALID_ARGUMENT naming `path`. Nanoseconds are rounded away from zero to microseconds, so a duration
    keeps its sign (whether a negative one is allowed is the caller's rule)."""
    if not message.HasField(field):
        return None
    duration: duration_pb2.Duration = getattr(message, field)
    seconds, nanos = duration.seconds, duration.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument.for_field(
            path, f"nanos must be within ±999999999 and of the sign of seconds, got {seconds} s {nanos} ns"
        )
    if not -_MAX_DURATION_SECONDS <= seconds <= _MAX_DURATION_SECONDS:
        raise InvalidArgument.for_field(
            path, f"seconds {seconds} is outside ±{_MAX_DURATION_SECONDS} (10,000 years)"
        )
    micros = -(-nanos // 1_000) if nanos >= 0 else nanos // 1_000
    return timedelta(seconds=seconds, microseconds=micros)


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    # What Timestamp.FromDatetime does for an aware datetime, without its calendar round trip (several
    # timestamps per member, and a page of calls renders hundreds).
    if value is not None:
        since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
        target.seconds = since.days * 86_400 + since.seconds
        target.nanos = since.microseconds * 1_000


def settings_to_dict(settings: call_type_pb2.CallSettings) -> dict[str, Any]:
    return json_format.MessageToDict(settings, preserving_proto_field_name=True)


_SETTINGS_MEMO: dict[str, bytes] = {}
_SETTINGS_MEMO_SIZE = 1024


def dict_to_settings(value: dict[str, Any], target: call_type_pb2.CallSettings) -> None:
    # ParseDict costs ~0.3 ms per call rendered, and the same few settings recur across calls: keep
    # their serialized form, keyed by repr (complete for JSON-shaped data, and much cheaper than
    # canonical JSON; the same settings built in another key order only take a second entry).
    key = repr(value)
    serialized = _SETTINGS_MEMO.get(key)
    if serialized is None:
        message = call_type_pb2.CallSettings()
        json_format.ParseDict(value, message, ignore_unknown_fields=True)
        serialized = message.SerializeToString()
        if len(_SETTINGS_MEMO) >= _SETTINGS_MEMO_SIZE:
            _SETTINGS_MEMO.clear()
        _SETTINGS_MEMO[key] = serialized
    target.MergeFromString(serialized)


def grants_to_dict(grants: Any) -> dict[str, list[str]]:
    return {role: list(capabilities.capabilities) for role, capabilities in grants.items()}


def page_request(request: PagedRequest) -> PageRequest:
    sort = tuple(
        SortInput(
            field=param.field,
            # An unknown enum value is passed through so that the query compiler rejects it (INVALID_SORT):
            # a str that is deliberately no SortDirection, hence the ignore.
            direction=_DIRECTIONS.get(param.direction, f"unknown ({param.direction})"),  # type: ignore[arg-type]
            type=_SORT_TYPES.get(param.type),
        )
        for param in request.sort
    )
    return PageRequest(
        filter_conditions=optional_struct(request, "filter_conditions", "filter_conditions"),
        sort=sort,
        limit=request.limit or DEFAULT_PAGE_LIMIT,
        next=request.next,
        prev=request.prev,
    )


def member_inputs(members: Iterable[call_pb2.MemberRequest], path: str) -> list[MemberInput]:
    """The members of request field `path` (e.g. `update_members`)."""
    return [
        MemberInput(m.user_id, m.role, optional_struct(m, "custom", f"{path}[{index}].custom"))
        for index, m in enumerate(members)
    ]


def call_type_message(record: CallTypeRecord) -> call_type_pb2.CallType:
    message = call_type_pb2.CallType(name=record.name)
    dict_to_settings(record.settings, message.settings)
    for role, capabilities in record.grants.items():
        message.grants[role].capabilities.extend(capabilities)
    set_timestamp(message.created_at, record.created_at)
    set_timestamp(message.updated_at, record.updated_at)
    for index in record.custom_indexes:
        item = message.custom_indexes.add(
            spec=index.spec,
            name=index.name,
            state=_INDEX_STATES.get(index.state, call_type_pb2.CUSTOM_INDEX_STATE_UNSPECIFIED),
            error=index.error,
        )
        if index.build_seconds is not None:
            item.build_duration.FromTimedelta(timedelta(seconds=index.build_seconds))
        if index.writes_blocked_seconds is not None:
            item.writes_blocked.FromTimedelta(timedelta(seconds=index.writes_blocked_seconds))
    return message


_INDEX_STATES = {
    "BUILDING": call_type_pb2.CUSTOM_INDEX_STATE_BUILDING,
    "READY": call_type_pb2.CUSTOM_INDEX_STATE_READY,
    "FAILED": call_type_pb2.CUSTOM_INDEX_STATE_FAILED,
}


def user_message(record: UserRecord) -> user_pb2.User:
    message = user_pb2.User(
        id=record.id, name=record.name, image=record.image, role=record.role, teams=record.teams
    )
    dict_to_struct(record.custom, message.custom)
    set_timestamp(message.created_at, record.created_at)
    set_timestamp(message.updated_at, record.updated_at)
    return message


def member_message(record: MemberRecord) -> call_pb2.Member:
    message = call_pb2.Member(user_id=record.user_id, role=record.role)
    if record.user is not None:
        message.user.CopyFrom(user_message(record.user))
    dict_to_struct(record.custom, message.custom)
    set_timestamp(message.created_at, record.created_at)
    set_timestamp(message.updated_at, record.updated_at)
    return message


def call_message(view: CallView) -> call_pb2.Call:
    call = view.call
    message = call_pb2.Call(
        cid=call.cid,
        type=call.type,
        id=call.id,
        created_by_user_id=call.created_by_user_id or "",
        team=call.team or "",
        backstage=call.backstage,
        ongoing=call.ongoing,
        member_count=call.member_count,
        etag=call.etag,
        blocked_user_ids=call.blocked_user_ids,
    )
    dict_to_struct(call.custom, message.custom)
    dict_to_settings(view.settings, message.settings)
    dict_to_settings(call.settings_override, message.settings_override)
    set_timestamp(message.created_at, call.created_at)
    set_timestamp(message.updated_at, call.updated_at)
    set_timestamp(message.starts_at, call.starts_at)
    set_timestamp(message.ended_at, call.ended_at)
    return message


_TRACKS = {
    "audio": session_pb2.TRACK_TYPE_AUDIO,
    "video": session_pb2.TRACK_TYPE_VIDEO,
    "screen_share": session_pb2.TRACK_TYPE_SCREEN_SHARE,
    "screen_share_audio": session_pb2.TRACK_TYPE_SCREEN_SHARE_AUDIO,
}
TRACK_NAMES: dict[int, str] = {value: name for name, value in _TRACKS.items()}


def track_value(name: str) -> int:
    return _TRACKS[name]


def participant_message(record: ParticipantRecord, now: datetime | None = None) -> session_pb2.Participant:
    message = session_pb2.Participant(
        participant_session_id=record.participant_session_id,
        user_id=record.user_id,
        role=record.role,
        custom_etag=record.custom_etag,
        published_tracks=[_TRACKS[t] for t in record.published_tracks if t in _TRACKS],
    )
    dict_to_struct(record.custom, message.custom)
    set_timestamp(message.joined_at, record.joined_at)
    set_timestamp(message.left_at, record.left_at)
    end = record.left_at or now
    if end is not None:
        message.duration_seconds = max(0.0, (end - record.joined_at).total_seconds())
    if record.left_at is None:
        set_timestamp(message.lease_expires_at, record.lease_expires_at)
    return message


def session_message(
    record: SessionRecord, participants: Iterable[ParticipantRecord] = (), now: datetime | None = None
) -> session_pb2.CallSession:
    people = list(participants)
    message = session_pb2.CallSession(
        id=record.id,
        call_cid=record.call_cid,
        custom_etag=record.custom_etag,
        accepted_by=record.accepted_by,
        rejected_by=record.rejected_by,
        missed_by=record.missed_by,
        participants=[participant_message(p, now) for p in people],
        participant_count=sum(1 for p in people if p.left_at is None),
        end_reason=record.end_reason,
    )
    dict_to_struct(record.custom, message.custom)
    set_timestamp(message.started_at, record.started_at)
    set_timestamp(message.ended_at, record.ended_at)
    set_timestamp(message.timer_ends_at, record.timer_ends_at)
    return message


def pin_messages(pins: Iterable[dict[str, Any]]) -> list[session_pb2.Pin]:
    result = []
    for pin in pins:
        message = session_pb2.Pin(
            participant_session_id=pin["participant_session_id"], user_id=pin["user_id"]
        )
        set_timestamp(message.pinned_at, datetime.fromisoformat(pin["pinned_at"]))
        result.append(message)
    return result
