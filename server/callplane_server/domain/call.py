"""The call aggregate: one call as a write transaction holds it (its row locked), with the rules for its
state in one place.

Every change of a call's state goes through a method here: it moves `version`, `updated_at` (and so the
etag) when the change is one clients see, and records the domain event that tells watchers. Events take
their per-call seq from the locked row (`last_seq`), so numbering needs no statement of its own; the unit
of work writes the row once, with its new `last_seq`, when the transaction flushes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from callplane_server.domain.call_types import merge_settings
from callplane_server.domain.caller import Caller
from callplane_server.domain.capabilities import CAPABILITIES
from callplane_server.domain.events import (
    CallDeleted,
    CallEnded,
    CallLiveStarted,
    CallUpdated,
    DomainEvent,
    PinsUpdated,
)
from callplane_server.domain.records import CallRecord, CallView, JSONDict, MemberRecord
from callplane_server.errors import Aborted, FailedPrecondition

#: Receives each recorded event: (call, event, when, recipients). The unit of work's event log.
EventSink = Callable[[CallRecord, DomainEvent, datetime, tuple[str, ...]], None]


def backstage_enabled(settings: dict[str, Any]) -> bool:
    return bool(settings.get("backstage", {}).get("enabled"))


def ordered_capabilities(capabilities: frozenset[str] | set[str]) -> list[str]:
    """Capabilities in the canonical CAPABILITIES order."""
    return [capability for capability in CAPABILITIES if capability in capabilities]


@dataclass(frozen=True)
class Update:
    """What UpdateCall asks for, already applied to the custom data (None: leave as is)."""

    custom: JSONDict
    settings_override: JSONDict
    starts_at: datetime | None = None

    def changes(self, call: CallRecord) -> bool:
        """Whether applying this to `call` changes anything (an update that does not is answered as is)."""
        starts_at = self.starts_at if self.starts_at is not None else call.starts_at
        return (self.custom, self.settings_override, starts_at) != (
            call.custom,
            call.settings_override,
            call.starts_at,
        )


class Call:
    """One call in a write transaction. Created by the unit of work (`tx.calls.open` / `tx.calls.create`),
    which writes it back at flush when `changed`."""

    def __init__(
        self,
        record: CallRecord,
        *,
        type_settings: JSONDict,
        grants: dict[str, list[str]],
        now: datetime,
        sink: EventSink,
    ) -> None:
        self.record = record
        self.type_settings = type_settings
        self.grants = grants
        self.now = now
        # Set by the service that opened the call for an RPC: who asks, and what they may do here.
        self.caller: Caller | None = None
        self.capabilities: frozenset[str] = frozenset()
        # The oldest members (as many as `members_limit` asked for) when known to match this state.
        self.members: list[MemberRecord] | None = None
        self.members_limit = 0
        self.created = False
        # The row differs from the stored one; `gone`: hard-deleted in this transaction.
        self.changed = False
        self.gone = False
        self._sink = sink
        self._settings: JSONDict | None = None

    # -- what it is ----------------------------------------------------------------------------------

    @property
    def cid(self) -> str:
        return self.record.cid

    @property
    def etag(self) -> str:
        return self.record.etag

    @property
    def settings(self) -> JSONDict:
        """Effective settings: the call type's, with the call's override on top (merged once)."""
        if self._settings is None:
            self._settings = merge_settings(self.type_settings, self.record.settings_override)
        return self._settings

    @property
    def ended(self) -> bool:
        return self.record.ended_at is not None

    def view(self, members: Sequence[MemberRecord] = ()) -> CallView:
        """The call as clients see it, with what the caller may do in it."""
        return CallView(
            self.record, self.settings, list(members), self.created, ordered_capabilities(self.capabilities)
        )

    # -- checks ------------------------------------------------------------------------------------

    def check_etag(self, etag: str) -> None:
        if etag and etag != self.etag:
            raise Aborted(
                f"call {self.cid!r} changed since etag {etag!r} (now {self.etag!r}); re-read and retry",
                reason="ETAG_MISMATCH",
                metadata={"cid": self.cid, "etag": etag, "current_etag": self.etag},
            )

    def check_not_ended(self, message: str = "") -> None:
        if self.ended:
            raise FailedPrecondition(
                message or f"call {self.cid!r} has ended", reason="CALL_ENDED", metadata={"cid": self.cid}
            )

    # -- events --------------------------------------------------------------------------------------

    def record_event(
        self, event: DomainEvent, recipients: Sequence[str] = (), at: datetime | None = None
    ) -> int:
        """Appends `event` to the call's log (numbered from the locked row) and returns its seq."""
        self.record.last_seq += 1
        self.changed = True
        self._sink(self.record, event, at or self.now, tuple(dict.fromkeys(recipients)))
        return self.record.last_seq

    # -- changes -------------------------------------------------------------------------------------

    def _touch(self) -> None:
        """A change clients see on the call itself: a new version (and etag) and updated_at."""
        self.record.version += 1
        self.record.updated_at = self.now
        self.changed = True

    def update(self, change: Update) -> bool:
        """UpdateCall: custom data, settings override and start time. Returns False (and changes and
        records nothing) when the call already is what was asked for."""
        record = self.record
        if not change.changes(record):
            return False
        record.custom = change.custom
        if change.settings_override != record.settings_override:
            was_backstage = backstage_enabled(self.settings)
            record.settings_override = change.settings_override
            self._settings = None
            # Only a change of backstage.enabled itself moves the call in or out of backstage; other
            # settings changes must not undo a GoLive.
            if backstage_enabled(self.settings) != was_backstage:
                record.backstage = backstage_enabled(self.settings)
        if change.starts_at is not None:
            record.starts_at = change.starts_at
        self._touch()
        self.record_event(CallUpdated(self.view()))
        return True

    def set_backstage(self, backstage: bool) -> None:
        """StopLive (True) / GoLive (False)."""
        self.check_not_ended()
        if self.record.backstage == backstage:
            if backstage:
                raise FailedPrecondition(
                    f"call {self.cid!r} is already in backstage",
                    reason="CALL_NOT_LIVE",
                    metadata={"cid": self.cid},
                )
            raise FailedPrecondition(
                f"call {self.cid!r} is already live (not in backstage)",
                reason="CALL_ALREADY_LIVE",
                metadata={"cid": self.cid},
            )
        self.record.backstage = backstage
        self._touch()
        self.record_event(CallUpdated(self.view()) if backstage else CallLiveStarted(self.view()))

    def end(self, reason: str) -> None:
        """The call ends (after its session, rings and timers were wound up by the caller)."""
        self.record.ended_at = self.now
        self.record.ongoing = False
        self._touch()
        self.record_event(CallEnded(self.view(), reason=reason))

    def soft_delete(self) -> None:
        self.record.deleted_at = self.now
        self.record.ended_at = self.record.ended_at or self.now
        self.record.ongoing = False
        self._touch()
        self.record_event(CallDeleted(self.view(), hard=False))

    def hard_delete(self) -> None:
        """Records call.deleted (numbered from the row that is about to go); the caller deletes the rows."""
        self.record_event(CallDeleted(self.view(), hard=True))
        self.gone = True

    def session_started(self, session_id: str) -> None:
        self.record.current_session_id = session_id
        self.record.ongoing = True
        self.changed = True

    def session_over(self) -> None:
        """The running session ended (or was gone): no session, not ongoing, no pins left."""
        self.record.current_session_id = None
        self.record.ongoing = False
        if self.record.pins:
            self.set_pins([])
        self.changed = True

    def set_pins(self, pins: list[JSONDict]) -> None:
        self.record.pins = pins
        self.changed = True
        self.record_event(PinsUpdated(list(pins)))

    def unpin(self, participant_session_id: str) -> None:
        """Drops a departed connection's pin, if it has one (a pin of a connection that is gone would
        point at nothing)."""
        kept = [p for p in self.record.pins if p["participant_session_id"] != participant_session_id]
        if len(kept) != len(self.record.pins):
            self.set_pins(kept)

    def block(self, user_id: str) -> bool:
        """Adds the user to the blocked list; False when already there."""
        if user_id in self.record.blocked_user_ids:
            return False
        self.record.blocked_user_ids = [*self.record.blocked_user_ids, user_id]
        self._touch()
        return True

    def unblock(self, user_id: str) -> bool:
        if user_id not in self.record.blocked_user_ids:
            return False
        self.record.blocked_user_ids = [u for u in self.record.blocked_user_ids if u != user_id]
        self._touch()
        return True

    def members_changed(self, added: int, removed: int) -> None:
        """Members were added or removed (the caller records their events)."""
        self.record.member_count += added - removed
        self.members = None
        self.changed = True
