"""SQLAlchemy models: the schema. Only the store imports these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from callplane_server.store.types import JSONDocument, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CallTypeRow(Base):
    __tablename__ = "call_types"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False)
    grants: Mapped[dict[str, list[str]]] = mapped_column(JSONDocument, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class CustomIndexRow(Base):
    """One index on call custom data (named by its spec's hash) and its build state, shared by every
    replica: whoever declares it, the replica that claims it builds or drops it."""

    __tablename__ = "custom_indexes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[str] = mapped_column(Text, nullable=False)
    # BUILDING, READY, FAILED, or DROPPING (nothing declares it any more: being dropped).
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    error: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    # Declared by a server's --custom-index: never dropped for want of a call type declaring it.
    server_declared: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=text("false")
    )
    # The replica building or dropping it, until claimed_until (Unix seconds; it renews while it works).
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    build_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    writes_blocked_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class CallTypeCustomIndexRow(Base):
    """A call type's declaration of a custom index (the index's references: dropped when none is left)."""

    __tablename__ = "call_type_custom_indexes"

    call_type: Mapped[str] = mapped_column(
        String(64), ForeignKey("call_types.name", ondelete="CASCADE"), primary_key=True
    )
    index_name: Mapped[str] = mapped_column(
        String(64), ForeignKey("custom_indexes.name"), primary_key=True, index=True
    )
    # Order of declaration, for display.
    position: Mapped[int] = mapped_column(Integer, nullable=False)


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), nullable=False, default="", index=True)
    image: Mapped[str] = mapped_column(String(2048), nullable=False, default="")
    role: Mapped[str] = mapped_column(String(64), nullable=False, default="user", index=True)
    custom: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    # Per-user event sequence for WatchUser, bumped under this row's lock like calls.last_seq.
    last_event_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")


class UserTeamRow(Base):
    """Team membership of a user: a table rather than a JSON array so `teams` filters are plain SQL."""

    __tablename__ = "user_teams"

    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    team: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class CallRow(Base):
    __tablename__ = "calls"
    __table_args__ = (
        UniqueConstraint("type", "id"),
        # QueryCalls sorts by a time, newest first by default, with `cid` ascending as the keyset tiebreak:
        # an index in exactly that order lets a LIMIT query walk it and stop after the page (no sort of
        # every matching row, even when a broad filter matches most calls). Scanned backwards it also
        # serves the ascending sort (the tiebreak's ties then take a small sort of equal times only).
        Index("ix_calls_created_at_cid", text("created_at DESC"), "cid"),
        Index("ix_calls_updated_at_cid", text("updated_at DESC"), "cid"),
        # Only soft-deleted calls / calls with a team: every query reads live calls (`deleted_at IS NULL`)
        # and a user's reads add `team IS NULL` (calls of no team); full indexes would tempt the planner
        # to fetch all such calls through them instead of walking the sort index. A partial index still
        # serves `team = ...` and `team IN (...)`, which imply NOT NULL.
        *(
            Index(
                f"ix_calls_{column}",
                column,
                sqlite_where=text(f"{column} IS NOT NULL"),
                postgresql_where=text(f"{column} IS NOT NULL"),
            )
            for column in ("deleted_at", "team")
        ),
    )

    cid: Mapped[str] = mapped_column(String(129), primary_key=True)
    type: Mapped[str] = mapped_column(String(64), ForeignKey("call_types.name"), nullable=False, index=True)
    id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    created_by_user_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    team: Mapped[str | None] = mapped_column(String(64), nullable=True)
    custom: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    settings_override: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    backstage: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, index=True)
    ongoing: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, index=True)
    member_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Bumped on every change of the call's own fields; the etag is derived from it.
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # Per-call event sequence: incremented under the call's row lock in the writing transaction, so
    # event seqs are gap-free and in commit order on every dialect.
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    starts_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The running session, if any (sessions keep their own history rows).
    current_session_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # Ordered pins: [{"participant_session_id", "user_id", "pinned_at"}].
    pins: Mapped[list[dict[str, Any]]] = mapped_column(
        JSONDocument, nullable=False, default=list, server_default=text("'[]'")
    )
    # Users blocked from this call (BlockUser).
    blocked_user_ids: Mapped[list[str]] = mapped_column(
        JSONDocument, nullable=False, default=list, server_default=text("'[]'")
    )


class CallMemberRow(Base):
    __tablename__ = "call_members"
    __table_args__ = (
        Index(None, "call_cid", "created_at"),
        Index(None, "call_cid", "updated_at"),
        Index(None, "call_cid", "role"),
    )

    call_cid: Mapped[str] = mapped_column(
        String(129), ForeignKey("calls.cid", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(64), nullable=False, default="user")
    custom: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class ServerSecretRow(Base):
    """Secrets shared by every server process on this database (e.g. the cursor signing key)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), nullable=False)


class CounterRow(Base):
    """Named counters. `event_position` is the global event position: its row is updated as the last
    statement of every writing transaction, so positions are handed out in commit order, gap-free."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class EventRow(Base):
    """The durable event log: the source of truth for every stream (notifications are only doorbells)."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("call_cid", "seq"), Index(None, "call_type", "position"))

    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    call_cid: Mapped[str] = mapped_column(String(129), nullable=False)
    call_type: Mapped[str] = mapped_column(String(64), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    type: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    # The serialized callplane.v1.Event (without position/seq, which live in columns).
    payload: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class EventRecipientRow(Base):
    """Events addressed to a user (WatchUser), numbered per user."""

    __tablename__ = "event_recipients"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)


class CallSessionRow(Base):
    __tablename__ = "call_sessions"
    __table_args__ = (Index(None, "call_cid", "started_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    call_cid: Mapped[str] = mapped_column(String(129), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    end_reason: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    timer_ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    custom: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    custom_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    accepted_by: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False, default=list)
    rejected_by: Mapped[dict[str, str]] = mapped_column(JSONDocument, nullable=False, default=dict)
    missed_by: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False, default=list)


class ParticipantRow(Base):
    __tablename__ = "participants"
    __table_args__ = (
        Index(None, "call_cid", "left_at"),
        Index(None, "session_id", "joined_at"),
        # The live participants a replica holds, found when its lease runs out (see held_by).
        Index(
            None,
            "held_by",
            sqlite_where=text("left_at IS NULL"),
            postgresql_where=text("left_at IS NULL"),
        ),
    )

    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("call_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    participant_session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    call_cid: Mapped[str] = mapped_column(String(129), nullable=False)
    user_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    role: Mapped[str] = mapped_column(String(64), nullable=False, default="user")
    custom: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    custom_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    published_tracks: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False, default=list)
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    left_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    left_reason: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The replica (server process) whose WatchCall stream holds this participant's presence: while set,
    # the participant has no lease of its own (lease_expires_at NULL, no lease timer) and lives as long
    # as that replica's lease (a `replica_lease` timer it renews) or until the stream ends.
    held_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RingRow(Base):
    """Ring state of one callee in one call: ringing, then exactly one outcome."""

    __tablename__ = "rings"

    call_cid: Mapped[str] = mapped_column(String(129), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    caller_user_id: Mapped[str] = mapped_column(String(128), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    video: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    missed_notified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    rung_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TimerRow(Base):
    """A durable timer: fires once, in the transaction that deletes it, even after a restart."""

    __tablename__ = "timers"
    __table_args__ = (UniqueConstraint("kind", "call_cid", "key"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    call_cid: Mapped[str] = mapped_column(String(129), nullable=False)
    key: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    due_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)


class IdempotencyKeyRow(Base):
    """Remembers `request_id`s so a retried request returns its first result."""

    __tablename__ = "idempotency_keys"

    call_cid: Mapped[str] = mapped_column(String(129), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


class PermissionOverrideRow(Base):
    """Capabilities granted to or revoked from one user in one call, on top of the role grants."""

    __tablename__ = "call_permission_overrides"

    call_cid: Mapped[str] = mapped_column(String(129), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    granted: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False, default=list)
    revoked: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False, default=list)


class WebhookRow(Base):
    """A webhook endpoint, its delivery cursor and the lease of the replica delivering it."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    event_types: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False)
    call_types: Mapped[list[str]] = mapped_column(JSONDocument, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # ACTIVE or FAILING.
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    # Every event up to this position was delivered (or skipped by the filters).
    delivered_position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Signing secrets sealed with a key derived from the API secret (not stored here).
    secret: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    previous_secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Bumped by every API change (the delivering replica reloads the endpoint)...
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # ...and `epoch` by those that move its progress (redeliver, resume): a worker's writes name the
    # epoch they were made in and are refused after it changed.
    epoch: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class WebhookDeliveryRow(Base):
    """One event's delivery to one endpoint: the delivery log, and the retry state a restart resumes."""

    __tablename__ = "webhook_deliveries"

    webhook_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("webhooks.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    call_cid: Mapped[str] = mapped_column(String(129), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    # PENDING, SUCCEEDED or FAILED.
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_status_code: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    first_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
