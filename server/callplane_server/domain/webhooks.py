"""Webhook endpoints and deliveries: the rules that do not depend on HTTP or on the database."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from callplane_server.errors import ViolationCollector

MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 512
MAX_FILTER_VALUES = 64
#: A rotated secret signs alongside the new one this long unless the request says otherwise.
DEFAULT_SECRET_OVERLAP = timedelta(hours=24)
MAX_SECRET_OVERLAP = timedelta(days=7)
#: First retry after about this long, doubling up to RETRY_CAP (Standard Webhooks senders retry for a
#: day or more with growing gaps; see the README).
RETRY_BASE = timedelta(seconds=1)
RETRY_CAP = timedelta(hours=1)

_EVENT_TYPE_PATTERN = re.compile(r"^[a-z0-9_.]{1,64}\*?$|^\*$")
_CALL_TYPE_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")


class WebhookState(StrEnum):
    ACTIVE = "ACTIVE"
    FAILING = "FAILING"


class DeliveryStatus(StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class EventFilter:
    """Which events an endpoint wants: event types by exact name or `prefix*`, and call types."""

    event_types: tuple[str, ...] = ()
    call_types: tuple[str, ...] = ()

    def matches(self, event_type: str, call_type: str) -> bool:
        if self.call_types and call_type not in self.call_types:
            return False
        if not self.event_types:
            return True
        for pattern in self.event_types:
            if pattern.endswith("*"):
                if event_type.startswith(pattern[:-1]):
                    return True
            elif event_type == pattern:
                return True
        return False


def check_filters(
    event_types: Sequence[str], call_types: Sequence[str], path: str, problems: ViolationCollector
) -> None:
    """`path`: what follows each filter's field name in a violation: "" on create (`event_types[0]`),
    ".values" on update (`event_types.values[0]`)."""
    for name, values, pattern, what in (
        ("event_types", event_types, _EVENT_TYPE_PATTERN, "an event type or a prefix ending in * (call.*)"),
        ("call_types", call_types, _CALL_TYPE_NAME, "a call type name (1..64 of a-z 0-9 _ -)"),
    ):
        field_name = f"{name}{path}"
        if len(values) > MAX_FILTER_VALUES:
            problems.add(field_name, f"at most {MAX_FILTER_VALUES} values, got {len(values)}")
            continue
        for index, value in enumerate(values):
            if not pattern.match(value):
                problems.add(f"{field_name}[{index}]", f"must be {what}, got {value!r}")


def check_description(description: str, field_name: str, problems: ViolationCollector) -> None:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        problems.add(field_name, f"at most {MAX_DESCRIPTION_LENGTH} characters, got {len(description)}")


@dataclass
class WebhookRecord:
    id: str
    url: str
    description: str
    event_types: list[str]
    call_types: list[str]
    enabled: bool
    state: WebhookState
    # Every event up to this global position was delivered or skipped by the filters.
    delivered_position: int
    created_at: datetime
    updated_at: datetime
    # Sealed (encrypted) signing secrets: the current one, and a rotated one while it still signs.
    sealed_secret: bytes = b""
    sealed_previous_secret: bytes | None = None
    previous_secret_expires_at: datetime | None = None
    failing_since: datetime | None = None
    last_error: str = ""
    # Bumped by every change made through the API: the replica delivering it reloads.
    version: int = 1

    @property
    def filter(self) -> EventFilter:
        return EventFilter(tuple(self.event_types), tuple(self.call_types))

    @property
    def delivering(self) -> bool:
        return self.enabled and self.state is WebhookState.ACTIVE


@dataclass
class DeliveryRecord:
    """One event's delivery to one endpoint, as the delivery log shows it."""

    webhook_id: str
    position: int
    call_cid: str
    seq: int
    event_type: str
    status: DeliveryStatus
    attempts: int = 0
    last_status_code: int = 0
    last_latency: timedelta | None = None
    last_error: str = ""
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None

    @property
    def message_id(self) -> str:
        return message_id(self.position)


def message_id(position: int) -> str:
    """The `webhook-id` of the event at `position`: the same on every attempt and every endpoint, so a
    receiver deduplicates by it."""
    return f"evt_{position}"


@dataclass(frozen=True)
class DeliveryQuery:
    webhook_id: str
    status: DeliveryStatus | None = None
    call_cid: str = ""
    event_type: str = ""
    limit: int = 25
    # Keyset: deliveries of events before this position (newest first).
    before_position: int | None = None


@dataclass
class DeliveryPage:
    deliveries: list[DeliveryRecord] = field(default_factory=list)
    # Position to continue before (None: last page).
    next_before: int | None = None


def retry_delay(attempts: int, rng: random.Random | None = None) -> timedelta:
    """How long to wait after the `attempts`-th failed attempt: exponential (RETRY_BASE doubling, capped
    at RETRY_CAP) with equal jitter, so endpoints that failed together do not retry together."""
    chooser = rng or random
    ceiling = min(RETRY_CAP.total_seconds(), RETRY_BASE.total_seconds() * 2 ** min(attempts - 1, 30))
    return timedelta(seconds=ceiling / 2 + chooser.uniform(0, ceiling / 2))
