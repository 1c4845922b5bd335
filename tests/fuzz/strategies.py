"""Hypothesis strategies for hostile Callplane requests, built from the protobuf descriptors field by field,
so a new RPC, message or field is fuzzed without touching this file.

Values mix plausible ones (names from a `World` of real call types, calls, users, participants and real
pagination cursors, so requests get past the first checks) with hostile ones: NaN and ±Infinity in
Structs, huge and deep values, astral / right-to-left / zero-width Unicode, NUL characters, keys and
operators that look like injections, tampered cursors and out-of-range timestamps and durations."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import duration_pb2, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import reject
from hypothesis import strategies as st

FieldDescriptor = _descriptor.FieldDescriptor

# -- text ------------------------------------------------------------------------------------------------

ASTRAL = ["𝕏", "😀", "👩‍👩‍👧‍👦", "𓀀", "\U0010fffd", "\U0001f1fa\U0001f1f8", "𠜎"]
RTL = ["\u202e", "\u200f", "\u061c", "مرحبا", "שלום", "\u202egnp.exe"]
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\u00ad"]
CONTROL = ["\x00", "\x00\x00", "a\x00b", "\x1b[31m", "\r\n", "\t", "\x7f", "\u2028", "\ufffd"]
INJECTION = [
    "$where",
    "$regex",
    "$function",
    "$expr",
    "$gt",
    "$ne",
    "$in",
    "$exists",
    "$and",
    "$or",
    "$nor",
    "$not",
    "$autocomplete",
    "$q",
    "'; DROP TABLE calls; --",
    '"; DROP TABLE users; --',
    "' OR '1'='1",
    "1) OR (1=1",
    "custom.__proto__",
    "__proto__",
    "constructor.prototype",
    "custom.constructor",
    "custom.$where",
    "custom..x",
    "custom.",
    ".custom",
    "custom.a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z",
    "custom.' || 1 --",
    'custom."x"',
    "custom.x[0]",
    "custom.*",
    "custom.$.x",
    "json_extract(custom, '$.x')",
    "custom->>'x'",
    "%",
    "_",
    "%%",
    "\\",
    "\\x00",
    "..",
    "../../etc/passwd",
    "${jndi:ldap://127.0.0.1/x}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "null",
    "NaN",
    "Infinity",
    "-0",
    "1e309",
    "true",
    "{}",
    "[]",
    ":",
    "default:",
    ":x",
    "a:b:c",
    "*",
    "",
    " ",
]
HUGE_SIZES = [65, 129, 257, 1025, 4097, 65_537, 1_000_001]

# Stream's filter fields and operators plus made-up ones, for filter_conditions-like Structs.
FILTER_FIELDS = [
    "id",
    "cid",
    "type",
    "team",
    "teams",
    "created_by_user_id",
    "created_at",
    "updated_at",
    "ended_at",
    "starts_at",
    "backstage",
    "members",
    "ongoing",
    "user_id",
    "role",
    "name",
    "custom.color",
    "custom.n",
    "custom.a.b",
    "custom",
    "nope",
]
OPERATORS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$autocomplete", "$q"]
COMBINATORS = ["$and", "$or", "$nor"]


def _pieces() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(ASTRAL + RTL + ZERO_WIDTH + CONTROL + INJECTION),
        st.text(max_size=8),  # surrogate-free by default
        st.text(alphabet=string.ascii_letters + string.digits + "-_.:", max_size=8),
    )


def hostile_text() -> st.SearchStrategy[str]:
    """Strings a client should never send, and some it may: never a surrogate (protobuf can't encode one)."""
    return st.one_of(
        st.sampled_from(INJECTION),
        st.text(max_size=24),
        st.lists(_pieces(), min_size=1, max_size=5).map("".join),
        st.builds(
            lambda c, n: c * n,
            st.sampled_from(["x", "é", "😀", "\x00", "\u200b"]),
            st.sampled_from(HUGE_SIZES),
        ),
    )


# -- numbers ----------------------------------------------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from([*NON_FINITE, 0.0, -0.0, 1e308, -1e308, 2.0**53 + 1, 5e-324]),
        st.floats(allow_nan=True, allow_infinity=True),
    )


def integers(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({low, high, 0, 1, -1 if signed else 1, 24, 25, 26, 99, 100, 101, 1000, 5000, 180_001})
    edges = [e for e in edges if low <= e <= high]
    return st.one_of(
        st.sampled_from(edges), st.integers(low, high), st.integers(-2, 300).filter(lambda v: low <= v)
    )


# -- Struct / Value ---------------------------------------------------------------------------------------


def struct_keys(extra: Sequence[str] = ()) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*INJECTION, *FILTER_FIELDS, *OPERATORS, *COMBINATORS, *extra]), hostile_text()
    )


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), doubles(), hostile_text())
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(struct_keys(), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def deep(depth: int, leaf: Any, key: str = "a", through_lists: bool = False) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if through_lists and level % 2 else {key: value}
    return value


def filter_documents() -> st.SearchStrategy[dict[str, Any]]:
    """Mongo-style filters: right and wrong fields, operators and operands."""
    operand = st.one_of(json_values(6), st.lists(json_values(2), max_size=3))
    condition = st.one_of(
        operand,
        st.dictionaries(
            st.one_of(st.sampled_from(OPERATORS), struct_keys()), operand, min_size=1, max_size=2
        ),
    )
    clause = st.dictionaries(st.one_of(st.sampled_from(FILTER_FIELDS), struct_keys()), condition, max_size=3)
    return st.recursive(
        clause,
        lambda inner: st.dictionaries(st.sampled_from(COMBINATORS), st.lists(inner, max_size=3), max_size=1),
        max_leaves=6,
    )


def struct_documents(filter_like: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    documents: list[st.SearchStrategy[dict[str, Any]]] = [
        st.dictionaries(struct_keys(), json_values(), max_size=5),
        st.builds(
            lambda depth, leaf, lists: {"deep": deep(depth, leaf, through_lists=lists)},
            st.integers(1, 40),  # 3 message levels each: from ~34 on, past protobuf's limit of 100
            st.one_of(doubles(), hostile_text()),
            st.booleans(),
        ),
        st.builds(lambda size: {"big": "x" * size}, st.sampled_from(HUGE_SIZES)),
        st.builds(lambda n: {f"k{i}": i for i in range(n)}, st.sampled_from([100, 1000, 5000])),
    ]
    if filter_like:
        documents.insert(0, filter_documents())
    return st.one_of(documents)


def struct_message(document: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(document)
    return message


def value_message(value: Any) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    result = struct_pb2.Value()
    result.CopyFrom(holder.fields["v"])
    return result


# -- time -------------------------------------------------------------------------------------------------

MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    seconds = st.one_of(
        st.sampled_from([MIN_SECONDS - 1, MIN_SECONDS, 0, -1, 1_767_225_600, MAX_SECONDS, MAX_SECONDS + 1]),
        st.sampled_from([2**63 - 1, -(2**63)]),
        st.integers(MIN_SECONDS, MAX_SECONDS),
    )
    nanos = st.one_of(
        st.sampled_from([0, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31)]), st.integers(0, 10**9 - 1)
    )
    return st.builds(lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n), seconds, nanos)


def durations() -> st.SearchStrategy[duration_pb2.Duration]:
    seconds = st.one_of(
        st.sampled_from([0, -1, 1, 5, 900, 315_576_000_000, 315_576_000_001, 2**63 - 1, -(2**63)]),
        st.integers(-(10**6), 10**6),
    )
    nanos = st.one_of(
        st.sampled_from([0, 999_999_999, 10**9, -1, 2**31 - 1, -(2**31)]), st.integers(0, 10**9 - 1)
    )
    return st.builds(lambda s, n: duration_pb2.Duration(seconds=s, nanos=n), seconds, nanos)


# -- the world the requests refer to ----------------------------------------------------------------------


@dataclass
class World:
    """Real names (created by the test's setup) that fuzzed requests pick from part of the time."""

    call_types: list[str] = field(
        default_factory=lambda: ["default", "audio_room", "livestream", "development"]
    )
    call_ids: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    participant_session_ids: list[str] = field(default_factory=list)
    cursors: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=lambda: ["user", "moderator", "host", "admin", "call_member"])
    capabilities: list[str] = field(
        default_factory=lambda: ["read-call", "update-call", "send-audio", "screenshare", "mute-users"]
    )
    event_types: list[str] = field(default_factory=lambda: ["custom", "call.created", "call.updated"])
    request_ids: list[str] = field(default_factory=lambda: ["fz-request-1", "fz-request-2"])

    @property
    def cids(self) -> list[str]:
        return [f"{t}:{i}" for t in self.call_types[:1] for i in self.call_ids]

    def names_for(self, field_name: str) -> list[str]:
        """Plausible values for a string field, guessed from its name."""
        name = field_name.lower()
        picks: list[str] = []
        if name in ("next", "prev") or "cursor" in name or "token" in name:
            picks += self.cursors
        if "participant_session" in name:
            picks += self.participant_session_ids
        if "user" in name or "member" in name or name in ("id", "ids", "created_by"):
            picks += self.user_ids
        if name in ("id", "call_id", "ids"):
            picks += self.call_ids
        if name in ("type", "call_type", "call_types", "name"):
            picks += self.call_types
        if "cid" in name:
            picks += self.cids
        if "role" in name:
            picks += self.roles
        if "capabilit" in name or "permission" in name or name in ("granted", "revoked"):
            picks += self.capabilities
        if "event_type" in name or name == "kind":
            picks += self.event_types
        if name == "request_id":
            picks += self.request_ids
        if name in ("field", "sort_field"):
            picks += FILTER_FIELDS
        if name == "direction":
            picks += ["asc", "desc", "ASC", "-1", "1"]
        if name == "reason":
            picks += ["decline", "busy", "timeout", "cancel"]
        if name in ("track", "tracks", "published_tracks"):
            picks += ["audio", "video", "screenshare"]
        return picks


def tampered(cursor: str) -> st.SearchStrategy[str]:
    """A real cursor with a byte flipped, cut, doubled or spliced."""
    if not cursor:
        return st.just(cursor)
    index = st.integers(0, len(cursor) - 1)
    alphabet = string.ascii_letters + string.digits + "-_=+/.\x00é"
    return st.one_of(
        st.builds(lambda i, c: cursor[:i] + c + cursor[i + 1 :], index, st.sampled_from(alphabet)),
        st.builds(lambda i: cursor[:i], index),
        st.builds(lambda i: cursor[i:], index),
        st.just(cursor + cursor),
        st.just(cursor + "="),
        st.just(cursor[::-1]),
        st.just(cursor.upper()),
    )


def strings_for(world: World, field_name: str) -> st.SearchStrategy[str]:
    names = world.names_for(field_name)
    options: list[st.SearchStrategy[str]] = [hostile_text()]
    if names:
        options.insert(0, st.sampled_from(names))
        options.insert(0, st.sampled_from(names))  # twice: plausible values get deeper into the handlers
    if field_name.lower() in ("next", "prev") or "cursor" in field_name.lower():
        options += [tampered(c) for c in world.cursors[:6]]
    return st.one_of(options)


# -- messages from descriptors ----------------------------------------------------------------------------

_SCALAR_BITS = {
    FieldDescriptor.TYPE_INT32: (32, True),
    FieldDescriptor.TYPE_SINT32: (32, True),
    FieldDescriptor.TYPE_SFIXED32: (32, True),
    FieldDescriptor.TYPE_INT64: (64, True),
    FieldDescriptor.TYPE_SINT64: (64, True),
    FieldDescriptor.TYPE_SFIXED64: (64, True),
    FieldDescriptor.TYPE_UINT32: (32, False),
    FieldDescriptor.TYPE_FIXED32: (32, False),
    FieldDescriptor.TYPE_UINT64: (64, False),
    FieldDescriptor.TYPE_FIXED64: (64, False),
}
MAX_MESSAGE_DEPTH = 4


def message_class(descriptor: _descriptor.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _scalar(world: World, fd: FieldDescriptor, tame: bool = False) -> st.SearchStrategy[Any]:
    kind = fd.type
    if tame:
        return _tame_scalar(world, fd)
    if kind in _SCALAR_BITS:
        return integers(*_SCALAR_BITS[kind])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        values = doubles()
        if kind == FieldDescriptor.TYPE_FLOAT:
            values = st.one_of(st.sampled_from(NON_FINITE), st.floats(width=32, allow_nan=True))
        return values
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return strings_for(world, fd.name)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), integers(32, True))  # proto3 enums are open
    raise AssertionError(f"unhandled field type {kind} of {fd.full_name}")


def _message_value(
    world: World, descriptor: _descriptor.Descriptor, field_name: str, depth: int, tame: bool = False
) -> st.SearchStrategy[Any]:
    """A message for a field, except for Structs: their document (a dict), set with Struct.update, because
    copying a Struct deeper than protobuf's parse limit into its field fails (upb copies by parsing)."""
    name = descriptor.full_name
    if tame and name in _TAME_WELL_KNOWN:
        return _TAME_WELL_KNOWN[name](field_name)
    if name == "google.protobuf.Struct":
        return struct_documents(filter_like="filter" in field_name)
    if name == "google.protobuf.Value":
        return json_values().map(value_message)
    if name == "google.protobuf.ListValue":
        return st.lists(json_values(4), max_size=4).map(lambda items: value_message(items).list_value)
    if name == "google.protobuf.Timestamp":
        return timestamps()
    if name == "google.protobuf.Duration":
        return durations()
    return messages(world, descriptor, depth + 1, tame)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _is_repeated(fd: FieldDescriptor) -> bool:
    return fd.is_repeated


def _field_values(world: World, fd: FieldDescriptor, depth: int, tame: bool) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return _message_value(world, fd.message_type, fd.name, depth, tame)
    return _scalar(world, fd, tame)


@st.composite
def messages(
    draw: st.DrawFn,
    world: World,
    descriptor: _descriptor.Descriptor,
    depth: int = 0,
    tame: bool | None = None,
) -> Message:
    """A message of `descriptor`'s type with a random subset of its fields set to drawn values: hostile
    ones, or (`tame`, half of the requests) plausible ones, which get further into the handlers and so
    find rules that give way only to a well-formed request."""
    if tame is None:
        tame = draw(st.booleans())
    message = message_class(descriptor)()
    if depth > MAX_MESSAGE_DEPTH:
        return message
    chosen_oneof: dict[str, str | None] = {}
    for oneof in descriptor.oneofs:
        if oneof.name.startswith("_") and len(oneof.fields) == 1:
            continue  # a proto3 `optional` field: decided below like any field
        names = [f.name for f in oneof.fields]
        chosen_oneof[oneof.name] = draw(st.sampled_from([None, *names]))
    for fd in descriptor.fields:
        oneof = fd.containing_oneof
        if oneof is not None and oneof.name in chosen_oneof:
            if chosen_oneof[oneof.name] != fd.name:
                continue
        elif not draw(st.booleans()):
            continue
        if _is_map(fd):
            key_fd = fd.message_type.fields_by_name["key"]
            value_fd = fd.message_type.fields_by_name["value"]
            entries = draw(
                st.dictionaries(
                    _scalar(world, key_fd, tame), _field_values(world, value_fd, depth, tame), max_size=3
                )
            )
            target = getattr(message, fd.name)
            for key, value in entries.items():
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    _assign(target[key], value)
                else:
                    target[key] = value
        elif _is_repeated(fd):
            size = draw(
                st.integers(0, 3) if tame else st.one_of(st.integers(0, 3), st.sampled_from([26, 101]))
            )
            values = draw(
                st.lists(_field_values(world, fd, depth, tame), min_size=min(size, 3), max_size=min(size, 3))
            )
            if size > 3 and values and all(_small(v) for v in values):
                values = (values * size)[:size]  # over the per-request count limits
            target = getattr(message, fd.name)
            for value in values:
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    _assign(target.add(), value)
                else:
                    target.append(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            _assign(getattr(message, fd.name), draw(_field_values(world, fd, depth, tame)))
        else:
            setattr(message, fd.name, draw(_scalar(world, fd, tame)))
    return message


def _small(value: Any) -> bool:
    if isinstance(value, str | bytes):
        return len(value) < 10_000
    if isinstance(value, Message):
        return value.ByteSize() < 10_000
    return not isinstance(value, dict)


def _assign(target: Message, value: Any) -> None:
    if isinstance(value, dict):
        target.update(value)  # a Struct's document
        return
    try:
        target.CopyFrom(value)
    except DecodeError:
        # A message holding a Struct too deep to copy: parsing it is the server's problem, and raw_requests
        # sends such bytes; here, draw something else.
        reject()


# -- plausible values ------------------------------------------------------------------------------------

_WORDS = st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=12)


def _tame_scalar(world: World, fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = fd.type
    if kind in _SCALAR_BITS:
        return st.one_of(st.integers(0, 30), st.sampled_from([1000, 5000, 60_000]))
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(-1000, 1000)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        names = world.names_for(fd.name)
        return st.sampled_from(names) if names else _WORDS
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=8)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in fd.enum_type.values])
    raise AssertionError(f"unhandled field type {kind} of {fd.full_name}")


def _tame_documents(field_name: str) -> st.SearchStrategy[dict[str, Any]]:
    scalar = st.one_of(st.integers(-5, 5).map(float), _WORDS, st.booleans())
    if "filter" in field_name:
        condition = st.one_of(
            scalar,
            st.dictionaries(
                st.sampled_from(OPERATORS), st.one_of(scalar, st.lists(scalar, max_size=2)), max_size=1
            ),
        )
        return st.dictionaries(st.sampled_from(FILTER_FIELDS), condition, max_size=2)
    return st.dictionaries(_WORDS, st.one_of(scalar, st.lists(scalar, max_size=2)), max_size=3)


_TAME_WELL_KNOWN = {
    "google.protobuf.Struct": _tame_documents,
    "google.protobuf.Timestamp": lambda _name: st.builds(
        lambda s: timestamp_pb2.Timestamp(seconds=s), st.integers(1_767_225_600, 1_830_297_600)
    ),
    "google.protobuf.Duration": lambda _name: st.builds(
        lambda s: duration_pb2.Duration(seconds=s), st.sampled_from([0, 5, 30, 60, 900])
    ),
}


# -- raw bytes --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def invalid_utf8_in_first_string(descriptor: _descriptor.Descriptor) -> bytes:
    """The message with its first string field holding bytes that are not UTF-8."""
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_STRING:
            return length_delimited(fd.number, b"\xff\xfe\xc3\x28")
    return b"\xff"


def nested_past_limit(descriptor: _descriptor.Descriptor, levels: int = 120) -> bytes:
    """Nested length-delimited fields deeper than protobuf's recursion limit, in the first message field
    (a Struct when there is one: Struct.fields[""] → Value.struct_value → Struct ...)."""
    struct_fields = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    if not struct_fields:
        return b"\x0a\x00"
    inner = b""
    for _ in range(levels):
        entry = length_delimited(
            2, length_delimited(5, inner)
        )  # MapEntry.value = Value{struct_value = inner}
        inner = length_delimited(1, entry)  # Struct.fields = entry
    return length_delimited(struct_fields[0].number, inner)


def raw_requests(world: World, descriptor: _descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that may not decode as `descriptor`: random, truncated, flipped, invalid UTF-8, too deep."""
    valid = messages(world, descriptor).map(lambda m: m.SerializeToString())

    def flip(data: bytes, index: int, bit: int) -> bytes:
        if not data:
            return b"\x80"
        index %= len(data)
        return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :]

    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(
            [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80", b"\x07"]
        ),
        st.just(invalid_utf8_in_first_string(descriptor)),
        st.just(nested_past_limit(descriptor)),
        st.builds(lambda d, i: d[:i], valid, st.integers(0, 64)),
        st.builds(flip, valid, st.integers(0, 10_000), st.integers(0, 7)),
        st.builds(lambda d, junk: d + junk, valid, st.binary(min_size=1, max_size=8)),
    )
