"""What each queryable entity exposes to filters and sorts, and how those names map to SQL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Exists, exists
from sqlalchemy.orm import QueryableAttribute

from callplane_server.domain.records import SortInput
from callplane_server.store.models import (
    Base,
    CallMemberRow,
    CallRow,
    CallSessionRow,
    ParticipantRow,
    UserRow,
    UserTeamRow,
)

CUSTOM_PREFIX = "custom."


class FieldKind(StrEnum):
    STRING = "string"
    TIME = "time"
    BOOL = "bool"


@dataclass(frozen=True)
class ScalarField:
    """A plain column: filterable with the operators of its kind, sortable if listed as a sort field."""

    column: QueryableAttribute[Any]
    kind: FieldKind
    nullable: bool = False


@dataclass(frozen=True)
class ArrayField:
    """A multi-valued field kept in a child table (call members, user teams), tested with a correlated
    EXISTS so that the parent query never joins (no duplicate rows, no DISTINCT)."""

    parent_key: QueryableAttribute[Any]
    child_key: QueryableAttribute[Any]
    element: QueryableAttribute[Any]

    def exists(self, *conditions: ColumnElement[bool]) -> Exists:
        return exists().where(self.child_key == self.parent_key, *conditions)


@dataclass(frozen=True)
class JsonArrayField:
    """A JSON array of strings kept in the entity's own row (a participant's published_tracks), whose
    elements come from a closed set `values`. Takes the array operators; tested with JSON containment."""

    column: QueryableAttribute[Any]
    values: tuple[str, ...]


@dataclass(frozen=True)
class EntitySpec:
    """One queryable entity. `tiebreak` must be unique within every query's scope (e.g. `user_id`
    within one call's members) and is appended to every ORDER BY so keyset pagination is total."""

    name: str
    model: type[Base]
    filter_fields: Mapping[str, ScalarField | ArrayField | JsonArrayField]
    sort_fields: Mapping[str, ScalarField]
    custom: QueryableAttribute[Any]
    tiebreak: str
    default_sort: tuple[SortInput, ...]
    max_sort_keys: int

    @property
    def tiebreak_field(self) -> ScalarField:
        return self.sort_fields[self.tiebreak]


def _s(column: QueryableAttribute[Any], nullable: bool = False) -> ScalarField:
    return ScalarField(column, FieldKind.STRING, nullable)


def _t(column: QueryableAttribute[Any], nullable: bool = False) -> ScalarField:
    return ScalarField(column, FieldKind.TIME, nullable)


def _b(column: QueryableAttribute[Any]) -> ScalarField:
    return ScalarField(column, FieldKind.BOOL)


_CALL_FIELDS: dict[str, ScalarField] = {
    "id": _s(CallRow.id),
    "cid": _s(CallRow.cid),
    "type": _s(CallRow.type),
    "team": _s(CallRow.team, nullable=True),
    "created_by_user_id": _s(CallRow.created_by_user_id, nullable=True),
    "created_at": _t(CallRow.created_at),
    "updated_at": _t(CallRow.updated_at),
    "ended_at": _t(CallRow.ended_at, nullable=True),
    "starts_at": _t(CallRow.starts_at, nullable=True),
    "backstage": _b(CallRow.backstage),
    "ongoing": _b(CallRow.ongoing),
}

CALLS = EntitySpec(
    name="calls",
    model=CallRow,
    filter_fields={
        **_CALL_FIELDS,
        "members": ArrayField(CallRow.cid, CallMemberRow.call_cid, CallMemberRow.user_id),
    },
    sort_fields={
        name: _CALL_FIELDS[name]
        for name in ("starts_at", "created_at", "updated_at", "ended_at", "type", "id", "cid")
    },
    custom=CallRow.custom,
    tiebreak="cid",
    default_sort=(SortInput("created_at", "desc"),),
    max_sort_keys=2,
)

_MEMBER_FIELDS: dict[str, ScalarField] = {
    "user_id": _s(CallMemberRow.user_id),
    "role": _s(CallMemberRow.role),
    "created_at": _t(CallMemberRow.created_at),
    "updated_at": _t(CallMemberRow.updated_at),
}

MEMBERS = EntitySpec(
    name="members",
    model=CallMemberRow,
    filter_fields=_MEMBER_FIELDS,
    sort_fields=_MEMBER_FIELDS,
    custom=CallMemberRow.custom,
    tiebreak="user_id",
    default_sort=(SortInput("created_at", "asc"),),
    max_sort_keys=1,
)

_USER_FIELDS: dict[str, ScalarField] = {
    "id": _s(UserRow.id),
    "name": _s(UserRow.name),
    "role": _s(UserRow.role),
    "created_at": _t(UserRow.created_at),
    "updated_at": _t(UserRow.updated_at),
}

USERS = EntitySpec(
    name="users",
    model=UserRow,
    filter_fields={**_USER_FIELDS, "teams": ArrayField(UserRow.id, UserTeamRow.user_id, UserTeamRow.team)},
    sort_fields=_USER_FIELDS,
    custom=UserRow.custom,
    tiebreak="id",
    default_sort=(SortInput("created_at", "asc"),),
    max_sort_keys=2,
)

TRACK_TYPES = ("audio", "video", "screen_share", "screen_share_audio")

_PARTICIPANT_FIELDS: dict[str, ScalarField] = {
    "user_id": _s(ParticipantRow.user_id),
    "role": _s(ParticipantRow.role),
    "joined_at": _t(ParticipantRow.joined_at),
    "participant_session_id": _s(ParticipantRow.participant_session_id),
}

# Live participants of one session (the query's scope is the session id).
PARTICIPANTS = EntitySpec(
    name="participants",
    model=ParticipantRow,
    filter_fields={
        "user_id": _PARTICIPANT_FIELDS["user_id"],
        "role": _PARTICIPANT_FIELDS["role"],
        "published_tracks": JsonArrayField(ParticipantRow.published_tracks, TRACK_TYPES),
    },
    sort_fields=_PARTICIPANT_FIELDS,
    custom=ParticipantRow.custom,
    tiebreak="participant_session_id",
    default_sort=(SortInput("joined_at", "asc"),),
    max_sort_keys=1,
)

_SESSION_FIELDS: dict[str, ScalarField] = {
    "id": _s(CallSessionRow.id),
    "started_at": _t(CallSessionRow.started_at),
    "ended_at": _t(CallSessionRow.ended_at, nullable=True),
}

# Session history of one call (the query's scope is the call cid).
SESSIONS = EntitySpec(
    name="sessions",
    model=CallSessionRow,
    filter_fields=_SESSION_FIELDS,
    sort_fields=_SESSION_FIELDS,
    custom=CallSessionRow.custom,
    tiebreak="id",
    default_sort=(SortInput("started_at", "desc"),),
    max_sort_keys=1,
)
