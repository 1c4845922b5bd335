"""Checks every request gets as it is decoded, before its handler runs, whatever the RPC.

NUL characters (U+0000) are refused in every string of a request, custom data (Struct keys and values)
included: PostgreSQL stores NUL in neither `text` nor `jsonb`, so without this check the same request
succeeded on SQLite and failed as INTERNAL on PostgreSQL. Refusing it on both keeps the backends alike."""

from __future__ import annotations

from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from callplane_server.errors import FieldViolation, InvalidArgument, ViolationCollector

_NUL = "\x00"
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_NUL_DESCRIPTION = "contains a NUL character (U+0000), which is not allowed"
_MAX_VIOLATIONS = 20


def nul_refusal(request: object) -> InvalidArgument | None:
    """The error naming every field (up to 20) of a decoded request that holds a NUL character, if any."""
    if not isinstance(request, Message):
        return None
    return ViolationCollector(nul_violations(request)).error(
        "request strings contain NUL characters (U+0000), which are not allowed"
    )


def nul_violations(message: Message) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    _walk(message, "", found)
    return found


def _path(prefix: str, name: str) -> str:
    name = name.replace(_NUL, "\\u0000")
    return f"{prefix}.{name}" if prefix else name


def _walk(message: Message, prefix: str, found: list[FieldViolation]) -> None:
    if isinstance(message, struct_pb2.Struct):
        for key, value in message.fields.items():
            path = _path(prefix, key)
            if _NUL in key:
                _add(found, path)
            _walk(value, path, found)
        return
    if isinstance(message, struct_pb2.Value):
        kind = message.WhichOneof("kind")
        if kind == "string_value":
            if _NUL in message.string_value:
                _add(found, prefix)
        elif kind == "struct_value":
            _walk(message.struct_value, prefix, found)
        elif kind == "list_value":
            _walk(message.list_value, prefix, found)
        return
    if isinstance(message, struct_pb2.ListValue):
        for index, item in enumerate(message.values):
            _walk(item, f"{prefix}[{index}]", found)
        return
    for field, value in message.ListFields():
        if field.type not in (_STRING, _MESSAGE):
            continue
        path = _path(prefix, field.name)
        entry = field.message_type if field.type == _MESSAGE else None
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                item_path = f"{path}[{key!r}]".replace(_NUL, "\\u0000")
                if isinstance(key, str) and _NUL in key:
                    _add(found, item_path)
                if value_field.type == _MESSAGE:
                    _walk(item, item_path, found)
                elif value_field.type == _STRING and _NUL in item:
                    _add(found, item_path)
        elif field.is_repeated:
            for index, item in enumerate(value):
                if field.type == _MESSAGE:
                    _walk(item, f"{path}[{index}]", found)
                elif _NUL in item:
                    _add(found, f"{path}[{index}]")
        elif field.type == _MESSAGE:
            _walk(value, path, found)
        elif _NUL in value:
            _add(found, path)


def _add(found: list[FieldViolation], path: str) -> None:
    if len(found) < _MAX_VIOLATIONS:
        found.append(FieldViolation(path, _NUL_DESCRIPTION))
