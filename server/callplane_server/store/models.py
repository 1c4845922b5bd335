"""SQLAlchemy models: the schema. Only the store imports these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, MetaData, String, UniqueConstraint
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


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), nullable=False, default="", index=True)
    image: Mapped[str] = mapped_column(String(2048), nullable=False, default="")
    role: Mapped[str] = mapped_column(String(64), nullable=False, default="user", index=True)
    custom: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


class UserTeamRow(Base):
    """Team membership of a user: a table rather than a JSON array so `teams` filters are plain SQL."""

    __tablename__ = "user_teams"

    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    team: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class CallRow(Base):
    __tablename__ = "calls"
    __table_args__ = (UniqueConstraint("type", "id"),)

    cid: Mapped[str] = mapped_column(String(129), primary_key=True)
    type: Mapped[str] = mapped_column(String(64), ForeignKey("call_types.name"), nullable=False, index=True)
    id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    created_by_user_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    team: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
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
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    starts_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)


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
