"""Conversions between plain Python values (dicts, datetimes, dataclasses) and the generated messages."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from callplane.client.custom import CustomData
from callplane.v1 import call_pb2, call_type_pb2, query_pb2, user_pb2, webhook_service_pb2

__all__ = [
    "MAX_SAFE_INTEGER",
    "dict_to_struct",
    "from_timestamp",
    "grants_to_dict",
    "settings_to_dict",
    "struct_to_dict",
    "to_delivery_status",
    "to_duration",
    "to_grants",
    "to_member_requests",
    "to_partial_updates",
    "to_plain",
    "to_settings",
    "to_sort_params",
    "to_timestamp",
    "to_user_requests",
]

#: Struct numbers are doubles: larger integers would silently lose precision, so they are refused.
MAX_SAFE_INTEGER = 2**53

SettingsLike = Mapping[str, Any] | call_type_pb2.CallSettings
SortLike = Mapping[str, Any] | query_pb2.SortParam | str


def to_plain(value: Any, *, path: str = "value") -> Any:
    """A JSON-compatible copy of `value`: dataclass instances become dicts, datetimes RFC 3339 strings."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"{path}: integer {value} exceeds 2**53 and would lose precision in a Struct")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value!r} is not a JSON number")
        return value
    if isinstance(value, enum.Enum):
        return to_plain(value.value, path=path)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"{path}: naive datetime {value!r}; pass a timezone-aware datetime")
        return value.isoformat()
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, CustomData):
        return value.to_dict()
    if isinstance(value, struct_pb2.Struct | struct_pb2.ListValue | struct_pb2.Value):
        return json_format.MessageToDict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: keys must be strings, got {type(key).__name__} {key!r}")
            out[key] = to_plain(item, path=f"{path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [to_plain(item, path=f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{path}: cannot store {type(value).__name__} {value!r} as JSON")


def dict_to_struct(data: Any, *, path: str = "custom") -> struct_pb2.Struct | None:
    """Struct from a dict / dataclass instance / Struct; None stays None (field left unset)."""
    if data is None:
        return None
    if isinstance(data, struct_pb2.Struct):
        return data
    plain = to_plain(data, path=path)
    if not isinstance(plain, dict):
        raise TypeError(f"{path}: expected a dict or dataclass instance, got {type(data).__name__}")
    struct = struct_pb2.Struct()
    struct.update(plain)
    return struct


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Plain dict from a Struct (numbers come back as floats)."""
    return json_format.MessageToDict(struct)


def to_timestamp(value: _dt.datetime | timestamp_pb2.Timestamp | None, *, path: str = "time") -> Any:
    """Timestamp from an aware datetime (naive datetimes are refused as ambiguous)."""
    if value is None or isinstance(value, timestamp_pb2.Timestamp):
        return value
    if not isinstance(value, _dt.datetime):
        raise TypeError(f"{path}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ValueError(f"{path}: naive datetime {value!r}; pass a timezone-aware datetime")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def from_timestamp(message: Message, field: str) -> _dt.datetime | None:
    """The aware UTC datetime in `message.field`, or None when unset."""
    if not message.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, field)
    return ts.ToDatetime(tzinfo=_dt.UTC)


def to_settings(
    settings: SettingsLike | None, *, path: str = "settings"
) -> call_type_pb2.CallSettings | None:
    """CallSettings from nested dicts (`{"audio": {"mic_default_on": True}}`) or a message."""
    if settings is None or isinstance(settings, call_type_pb2.CallSettings):
        return settings
    if not isinstance(settings, Mapping):
        raise TypeError(f"{path}: expected a dict or CallSettings, got {type(settings).__name__}")
    try:
        return json_format.ParseDict(dict(settings), call_type_pb2.CallSettings())
    except json_format.ParseError as exc:
        raise ValueError(f"{path}: {exc}") from None


def settings_to_dict(settings: call_type_pb2.CallSettings) -> dict[str, Any]:
    """Nested dict of the settings that are set (proto field names)."""
    return json_format.MessageToDict(settings, preserving_proto_field_name=True)


_DIRECTIONS: dict[Any, query_pb2.SortDirection.ValueType] = {
    1: query_pb2.SORT_DIRECTION_ASC,
    -1: query_pb2.SORT_DIRECTION_DESC,
    "asc": query_pb2.SORT_DIRECTION_ASC,
    "desc": query_pb2.SORT_DIRECTION_DESC,
    "ascending": query_pb2.SORT_DIRECTION_ASC,
    "descending": query_pb2.SORT_DIRECTION_DESC,
}
_SORT_TYPES: dict[str, query_pb2.SortType.ValueType] = {
    "string": query_pb2.SORT_TYPE_STRING,
    "str": query_pb2.SORT_TYPE_STRING,
    "number": query_pb2.SORT_TYPE_NUMBER,
    "float": query_pb2.SORT_TYPE_NUMBER,
    "int": query_pb2.SORT_TYPE_NUMBER,
    "boolean": query_pb2.SORT_TYPE_BOOLEAN,
    "bool": query_pb2.SORT_TYPE_BOOLEAN,
}


def _sort_param(item: SortLike, path: str) -> query_pb2.SortParam:
    if isinstance(item, query_pb2.SortParam):
        return item
    if isinstance(item, str):
        desc = item.startswith("-")
        return query_pb2.SortParam(
            field=item.lstrip("+-"),
            direction=query_pb2.SORT_DIRECTION_DESC if desc else query_pb2.SORT_DIRECTION_ASC,
        )
    if not isinstance(item, Mapping):
        raise TypeError(f"{path}: expected a dict, SortParam or 'field'/'-field', got {type(item).__name__}")
    unknown = set(item) - {"field", "direction", "type"}
    if unknown:
        raise TypeError(f"{path}: unknown keys {sorted(unknown)} (expected field, direction, type)")
    if not isinstance(item.get("field"), str):
        raise TypeError(f"{path}.field: expected a string")
    param = query_pb2.SortParam(field=item["field"])
    direction = item.get("direction")
    if direction is not None:
        if isinstance(direction, str):
            direction = direction.lower()
        if isinstance(direction, bool) or direction not in _DIRECTIONS:
            if isinstance(direction, int) and direction == query_pb2.SORT_DIRECTION_DESC:
                param.direction = query_pb2.SORT_DIRECTION_DESC  # the enum value (ASC is 1 already)
            else:
                raise ValueError(f"{path}.direction: expected 1, -1, 'asc' or 'desc', got {direction!r}")
        else:
            param.direction = _DIRECTIONS[direction]
    sort_type = item.get("type")
    if sort_type is not None:
        if isinstance(sort_type, str) and sort_type.lower() in _SORT_TYPES:
            param.type = _SORT_TYPES[sort_type.lower()]
        elif isinstance(sort_type, int) and sort_type in query_pb2.SortType.values():
            param.type = sort_type  # type: ignore[assignment]  # an int, but one of SortType's values
        else:
            raise ValueError(f"{path}.type: expected 'number', 'string' or 'boolean', got {sort_type!r}")
    return param


def to_sort_params(sort: Iterable[SortLike] | SortLike | None) -> list[query_pb2.SortParam]:
    """SortParams from dicts `{"field", "direction": 1|-1|"asc"|"desc", "type"}`, messages or "-field"."""
    if sort is None:
        return []
    if isinstance(sort, Mapping | str | query_pb2.SortParam):
        sort = [sort]
    return [_sort_param(item, f"sort[{i}]") for i, item in enumerate(sort)]


def _check_keys(item: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = set(item) - allowed
    if unknown:
        raise TypeError(f"{path}: unknown keys {sorted(unknown)} (expected {', '.join(sorted(allowed))})")


def to_member_requests(
    members: Iterable[Any] | None, *, path: str = "members"
) -> list[call_pb2.MemberRequest]:
    """MemberRequests from `{"user_id", "role", "custom"}` dicts, messages or plain user ids."""
    out: list[call_pb2.MemberRequest] = []
    for i, item in enumerate(members or ()):
        where = f"{path}[{i}]"
        if isinstance(item, call_pb2.MemberRequest):
            out.append(item)
        elif isinstance(item, str):
            out.append(call_pb2.MemberRequest(user_id=item))
        elif isinstance(item, Mapping):
            _check_keys(item, {"user_id", "role", "custom"}, where)
            out.append(
                call_pb2.MemberRequest(
                    user_id=item.get("user_id", ""),
                    role=item.get("role") or "",
                    custom=dict_to_struct(item.get("custom"), path=f"{where}.custom"),
                )
            )
        else:
            raise TypeError(f"{where}: expected a dict, MemberRequest or user id, got {type(item).__name__}")
    return out


def to_user_requests(users: Iterable[Any], *, path: str = "users") -> list[user_pb2.UserRequest]:
    """UserRequests from `{"id", "name", "image", "role", "teams", "custom"}` dicts or messages."""
    out: list[user_pb2.UserRequest] = []
    for i, item in enumerate(users):
        where = f"{path}[{i}]"
        if isinstance(item, user_pb2.UserRequest):
            out.append(item)
        elif isinstance(item, Mapping):
            _check_keys(item, {"id", "name", "image", "role", "teams", "custom"}, where)
            teams = item.get("teams") or []
            if isinstance(teams, str):
                raise TypeError(f"{where}.teams: expected a list of strings, got a string")
            out.append(
                user_pb2.UserRequest(
                    id=item.get("id", ""),
                    name=item.get("name") or "",
                    image=item.get("image") or "",
                    role=item.get("role") or "",
                    teams=list(teams),
                    custom=dict_to_struct(item.get("custom"), path=f"{where}.custom"),
                )
            )
        else:
            raise TypeError(f"{where}: expected a dict or UserRequest, got {type(item).__name__}")
    return out


def to_partial_updates(updates: Iterable[Any], *, path: str = "users") -> list[user_pb2.UserPartialUpdate]:
    """UserPartialUpdates from `{"id", "set": {path: value}, "unset": [path]}` dicts or messages."""
    out: list[user_pb2.UserPartialUpdate] = []
    for i, item in enumerate(updates):
        where = f"{path}[{i}]"
        if isinstance(item, user_pb2.UserPartialUpdate):
            out.append(item)
        elif isinstance(item, Mapping):
            _check_keys(item, {"id", "set", "unset"}, where)
            unset = item.get("unset") or []
            if isinstance(unset, str):
                raise TypeError(f"{where}.unset: expected a list of paths, got a string")
            out.append(
                user_pb2.UserPartialUpdate(
                    id=item.get("id", ""),
                    set=dict_to_struct(item.get("set"), path=f"{where}.set"),
                    unset=list(unset),
                )
            )
        else:
            raise TypeError(f"{where}: expected a dict or UserPartialUpdate, got {type(item).__name__}")
    return out


def to_grants(grants: Mapping[str, Iterable[str]] | None) -> dict[str, call_type_pb2.Capabilities] | None:
    """`{"user": ["join-call", ...]}` → role → Capabilities."""
    if grants is None:
        return None
    out: dict[str, call_type_pb2.Capabilities] = {}
    for role, caps in grants.items():
        if isinstance(caps, call_type_pb2.Capabilities):
            out[role] = caps
        elif isinstance(caps, str):
            raise TypeError(f"grants.{role}: expected a list of capability names, got a string")
        else:
            out[role] = call_type_pb2.Capabilities(capabilities=list(caps))
    return out


def grants_to_dict(grants: Mapping[str, call_type_pb2.Capabilities]) -> dict[str, list[str]]:
    """Role → capability names, roles sorted."""
    return {role: list(grants[role].capabilities) for role in sorted(grants)}


def to_duration(
    value: _dt.timedelta | float | duration_pb2.Duration | None, *, path: str = "duration"
) -> duration_pb2.Duration | None:
    """Duration from a timedelta or a number of seconds; None stays None (field left unset)."""
    if value is None or isinstance(value, duration_pb2.Duration):
        return value
    if isinstance(value, bool) or not isinstance(value, _dt.timedelta | int | float):
        raise TypeError(f"{path}: expected a timedelta or seconds, got {type(value).__name__}")
    if not isinstance(value, _dt.timedelta):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value!r} is not a number of seconds")
        value = _dt.timedelta(seconds=value)
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def to_delivery_status(
    status: str | int | None, *, path: str = "status"
) -> webhook_service_pb2.WebhookDeliveryStatus.ValueType:
    """`"pending"` / `"succeeded"` / `"failed"` (any case, or the full enum name, or its number) → the
    WebhookDeliveryStatus number; None → UNSPECIFIED (any status)."""
    if status is None:
        return webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_UNSPECIFIED
    if isinstance(status, int) and not isinstance(status, bool):
        return status  # type: ignore[return-value]  # passed through: the server checks it
    if not isinstance(status, str):
        raise TypeError(f"{path}: expected a status name, got {type(status).__name__}")
    name = status.upper()
    if not name.startswith("WEBHOOK_DELIVERY_STATUS_"):
        name = f"WEBHOOK_DELIVERY_STATUS_{name}"
    try:
        return webhook_service_pb2.WebhookDeliveryStatus.Value(name)
    except ValueError:
        raise ValueError(f"{path}: expected 'pending', 'succeeded' or 'failed', got {status!r}") from None
