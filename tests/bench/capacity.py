"""Live capacity (issue 12): how many connected participants one server holds.

A connected participant is a JoinCall (server token, its own user and `participant_session_id`) followed
by a WatchCall stream opened with that `participant_session_id` (the stream holds its presence), kept
open; 5 participants per call. For each backend a fresh database gets the users and calls through the
API, then the server (SQLite: one process; PostgreSQL: `replicas` processes on the same database,
participant p connected to replica p mod replicas, so every call has watchers on both) is pinned to CPU 0
and the load generator's child processes to CPU 1. Then:

1. Big join: `big_join` participants join ONE call, 16 joiners at a time (JoinCall, then WatchCall until
   its first message). Reported: the time from the first JoinCall to the last stream live, the time until
   the last `call.session_participant_joined` arrived, and whether every participant's joined event
   reached every stream that was live (first message received) before its JoinCall was sent. Then
   those streams close (their participants leave) and the bench waits for the call to be empty.
2. For each population (1k, 2k, 5k, 10k): grow to it (16 joiners; join rate = participants added / wall
   time, and each join's time from JoinCall sent to its stream's first message), pause `settle` seconds,
   then an idle window: server CPU (utime + stime from /proc, summed over replicas, as % of one core) and
   RSS (VmRSS, summed) while nothing happens; then the population is checked (QueryCallParticipants on
   every call lists exactly its live participants, no stream ended). Then the activity profile: every
   participant acts once per 10 s on an open-loop schedule spread evenly (participant p of N at
   start + p·10/N + 10k; its kind by (p + k) mod 10: 50 % SendCallEvent, 20 % UpdateParticipant tracks,
   20 % UpdateParticipantCustom, 10 % UpdateSessionCustom), for `activity_seconds`; each write is tagged
   (custom {"bench_n": n}; a tracks update by its participant and a track set that participant never
   reported before) and its event must reach the 5 streams of its call. Reported: writes/s, deliveries/s,
   p50/p99 write-ack → delivery latency, events lost (expected deliveries - received, after a drain),
   writes failed (non-OK), and the checks that the writes happened (the server's own OK counts from
   /metrics, the `events` rows appended). Then the population is checked again.
   The activity profile holds at a population when p99 ≤ 100 ms, nothing is lost, no write failed and
   the population is intact; the capacity figure is the largest population where it held. Growth stops
   at a population that is not reached within its time limit or not intact (reported as such).

The generator: `processes` children (`python -m tests.bench.capacity child`), each owning the calls c
with c mod processes = its number (all 5 participants of a call in one child, so it knows every
watcher of the writes it sends). Streams read raw bytes (no deserializer), at most PER_CHANNEL per
channel (each channel its own connection), and note `(time.monotonic(), bytes)` per message; messages
are parsed after each phase, never while it runs. CLOCK_MONOTONIC is shared by all processes on Linux,
so children and parent compare times directly. Children answer one JSON line per command (one JSON line
on stdin); they end on `close`, on end of stdin (the parent died) or their own deadline, and the parent
kills them on any error. Every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from callplane.v1 import (
    call_data_service_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    event_service_pb2,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server import runtime
from tests.bench.fanout import (
    EVENT_TAG,
    TOKEN_ENV,
    BenchError,
    _channel,
    _Child,
    _cpu_seconds,
    _metadata,
    _say,
    _shares,
    _stdin_reader,
)
from tests.bench.stats import percentile, proc_status

CALL_TYPE = "default"
#: Participants per call.
PER_CALL = 5
#: Every participant acts once per PERIOD seconds.
PERIOD = 10.0
#: The activity mix: participant p's k-th action is KINDS[(p + k) % 10].
KINDS = ("reaction",) * 5 + ("tracks",) * 2 + ("participant_custom",) * 2 + ("session_custom",)
METHODS = {
    "reaction": "/callplane.v1.CallDataService/SendCallEvent",
    "tracks": "/callplane.v1.SessionService/UpdateParticipant",
    "participant_custom": "/callplane.v1.CallDataService/UpdateParticipantCustom",
    "session_custom": "/callplane.v1.CallDataService/UpdateSessionCustom",
}
#: The event each kind of write appends.
EVENT_TYPES = {
    "reaction": "custom",
    "tracks": "call.session_participant_updated",
    "participant_custom": "call.participant_custom_updated",
    "session_custom": "call.session_custom_updated",
}
JOIN_CALL = "/callplane.v1.SessionService/JoinCall"
WATCH_CALL = "/callplane.v1.EventService/WatchCall"
QUERY_PARTICIPANTS = "/callplane.v1.SessionService/QueryCallParticipants"
TRACK_TYPES = (
    session_pb2.TRACK_TYPE_AUDIO,
    session_pb2.TRACK_TYPE_VIDEO,
    session_pb2.TRACK_TYPE_SCREEN_SHARE,
    session_pb2.TRACK_TYPE_SCREEN_SHARE_AUDIO,
)
#: Streams per channel (each channel its own connection).
PER_CHANNEL = 200
#: Deadline of one JoinCall, and the time its stream gets for its first message.
JOIN_TIMEOUT = 30.0
FIRST_MESSAGE_TIMEOUT = 30.0
#: Deadline of one activity write: generous, since an overloaded server acks late and a cancelled write
#: is worse than a slow one.
WRITE_TIMEOUT = 60.0
QUERY_TIMEOUT = 30.0
#: Activity holds at a population when p99 write-ack → delivery is at most this, with nothing lost or
#: failed (issue 12's goal 3).
P99_TARGET_MS = 100.0
#: ... and when the server kept up with the offered rate: OK writes per second (first sent to last
#: acknowledged) at least this share of it. An event is published when its write commits, before the
#: write's reply, so write-ack → delivery stays near 0 even when the writes themselves queue for seconds.
KEPT_UP_SHARE = 0.9
#: The generator's processes share one core: at this share of it (%), they may be what limits the figures.
GENERATOR_BOUND_PERCENT = 90.0
BIG_CALL = "cap-big"


# -- names and the plan (pure) ------------------------------------------------------------------------


def call_id_of(call: int) -> str:
    return f"cap-{call:05d}"


def user_of(index: int) -> str:
    return f"cap-user-{index:05d}"


def psid_of(index: int) -> str:
    return f"cap-p{index:05d}"


def big_psid_of(index: int) -> str:
    return f"big-p{index:05d}"


def big_index_of(psid: str) -> int | None:
    return int(psid[len("big-p") :]) if psid.startswith("big-p") else None


def owned_calls(child: int, children: int, population: int) -> list[int]:
    """The calls child `child` of `children` owns among the first population / PER_CALL."""
    return list(range(child, population // PER_CALL, children))


def tracks_for(count: int) -> list[session_pb2.TrackType.ValueType]:
    """The track set a participant reports on its `count`-th tracks update: a non-empty subset of the 4
    track types, each differing from the previous 14 (so every update changes the stored set, and a
    participant's set identifies the update)."""
    combo = 1 + count % 15
    return [track for bit, track in enumerate(TRACK_TYPES) if combo >> bit & 1]


@dataclass(frozen=True, order=True)
class PlannedWrite:
    due: float  # monotonic time it is sent
    number: int  # bench_n, unique over the run
    participant: int
    kind: str


def schedule(
    participants: Iterable[int], population: int, start: float, seconds: float, base: int
) -> list[PlannedWrite]:
    """Open-loop activity plan, in send order: participant p (of `population`, spread evenly over the
    period) acts at start + p·PERIOD/population + k·PERIOD for every k with that before start + seconds;
    write number base + k·population + p; kind KINDS[(p + k) % 10]."""
    plan = []
    for p in participants:
        offset = p * PERIOD / population
        k = 0
        while offset + k * PERIOD < seconds:
            plan.append(
                PlannedWrite(start + offset + k * PERIOD, base + k * population + p, p, KINDS[(p + k) % 10])
            )
            k += 1
    plan.sort()
    return plan


def identify(raw: bytes) -> tuple[str, Any, Any]:
    """What a serialized WatchCallResponse event is, for matching it to a write:
    ("n", bench_n, None), ("tracks", participant_session_id, track tuple), ("joined", psid, None),
    ("left", reason, None) or ("other", event type, None)."""
    event = event_service_pb2.WatchCallResponse.FromString(raw).event
    payload = event.WhichOneof("payload")
    custom: struct_pb2.Struct | None = None
    if payload == "custom":
        custom = event.custom.custom
    elif payload == "call_participant_custom_updated":
        custom = event.call_participant_custom_updated.participant.custom
    elif payload == "call_session_custom_updated":
        custom = event.call_session_custom_updated.custom
    elif payload == "call_session_participant_updated":
        participant = event.call_session_participant_updated.participant
        return "tracks", participant.participant_session_id, tuple(participant.published_tracks)
    elif payload == "call_session_participant_joined":
        return "joined", event.call_session_participant_joined.participant.participant_session_id, None
    elif payload == "call_session_participant_left":
        return "left", event.call_session_participant_left.reason, None
    if custom is not None and "bench_n" in custom.fields:
        return "n", int(custom.fields["bench_n"].number_value), None
    return "other", event.type, None


def _events_of(
    messages: Iterable[tuple[float, bytes]], cache: dict[bytes, tuple[str, Any, Any]]
) -> Iterator[tuple[float, tuple[str, Any, Any]]]:
    """(receive time, identify()'s answer) of each event message; each distinct message is parsed once
    (an event is the same bytes on every stream)."""
    for at, raw in messages:
        if not raw or raw[0] != EVENT_TAG:
            continue
        info = cache.get(raw)
        if info is None:
            info = cache[raw] = identify(raw)
        yield at, info


def summarize_deliveries(
    acked: dict[int, float],
    write_call: dict[int, str],
    receipts: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    sent: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Deliveries of the acknowledged writes `acked` (number → ack time; `write_call` number → call) to the
    streams `receipts` (each: its call, and the write numbers it received with receive times). Each OK
    write is owed once to every stream of its call. Latency = receive - ack (clamped at 0; those
    received before their ack are counted); with `sent`, also from the write's sending."""
    watchers = Counter(call for call, _ in receipts)
    expected = sum(watchers[write_call[number]] for number in acked)
    delivered = duplicates = unexpected = before_ack = 0
    latencies: list[float] = []
    from_send: list[float] = []
    last_receive = 0.0
    for call, received in receipts:
        seen: set[int] = set()
        for number, at in received:
            ack = acked.get(number)
            if ack is None or write_call.get(number) != call:
                unexpected += 1
                continue
            if number in seen:
                duplicates += 1
                continue
            seen.add(number)
            delivered += 1
            last_receive = max(last_receive, at)
            lag = at - ack
            if lag < 0:
                before_ack += 1
                lag = 0.0
            latencies.append(lag)
            if sent is not None:
                from_send.append(at - sent[number])
    return {
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "received_before_ack": before_ack,
        "latencies": latencies,
        "send_latencies": from_send,
        "last_receive": last_receive,
    }


def big_join_deliveries(
    sent: dict[int, float], streams: Sequence[tuple[int, float, Iterable[int]]]
) -> dict[str, int]:
    """Whether every participant's joined event reached everyone already in the call when it joined.
    `sent`: participant → when its JoinCall was sent (OK joins only); `streams`: (participant, when its
    stream got its first message, the participants whose joined event it received). A join sent after a
    stream was live is owed to it (a join in flight at that moment may or may not be: not counted)."""
    expected = missing = 0
    for own, live, received in streams:
        got = set(received)
        for other, at in sent.items():
            if other != own and at > live:
                expected += 1
                if other not in got:
                    missing += 1
    return {"expected": expected, "missing": missing}


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def latency_figures(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": round(percentile(ordered, 0.50), 2),
        "p99_ms": round(percentile(ordered, 0.99), 2),
        "max_ms": round(ordered[-1], 2) if ordered else 0.0,
    }


def combine_activity(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One activity result from the children's (counts summed, latencies pooled)."""
    failed: Counter[str] = Counter()
    ok_by_kind: Counter[str] = Counter()
    left: Counter[str] = Counter()
    other: Counter[str] = Counter()
    latencies: list[float] = []
    from_send: list[float] = []
    acks: list[float] = []
    totals = Counter[str]()
    for part in parts:
        for key in (
            "writes",
            "ok",
            "expected",
            "delivered",
            "duplicates",
            "unexpected",
            "received_before_ack",
        ):
            totals[key] += part[key]
        failed.update(part["failed"])
        ok_by_kind.update(part["ok_by_kind"])
        left.update(part["left_events"])
        other.update(part["other_events"])
        latencies.extend(part["latencies_ms"])
        from_send.extend(part["send_latencies_ms"])
        acks.extend(part["ack_ms"])
    first_sent = min((p["first_sent"] for p in parts if p["first_sent"]), default=0.0)
    last_ack = max((p["last_ack"] for p in parts), default=0.0)
    last_receive = max((p["last_receive"] for p in parts), default=0.0)
    ack_figures = latency_figures(acks)
    send_figures = latency_figures(from_send)
    return {
        "writes": totals["writes"],
        "writes_ok": totals["ok"],
        "writes_failed": sum(failed.values()),
        "failed_by_code": dict(failed),
        "failed_samples": sorted({s for p in parts for s in p["failed_samples"]})[:5],
        "ok_by_kind": dict(ok_by_kind),
        "expected_deliveries": totals["expected"],
        "delivered": totals["delivered"],
        "lost": totals["expected"] - totals["delivered"],
        "duplicates": totals["duplicates"],
        "unexpected": totals["unexpected"],
        "received_before_ack": totals["received_before_ack"],
        "left_events": dict(left),
        "other_events": dict(other),
        # From the first write sent to the last acknowledgement / delivery: below the offered rate when the
        # server fell behind.
        "writes_per_second": round(totals["ok"] / (last_ack - first_sent), 1)
        if last_ack > first_sent
        else 0.0,
        "deliveries_per_second": round(totals["delivered"] / (last_receive - first_sent), 1)
        if last_receive > first_sent
        else 0.0,
        **latency_figures(latencies),
        # From the write's sending to each delivery (events often arrive before their write's ack).
        "send_p50_ms": send_figures["p50_ms"],
        "send_p99_ms": send_figures["p99_ms"],
        # The writes' own latency, sent → acknowledged.
        "ack_p50_ms": ack_figures["p50_ms"],
        "ack_p99_ms": ack_figures["p99_ms"],
        "worst_send_lag_ms": max((p["worst_send_lag_ms"] for p in parts), default=0.0),
        "drained": all(p["drained"] for p in parts),
        "drain_seconds": round(max((p["drain_seconds"] for p in parts), default=0.0), 2),
    }


def activity_held(level: dict[str, Any]) -> bool:
    """Issue 12's goal 3 at one population: the offered rate kept up with, p99 ≤ 100 ms, nothing lost,
    no write failed, the writes verifiably happened and the population stayed intact."""
    activity = level.get("activity")
    if not activity:
        return False
    return (
        activity["writes_ok"] > 0
        and activity["writes_per_second"] >= KEPT_UP_SHARE * activity.get("offered_writes_per_second", 0.0)
        and activity["p99_ms"] <= P99_TARGET_MS
        and activity["lost"] == 0
        and activity["writes_failed"] == 0
        and activity["checks_passed"]
        and bool(level.get("intact_after_activity"))
    )


def capacity_figure(levels: Sequence[dict[str, Any]]) -> int:
    """The largest population at which the activity profile held (0: none)."""
    return max((level["population"] for level in levels if level.get("held")), default=0)


def check_writes(
    ok_by_kind: dict[str, int],
    server_ok: dict[str, float],
    server_non_ok: dict[str, dict[str, float]],
    appended: dict[str, int],
) -> dict[str, Any]:
    """That the writes the clients counted happened: the server counted at least as many OK replies per
    method, and the `events` table grew by at least one row per OK write of each kind."""
    rows = {}
    passed = True
    for kind, method in METHODS.items():
        client = ok_by_kind.get(kind, 0)
        server = server_ok.get(method, 0.0)
        events = appended.get(EVENT_TYPES[kind], 0)
        good = server >= client and events >= client
        passed = passed and good
        rows[kind] = {
            "client_ok": client,
            "server_ok": server,
            "server_non_ok": server_non_ok.get(method, {}),
            "events_appended": events,
            "ok": good,
        }
    return {"passed": passed and sum(ok_by_kind.values()) > 0, "by_kind": rows}


# -- children -----------------------------------------------------------------------------------------


@dataclass
class _Member:
    index: int
    call_id: str
    user_id: str
    psid: str
    replica: int
    call: Any = None  # the WatchCall
    task: asyncio.Task[None] | None = None
    first: asyncio.Future[None] | None = None
    live: float = 0.0
    messages: list[tuple[float, bytes]] = field(default_factory=list)
    events: int = 0
    error: str | None = None
    closing: bool = False
    tracks_count: int = 0


class _Replica:
    """One child's connections to one server: a channel for unary calls, and stream channels."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.unary = _channel(target)
        self.streams: list[tuple[grpc.aio.Channel, Any]] = []
        self.on_last = 0
        self._unary: dict[str, Any] = {}

    def rpc(self, method: str, request_type: Any) -> Any:
        if method not in self._unary:
            self._unary[method] = self.unary.unary_unary(
                method, request_serializer=request_type.SerializeToString, response_deserializer=None
            )
        return self._unary[method]

    def watch(self) -> Any:
        if not self.streams or self.on_last >= PER_CHANNEL:
            channel = _channel(self.target)
            watch: Any = channel.unary_stream(
                WATCH_CALL,
                request_serializer=event_service_pb2.WatchCallRequest.SerializeToString,
                response_deserializer=None,
            )
            self.streams.append((channel, watch))
            self.on_last = 0
        self.on_last += 1
        return self.streams[-1][1]

    async def close(self) -> None:
        for channel, _ in self.streams:
            await channel.close(grace=None)
        await self.unary.close(grace=None)


def _code(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    return type(error).__name__


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    custom = struct_pb2.Struct()
    custom.update(values)
    return custom


class _Holder:
    """One child's participants and their streams."""

    def __init__(self, targets: list[str], token: str, child: int, children: int) -> None:
        self.replicas = [_Replica(target) for target in targets]
        self.metadata = _metadata(token)
        self.child = child
        self.children = children
        self.members: dict[int, _Member] = {}
        self.big: dict[int, _Member] = {}
        self.closed = False

    # -- joining ----------------------------------------------------------------------------------

    def _member(self, index: int) -> _Member:
        return _Member(
            index=index,
            call_id=call_id_of(index // PER_CALL),
            user_id=user_of(index),
            psid=psid_of(index),
            replica=index % len(self.replicas),
        )

    async def _receive(self, member: _Member) -> None:
        clock = time.monotonic
        call = member.call
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                now = clock()
                member.messages.append((now, raw))
                if member.first is not None and not member.first.done():
                    member.live = now
                    member.first.set_result(None)
                if raw and raw[0] == EVENT_TAG:
                    member.events += 1
            if not member.closing:
                member.error = "ended (OK)"
        except asyncio.CancelledError:
            if not member.closing:
                member.error = "cancelled"
        except grpc.aio.AioRpcError as error:
            if not (member.closing and error.code() == grpc.StatusCode.CANCELLED):
                member.error = f"{error.code().name}: {error.details()}"
        except Exception as error:  # reported: one stream must not stop the rest
            member.error = f"{type(error).__name__}: {error}"
        if member.first is not None and not member.first.done():
            member.first.set_exception(BenchError(f"stream ended before its first message: {member.error}"))

    async def _join(self, member: _Member) -> tuple[float, float, float]:
        """JoinCall, then WatchCall with the participant_session_id until its first message:
        (JoinCall sent, JoinCall acknowledged, first message) or raises."""
        replica = self.replicas[member.replica]
        join = replica.rpc(JOIN_CALL, session_service_pb2.JoinCallRequest)
        request = session_service_pb2.JoinCallRequest(
            type=CALL_TYPE, id=member.call_id, user_id=member.user_id, participant_session_id=member.psid
        )
        sent = time.monotonic()
        await join(request, metadata=self.metadata, timeout=JOIN_TIMEOUT)
        acked = time.monotonic()
        member.first = asyncio.get_running_loop().create_future()
        member.call = replica.watch()(
            event_service_pb2.WatchCallRequest(
                type=CALL_TYPE, id=member.call_id, participant_session_id=member.psid
            ),
            metadata=self.metadata,
        )
        member.task = asyncio.create_task(self._receive(member))
        await asyncio.wait_for(asyncio.shield(member.first), FIRST_MESSAGE_TIMEOUT)
        return sent, acked, member.live

    async def _join_all(
        self, members: list[_Member], joiners: int, deadline: float
    ) -> tuple[list[list[float]], Counter[str], list[str], int]:
        """Joins `members` with `joiners` at a time, starting none after `deadline`: ([index, sent, acked,
        live] per joined participant, failures by code, failure samples, participants not started)."""
        queue = deque(members)
        joined: list[list[float]] = []
        failures: Counter[str] = Counter()
        samples: list[str] = []

        async def joiner() -> None:
            while queue and time.monotonic() < deadline:
                member = queue.popleft()
                try:
                    sent, acked, live = await self._join(member)
                except Exception as error:
                    failures[_code(error)] += 1
                    member.error = member.error or f"join: {_code(error)}"
                    if len(samples) < 5:
                        detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                        samples.append(f"{member.psid}: {_code(error)}: {detail}")
                    if member.call is not None:
                        member.closing = True
                        member.call.cancel()
                    continue
                joined.append([member.index, sent, acked, live])

        await asyncio.gather(*(joiner() for _ in range(max(1, joiners))))
        return joined, failures, samples, len(queue)

    async def grow(self, command: dict[str, Any]) -> dict[str, Any]:
        population = command["population"]
        self._clear()
        todo = []
        for call in owned_calls(self.child, self.children, population):
            for index in range(call * PER_CALL, (call + 1) * PER_CALL):
                if index not in self.members:
                    todo.append(self._member(index))
        for member in todo:
            self.members[member.index] = member
        joined, failures, samples, skipped = await self._join_all(
            todo, command["joiners"], command["deadline"]
        )
        for member in todo[len(todo) - skipped :]:
            del self.members[member.index]  # never started: a later grow may try again
        return {
            "attempted": len(todo) - skipped,
            "joined": len(joined),
            "failed": dict(failures),
            "failed_samples": samples,
            "not_started": skipped,
            "latencies_ms": [ms(live - sent) for _, sent, _, live in joined],
            "first_sent": min((sent for _, sent, _, _ in joined), default=0.0),
            "last_live": max((live for _, _, _, live in joined), default=0.0),
        }

    # -- checks -----------------------------------------------------------------------------------

    def _intact(self, member: _Member) -> bool:
        return member.live > 0 and member.error is None

    async def check(self, command: dict[str, Any]) -> dict[str, Any]:
        """QueryCallParticipants on every owned call: exactly its live participants, and no stream ended."""
        self._clear()
        by_call: dict[str, set[str]] = {}
        for member in self.members.values():
            expected = by_call.setdefault(member.call_id, set())
            if self._intact(member):
                expected.add(member.psid)
        ended = [m for m in self.members.values() if m.live > 0 and m.error is not None]
        mismatched: list[str] = []
        errors: Counter[str] = Counter()
        present = 0
        queue = deque(sorted(by_call))

        async def worker() -> None:
            nonlocal present
            while queue:
                call_id = queue.popleft()
                query = self.replicas[0].rpc(
                    QUERY_PARTICIPANTS, session_service_pb2.QueryCallParticipantsRequest
                )
                try:
                    raw = await query(
                        session_service_pb2.QueryCallParticipantsRequest(
                            type=CALL_TYPE, id=call_id, limit=100
                        ),
                        metadata=self.metadata,
                        timeout=QUERY_TIMEOUT,
                    )
                except Exception as error:
                    errors[_code(error)] += 1
                    continue
                reply = session_service_pb2.QueryCallParticipantsResponse.FromString(raw)
                found = {p.participant_session_id for p in reply.participants}
                present += len(found)
                if found != by_call[call_id] or reply.total_participants != len(by_call[call_id]):
                    mismatched.append(
                        f"{call_id}: {reply.total_participants} live, expected {sorted(by_call[call_id])}, "
                        f"found {sorted(found)}"
                    )

        await asyncio.gather(*(worker() for _ in range(4)))
        return {
            "calls": len(by_call),
            "expected": sum(len(psids) for psids in by_call.values()),
            "present": present,
            "mismatched_calls": len(mismatched),
            "mismatch_samples": mismatched[:3],
            "query_errors": dict(errors),
            "streams_ended": len(ended),
            "ended_samples": sorted({m.error or "" for m in ended})[:5],
        }

    # -- activity ---------------------------------------------------------------------------------

    def _clear(self) -> None:
        for member in self.members.values():
            member.messages.clear()
            member.events = 0

    def _write(self, kind: str, number: int, member: _Member) -> tuple[Any, Any]:
        """(the bound RPC, the request) of one activity write."""
        replica = self.replicas[member.replica]
        key = {"type": CALL_TYPE, "id": member.call_id}
        if kind == "reaction":
            return replica.rpc(METHODS[kind], call_data_service_pb2.SendCallEventRequest), (
                call_data_service_pb2.SendCallEventRequest(
                    **key, user_id=member.user_id, custom=_struct({"bench_n": number, "reaction": "+1"})
                )
            )
        if kind == "tracks":
            tracks = tracks_for(member.tracks_count)
            member.tracks_count += 1
            return replica.rpc(METHODS[kind], session_service_pb2.UpdateParticipantRequest), (
                session_service_pb2.UpdateParticipantRequest(
                    **key, participant_session_id=member.psid, published_tracks=tracks
                )
            )
        if kind == "participant_custom":
            return replica.rpc(METHODS[kind], call_data_service_pb2.UpdateParticipantCustomRequest), (
                call_data_service_pb2.UpdateParticipantCustomRequest(
                    **key,
                    participant_session_id=member.psid,
                    user_id=member.user_id,
                    mode=session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
                    custom=_struct({"bench_n": number}),
                )
            )
        return replica.rpc(METHODS[kind], call_data_service_pb2.UpdateSessionCustomRequest), (
            call_data_service_pb2.UpdateSessionCustomRequest(
                **key,
                user_id=member.user_id,
                mode=session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
                custom=_struct({"bench_n": number}),
            )
        )

    async def act(self, command: dict[str, Any]) -> dict[str, Any]:
        population, start, seconds = command["population"], command["start"], command["seconds"]
        live = [m for m in self.members.values() if m.index < population and self._intact(m)]
        self._clear()
        plan = schedule((m.index for m in live), population, start, seconds, command["base"])
        sent: dict[int, float] = {}
        acked: dict[int, float] = {}
        kind_of: dict[int, str] = {}
        write_call: dict[int, str] = {}
        failed: Counter[str] = Counter()
        samples: list[str] = []
        tracks_key: dict[tuple[str, tuple[int, ...]], int] = {}

        async def send(number: int, rpc: Any, request: Any) -> None:
            sent[number] = time.monotonic()
            try:
                await rpc(request, metadata=self.metadata, timeout=WRITE_TIMEOUT)
            except Exception as error:
                failed[_code(error)] += 1
                if len(samples) < 5:
                    detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                    samples.append(f"{kind_of[number]}: {_code(error)}: {detail}")
                return
            acked[number] = time.monotonic()

        tasks: list[asyncio.Task[None]] = []
        worst_lag = 0.0
        for write in plan:
            member = self.members[write.participant]
            rpc, request = self._write(write.kind, write.number, member)
            kind_of[write.number] = write.kind
            write_call[write.number] = member.call_id
            if write.kind == "tracks":
                tracks_key[(member.psid, tuple(request.published_tracks))] = write.number
            delay = write.due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, time.monotonic() - write.due)
            tasks.append(asyncio.create_task(send(write.number, rpc, request)))
        if tasks:
            await asyncio.wait(tasks, timeout=WRITE_TIMEOUT + 10)
        for task in tasks:
            if not task.done():
                task.cancel()
                failed["unfinished"] += 1

        # Drain: until every stream has as many events as its call had OK writes, or `drain` seconds
        # after the last acknowledgement.
        owed = Counter(write_call[number] for number in acked)
        last_ack = max(acked.values(), default=time.monotonic())
        drain_deadline = max(last_ack, time.monotonic()) + command["drain"]
        drained = False
        while True:
            if all(m.events >= owed[m.call_id] for m in live):
                drained = True
                break
            if time.monotonic() >= drain_deadline:
                break
            await asyncio.sleep(0.05)
        drain_seconds = time.monotonic() - last_ack

        # Parsed only now: each distinct message once (an event is the same bytes on every stream).
        cache: dict[bytes, tuple[str, Any, Any]] = {}
        receipts: list[tuple[str, list[tuple[int, float]]]] = []
        left: Counter[str] = Counter()
        other: Counter[str] = Counter()
        for member in live:
            got: list[tuple[int, float]] = []
            for at, (what, first, second) in _events_of(member.messages, cache):
                if what == "n":
                    got.append((first, at))
                elif what == "tracks":
                    number = tracks_key.get((first, second))
                    if number is None:
                        other["call.session_participant_updated (not a bench write)"] += 1
                    else:
                        got.append((number, at))
                elif what == "left":
                    left[first] += 1
                else:
                    other[first if what == "other" else f"call.session_participant_{what}"] += 1
            receipts.append((member.call_id, got))
        self._clear()
        summary = summarize_deliveries(acked, write_call, receipts, sent)
        ok_by_kind = Counter(kind_of[number] for number in acked)
        return {
            "writes": len(plan),
            "ok": len(acked),
            "ok_by_kind": dict(ok_by_kind),
            "failed": dict(failed),
            "failed_samples": samples,
            "expected": summary["expected"],
            "delivered": summary["delivered"],
            "duplicates": summary["duplicates"],
            "unexpected": summary["unexpected"],
            "received_before_ack": summary["received_before_ack"],
            "latencies_ms": [ms(lag) for lag in summary["latencies"]],
            "send_latencies_ms": [ms(lag) for lag in summary["send_latencies"]],
            "ack_ms": [ms(acked[number] - sent[number]) for number in acked],
            "left_events": dict(left),
            "other_events": dict(other),
            "first_sent": min(sent.values(), default=0.0),
            "last_ack": max(acked.values(), default=0.0),
            "last_receive": summary["last_receive"],
            "worst_send_lag_ms": ms(worst_lag),
            "drained": drained,
            "drain_seconds": drain_seconds,
        }

    # -- the big join -----------------------------------------------------------------------------

    async def big_join(self, command: dict[str, Any]) -> dict[str, Any]:
        members = [
            _Member(
                index=index,
                call_id=command["call"],
                user_id=user_of(index),
                psid=big_psid_of(index),
                replica=index % len(self.replicas),
            )
            for index in command["indices"]
        ]
        self.big = {member.index: member for member in members}
        joined, failures, samples, skipped = await self._join_all(
            members, command["joiners"], command["deadline"]
        )
        return {"joins": joined, "failed": dict(failures), "failed_samples": samples, "not_started": skipped}

    def events(self) -> dict[str, Any]:
        return {
            "events": sum(m.events for m in self.big.values()) + sum(m.events for m in self.members.values())
        }

    def big_report(self) -> dict[str, Any]:
        cache: dict[bytes, tuple[str, Any, Any]] = {}
        streams = []
        last = 0.0
        for member in self.big.values():
            if member.live <= 0:
                continue
            received = []
            for at, info in _events_of(member.messages, cache):
                if info[0] == "joined":
                    index = big_index_of(info[1])
                    if index is not None:
                        received.append(index)
                        last = max(last, at)
            streams.append([member.index, member.live, received])
        ended = [m.error for m in self.big.values() if m.live > 0 and m.error is not None]
        return {
            "streams": streams,
            "last_joined_event": last,
            "streams_ended": len(ended),
            "ended_samples": sorted({e or "" for e in ended})[:5],
        }

    async def _close(self, members: Iterable[_Member]) -> int:
        tasks = []
        for member in members:
            member.closing = True
            if member.call is not None:
                member.call.cancel()
            if member.task is not None:
                tasks.append(member.task)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        return len(tasks)

    async def big_close(self) -> dict[str, Any]:
        closed = await self._close(self.big.values())
        self.big = {}
        return {"closed": closed}

    async def close(self) -> dict[str, Any]:
        if self.closed:
            return {"closed": 0}
        self.closed = True
        closed = await self._close([*self.members.values(), *self.big.values()])
        for replica in self.replicas:
            await replica.close()
        return {"closed": closed, "cpu_seconds": time.process_time()}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "grow":
            return await self.grow(command)
        if op == "check":
            return await self.check(command)
        if op == "act":
            return await self.act(command)
        if op == "big_join":
            return await self.big_join(command)
        if op == "events":
            return self.events()
        if op == "big_report":
            return self.big_report()
        if op == "big_close":
            return await self.big_close()
        if op == "close":
            return await self.close()
        raise ValueError(f"unknown op {op!r}")


async def _child(args: argparse.Namespace) -> int:
    holder = _Holder(args.target, args.token, args.child, args.children)
    stdin = await _stdin_reader()
    deadline = time.monotonic() + args.max_seconds
    _say("ready")
    try:
        while True:
            try:
                line = await asyncio.wait_for(stdin.readline(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                print("child deadline reached", file=sys.stderr, flush=True)
                break
            if not line:
                break
            command = json.loads(line)
            try:
                reply = await holder.handle(command)
            except Exception as error:
                reply = {"error": f"{command.get('op')}: {type(error).__name__}: {error}"}
            _say(json.dumps(reply, separators=(",", ":")))
            if command["op"] == "close":
                break
    finally:
        await holder.close()
    return 0


# -- parent -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacitySettings:
    populations: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000)
    processes: int = 4  # generator children
    joiners: int = 16  # concurrent joins, all children together
    settle_seconds: float = 10.0
    idle_seconds: float = 20.0
    activity_seconds: float = 30.0
    drain_seconds: float = 20.0
    big_join: int = 1_000
    replicas: int = 2  # PostgreSQL server processes
    quick: bool = False
    # A folder for py-spy profiles of the server(s) in each idle and activity window (None: no profiles).
    profile_dir: str | None = None

    @classmethod
    def quick_settings(cls) -> CapacitySettings:
        return cls(
            populations=(200, 500),
            settle_seconds=3.0,
            idle_seconds=10.0,
            activity_seconds=10.0,
            drain_seconds=10.0,
            big_join=200,
            quick=True,
        )

    def join_limit(self, added: int) -> float:
        """Seconds a population increment gets to join (at least 20 joins/s after a minute)."""
        return 60.0 + added / 20


class _Children:
    """The generator's child processes, with one JSON command / reply exchange at a time."""

    def __init__(self, children: list[_Child]) -> None:
        self.children = children

    async def ask(self, commands: Sequence[dict[str, Any]], within: float) -> list[dict[str, Any]]:
        for child, command in zip(self.children, commands, strict=True):
            child.send(json.dumps(command, separators=(",", ":")))

        async def reply(child: _Child) -> dict[str, Any]:
            line = await child.expect(None, within)
            result: dict[str, Any] = json.loads(line)
            if "error" in result:
                raise BenchError(f"{child.name}: {result['error']}")
            return result

        return list(await asyncio.gather(*(reply(child) for child in self.children)))

    async def ask_all(self, command: dict[str, Any], within: float) -> list[dict[str, Any]]:
        return await self.ask([command] * len(self.children), within)

    def cpu_seconds(self) -> float:
        total = 0.0
        for child in self.children:
            with contextlib.suppress(OSError):
                total += _cpu_seconds(child.proc.pid)
        return total


async def _start_profiles(
    settings: CapacitySettings, pids: Sequence[int], name: str, seconds: float
) -> list[asyncio.subprocess.Process]:
    """py-spy on each server process for `seconds` (nothing unless settings.profile_dir is set)."""
    if not settings.profile_dir:
        return []
    py_spy = Path(sys.executable).parent / "py-spy"
    profiles = []
    for replica, pid in enumerate(pids):
        suffix = f"-server{replica}" if len(pids) > 1 else ""
        output = Path(settings.profile_dir) / f"profile-capacity-{name}{suffix}.speedscope.json"
        profiles.append(
            await asyncio.create_subprocess_exec(
                str(py_spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                "100",
                "--format",
                "speedscope",
                "-o",
                str(output),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )
    return profiles


async def _finish_profiles(profiles: Sequence[asyncio.subprocess.Process]) -> None:
    for profile in profiles:
        try:
            await asyncio.wait_for(profile.wait(), 60)
        except TimeoutError:
            profile.kill()
            await profile.wait()


def _server_cpu(pids: Sequence[int]) -> float:
    return sum(_cpu_seconds(pid) for pid in pids)


def _server_rss_mb(pids: Sequence[int]) -> float:
    return round(sum(proc_status(pid)["VmRSS"] for pid in pids) / 1024, 1)


async def seed(target: str, token: str, users: int, calls: Iterable[str]) -> None:
    """The users (one per participant) and the calls, through the API."""
    metadata = _metadata(token)
    async with grpc.aio.insecure_channel(target) as channel:
        user_stub = user_pb2_grpc.UserServiceStub(channel)
        for start in range(0, users, 100):
            batch = [
                user_pb2.UserRequest(id=user_of(i), name=f"Participant {i}")
                for i in range(start, min(start + 100, users))
            ]
            await user_stub.UpsertUsers(
                user_pb2.UpsertUsersRequest(users=batch), metadata=metadata, timeout=60
            )
        call_stub = call_service_pb2_grpc.CallServiceStub(channel)
        limit = asyncio.Semaphore(64)

        async def create(call_id: str) -> None:
            async with limit:
                await call_stub.GetOrCreateCall(
                    call_service_pb2.GetOrCreateCallRequest(type=CALL_TYPE, id=call_id),
                    metadata=metadata,
                    timeout=60,
                )

        await asyncio.gather(*(create(call_id) for call_id in calls))


async def _live_in_call(target: str, token: str, call_id: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await session_service_pb2_grpc.SessionServiceStub(channel).QueryCallParticipants(
            session_service_pb2.QueryCallParticipantsRequest(type=CALL_TYPE, id=call_id, limit=1),
            metadata=_metadata(token),
            timeout=QUERY_TIMEOUT,
        )
    return int(reply.total_participants)


def _log(tag: str, text: str) -> None:
    print(f"  [{tag} capacity] {text}", flush=True)


async def _big_join(
    children: _Children, settings: CapacitySettings, targets: list[str], pids: list[int], token: str, tag: str
) -> dict[str, Any]:
    count = settings.big_join
    shares = _shares(settings.joiners, len(children.children))
    owned = [list(range(child, count, len(children.children))) for child in range(len(children.children))]
    limit = settings.join_limit(count)
    server_before, load_before, started = _server_cpu(pids), children.cpu_seconds(), time.monotonic()
    replies = await children.ask(
        [
            {
                "op": "big_join",
                "call": BIG_CALL,
                "indices": indices,
                "joiners": joiners,
                "deadline": started + limit,
            }
            for indices, joiners in zip(owned, shares, strict=True)
        ],
        limit + JOIN_TIMEOUT + FIRST_MESSAGE_TIMEOUT + 30,
    )
    busy = time.monotonic() - started
    server_busy = (_server_cpu(pids) - server_before) / busy * 100
    load_busy = (children.cpu_seconds() - load_before) / busy * 100
    joins = [join for reply in replies for join in reply["joins"]]
    failed: Counter[str] = Counter()
    for reply in replies:
        failed.update(reply["failed"])
    not_started = sum(reply["not_started"] for reply in replies)
    first_sent = min((sent for _, sent, _, _ in joins), default=started)
    last_live = max((live for _, _, _, live in joins), default=started)
    # Drain: until no stream got anything for 2 s (every joined event is sent by then), at most 60 s.
    quiet_since = time.monotonic()
    last_total = -1
    drain_end = time.monotonic() + 60
    while time.monotonic() < drain_end:
        total = sum(r["events"] for r in await children.ask_all({"op": "events"}, 30))
        if total != last_total:
            last_total, quiet_since = total, time.monotonic()
        elif time.monotonic() - quiet_since >= 2.0:
            break
        await asyncio.sleep(0.5)
    reports = await children.ask_all({"op": "big_report"}, 120)
    streams = [(index, live, received) for report in reports for index, live, received in report["streams"]]
    deliveries = big_join_deliveries({int(index): sent for index, sent, _, _ in joins}, streams)
    last_event = max((report["last_joined_event"] for report in reports), default=0.0)
    latencies = sorted(ms(live - sent) for _, sent, _, live in joins)
    result = {
        "participants": count,
        "joined": len(joins),
        "failed": dict(failed),
        "failed_samples": sorted({s for reply in replies for s in reply["failed_samples"]})[:5],
        "not_started": not_started,
        "seconds": round(last_live - first_sent, 3),
        "joins_per_second": round(len(joins) / (last_live - first_sent), 1)
        if last_live > first_sent
        else 0.0,
        "join_p50_ms": round(percentile(latencies, 0.5), 2),
        "join_p99_ms": round(percentile(latencies, 0.99), 2),
        "all_joined_events_seconds": round(max(last_event, last_live) - first_sent, 3),
        "joined_events_expected": deliveries["expected"],
        "joined_events_missing": deliveries["missing"],
        "server_cpu_percent": round(server_busy, 1),
        "generator_cpu_percent": round(load_busy, 1),
        "streams_ended": sum(report["streams_ended"] for report in reports),
        "ended_samples": sorted({s for report in reports for s in report["ended_samples"]})[:5],
    }
    _log(
        tag,
        f"big join: {result['joined']:,} of {count:,} joined one call in {result['seconds']:.1f} s "
        f"({result['joins_per_second']:,.0f}/s, join p50 {result['join_p50_ms']:.0f} ms p99 "
        f"{result['join_p99_ms']:.0f} ms); joined events: "
        f"{deliveries['expected'] - deliveries['missing']:,} of {deliveries['expected']:,} owed delivered, "
        f"all within {result['all_joined_events_seconds']:.1f} s; server CPU {server_busy:.0f} %, "
        f"generator CPU {load_busy:.0f} %",
    )
    await children.ask_all({"op": "big_close"}, 120)
    # The streams' end makes their participants leave; wait for it so it does not blur what follows.
    empty_by = time.monotonic() + 180
    remaining = -1
    while time.monotonic() < empty_by:
        remaining = await _live_in_call(targets[0], token, BIG_CALL)
        if remaining == 0:
            break
        await asyncio.sleep(1.0)
    result["left_after_close"] = remaining == 0
    if remaining:
        _log(
            tag, f"big join: {remaining} participants still live in the call 180 s after their streams closed"
        )
    return result


def _non_ok(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    ok: dict[str, float] = {}
    non_ok: dict[str, dict[str, float]] = {}
    for (method, code), value in after.items():
        grew = value - before.get((method, code), 0.0)
        if not grew:
            continue
        if code == "OK":
            ok[method] = ok.get(method, 0.0) + grew
        else:
            non_ok.setdefault(method, {})[code] = grew
    return ok, non_ok


async def _level(
    number: int,
    population: int,
    previous: int,
    children: _Children,
    settings: CapacitySettings,
    pids: list[int],
    handled: Callable[[], dict[tuple[str, str], float]],
    counter: Any,
    tag: str,
) -> dict[str, Any]:
    level: dict[str, Any] = {"population": population}
    added = population - previous
    limit = settings.join_limit(added)
    shares = _shares(settings.joiners, len(children.children))
    server_before, load_before, opened = _server_cpu(pids), children.cpu_seconds(), time.monotonic()
    replies = await children.ask(
        [
            {"op": "grow", "population": population, "joiners": joiners, "deadline": opened + limit}
            for joiners in shares
        ],
        limit + JOIN_TIMEOUT + FIRST_MESSAGE_TIMEOUT + 30,
    )
    busy = time.monotonic() - opened
    server_busy = (_server_cpu(pids) - server_before) / busy * 100
    load_busy = (children.cpu_seconds() - load_before) / busy * 100
    joined = sum(reply["joined"] for reply in replies)
    failed: Counter[str] = Counter()
    for reply in replies:
        failed.update(reply["failed"])
    not_started = sum(reply["not_started"] for reply in replies)
    firsts = [reply["first_sent"] for reply in replies if reply["first_sent"]]
    lasts = [reply["last_live"] for reply in replies if reply["last_live"]]
    wall = (max(lasts) - min(firsts)) if firsts and lasts else time.monotonic() - opened
    latencies = sorted(lat for reply in replies for lat in reply["latencies_ms"])
    level["join"] = {
        "added": added,
        "joined": joined,
        "failed": dict(failed),
        "failed_samples": sorted({s for reply in replies for s in reply["failed_samples"]})[:5],
        "not_started": not_started,
        "seconds": round(wall, 3),
        "per_second": round(joined / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "limit_seconds": limit,
        # While joining: is the server the limit (near 100 % per process), or the generator?
        "server_cpu_percent": round(server_busy, 1),
        "generator_cpu_percent": round(load_busy, 1),
    }
    level["reached"] = joined == added
    _log(
        tag,
        f"{population:,}: +{joined:,} of {added:,} joined in {wall:.1f} s "
        f"({level['join']['per_second']:,.0f}/s, JoinCall → first message "
        f"p50 {level['join']['p50_ms']:.0f} ms p99 {level['join']['p99_ms']:.0f} ms; "
        f"server CPU {server_busy:.0f} %, generator CPU {load_busy:.0f} %)"
        + (f"; failed {dict(failed)}, not started {not_started}" if not level["reached"] else ""),
    )
    if not level["reached"]:
        return level

    await asyncio.sleep(settings.settle_seconds)
    server_before, load_before, at_before = _server_cpu(pids), children.cpu_seconds(), time.monotonic()
    profiles = await _start_profiles(settings, pids, f"{tag}-{population}-idle", settings.idle_seconds)
    await asyncio.sleep(settings.idle_seconds)
    server_after, load_after, at_after = _server_cpu(pids), children.cpu_seconds(), time.monotonic()
    window = at_after - at_before
    await _finish_profiles(profiles)
    check = _combine_checks(await children.ask_all({"op": "check"}, 120 + population / 50))
    level["idle"] = {
        "seconds": round(window, 2),
        "cpu_percent": round((server_after - server_before) / window * 100, 2),
        "rss_mb": _server_rss_mb(pids),
        "generator_cpu_percent": round((load_after - load_before) / window * 100, 2),
        "check": check,
    }
    level["intact_after_idle"] = _intact(check, population)
    _log(
        tag,
        f"{population:,} idle: server CPU {level['idle']['cpu_percent']:.1f} % of a core, RSS "
        f"{level['idle']['rss_mb']:.0f} MB; participants present {check['present']:,} of {population:,}, "
        f"streams ended {check['streams_ended']}",
    )
    if not level["intact_after_idle"]:
        return level

    keys: list[tuple[str | None, str]] = [(None, event_type) for event_type in EVENT_TYPES.values()]
    events_before = await counter.counts(keys)
    handled_before = handled()
    start = time.monotonic() + 1.0
    command = {
        "op": "act",
        "population": population,
        "start": start,
        "seconds": settings.activity_seconds,
        "base": (number + 1) * 100_000_000,
        "drain": settings.drain_seconds,
    }

    async def window_cpu() -> tuple[float, float, float]:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        profiles = await _start_profiles(
            settings, pids, f"{tag}-{population}-activity", settings.activity_seconds
        )
        server0, load0, at0 = _server_cpu(pids), children.cpu_seconds(), time.monotonic()
        await asyncio.sleep(settings.activity_seconds)
        at1 = time.monotonic()
        await _finish_profiles(profiles)
        return (
            (_server_cpu(pids) - server0) / (at1 - at0) * 100,
            (children.cpu_seconds() - load0) / (at1 - at0) * 100,
            at1 - at0,
        )

    within = 5 + settings.activity_seconds + WRITE_TIMEOUT + 10 + settings.drain_seconds + 120
    parts, (server_cpu, load_cpu, _) = await asyncio.gather(children.ask_all(command, within), window_cpu())
    handled_after = handled()
    events_after = await counter.counts(keys)
    activity = combine_activity(parts)
    server_ok, server_non_ok = _non_ok(handled_before, handled_after)
    appended = {key[1]: events_after[key] - events_before[key] for key in keys}
    checks = check_writes(activity["ok_by_kind"], server_ok, server_non_ok, appended)
    activity.update(
        seconds=settings.activity_seconds,
        offered_writes_per_second=population / PERIOD,
        server_cpu_percent=round(server_cpu, 2),
        generator_cpu_percent=round(load_cpu, 2),
        generator_bound=load_cpu >= GENERATOR_BOUND_PERCENT,
        checks=checks,
        checks_passed=checks["passed"],
    )
    level["activity"] = activity
    after = _combine_checks(await children.ask_all({"op": "check"}, 120 + population / 50))
    level["check_after_activity"] = after
    level["intact_after_activity"] = _intact(after, population)
    level["held"] = activity_held(level)
    _log(
        tag,
        f"{population:,} activity: {activity['writes_ok']:,} of {activity['writes']:,} writes OK "
        f"({activity['writes_per_second']:,.0f}/s, offered {population / PERIOD:,.0f}/s), "
        f"{activity['delivered']:,} of {activity['expected_deliveries']:,} deliveries "
        f"({activity['deliveries_per_second']:,.0f}/s), ack → delivery p50 {activity['p50_ms']:.1f} ms p99 "
        f"{activity['p99_ms']:.1f} ms (send → delivery p99 {activity['send_p99_ms']:.1f} ms, write ack p99 "
        f"{activity['ack_p99_ms']:.1f} ms), lost {activity['lost']:,}, failed {activity['writes_failed']:,}, "
        f"server CPU {activity['server_cpu_percent']:.0f} %, "
        f"generator CPU {activity['generator_cpu_percent']:.0f} %; "
        f"writes verified: {checks['passed']}; present after {after['present']:,}, "
        f"streams ended {after['streams_ended']}: {'held' if level['held'] else 'NOT held'}",
    )
    return level


def _combine_checks(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["query_errors"])
    return {
        "calls": sum(p["calls"] for p in parts),
        "expected": sum(p["expected"] for p in parts),
        "present": sum(p["present"] for p in parts),
        "mismatched_calls": sum(p["mismatched_calls"] for p in parts),
        "mismatch_samples": [s for p in parts for s in p["mismatch_samples"]][:3],
        "query_errors": dict(errors),
        "streams_ended": sum(p["streams_ended"] for p in parts),
        "ended_samples": sorted({s for p in parts for s in p["ended_samples"]})[:5],
    }


def _intact(check: dict[str, Any], population: int) -> bool:
    return (
        check["expected"] == population
        and check["present"] == population
        and check["mismatched_calls"] == 0
        and check["streams_ended"] == 0
        and not check["query_errors"]
    )


async def measure_backend(
    backend: str,
    postgres_url: str,
    settings: CapacitySettings,
    server_cpu: str | None,
    load_cpu: str | None,
) -> dict[str, Any]:
    """The capacity scenario on one backend (see the module's docstring), on a fresh database."""
    from tests.bench.servers import (
        callplane,
        free_port,
        handled_counts,
        pin,
        pinned,
        server_token,
        wait_serving,
    )
    from tests.bench.workloads import EventCounter
    from tests.support import new_database

    tag = backend
    token = server_token()
    replicas = settings.replicas if backend == "postgres" else 1
    top = max(settings.populations)
    with tempfile.TemporaryDirectory(prefix=f"callplane-capacity-{backend}-") as tmp:
        folder = Path(tmp)
        async with new_database(backend, folder, postgres_url, prefix="callplane_capacity") as database_url:
            with contextlib.ExitStack() as stack:
                servers = []
                ports = []
                for replica in range(replicas):
                    port = free_port()
                    server = stack.enter_context(
                        callplane(database_url, folder, port, log_name=f"capacity-{replica}.log")
                    )
                    # One at a time: the first creates the schema.
                    await wait_serving(server)
                    servers.append(server)
                    ports.append(port)
                targets = [server.target for server in servers]
                pids = [server.pid for server in servers]
                started = time.monotonic()
                await seed(
                    targets[0],
                    token,
                    max(top, settings.big_join),
                    [call_id_of(c) for c in range(top // PER_CALL)] + [BIG_CALL],
                )
                _log(
                    tag,
                    f"seeded {max(top, settings.big_join):,} users and {top // PER_CALL + 1:,} calls in "
                    f"{time.monotonic() - started:.0f} s; {replicas} server process(es)",
                )
                if server_cpu:
                    for pid in pids:
                        pin(pid, server_cpu)

                def handled() -> dict[tuple[str, str], float]:
                    total: dict[tuple[str, str], float] = {}
                    for port in ports:
                        for key, value in handled_counts(port).items():
                            total[key] = total.get(key, 0.0) + value
                    return total

                result: dict[str, Any] = {
                    "replicas": replicas,
                    "rss_mb_at_start": _server_rss_mb(pids),
                }
                spawned: list[_Child] = []
                try:
                    for number in range(settings.processes):
                        argv = ["child", "--child", str(number), "--children", str(settings.processes)]
                        for target in targets:
                            argv += ["--target", target]
                        spawned.append(
                            await _Child.start(
                                f"capacity child {number}",
                                argv,
                                token,
                                module="tests.bench.capacity",
                                prefix=pinned(load_cpu),
                            )
                        )
                    children = _Children(spawned)
                    await asyncio.gather(*(child.expect("ready", 60) for child in spawned))
                    if settings.big_join:
                        result["big_join"] = await _big_join(children, settings, targets, pids, token, tag)
                    levels: list[dict[str, Any]] = []
                    previous = 0
                    stopped = ""
                    for number, population in enumerate(settings.populations):
                        if stopped:
                            levels.append({"population": population, "not_run": stopped})
                            continue
                        level = await _level(
                            number,
                            population,
                            previous,
                            children,
                            settings,
                            pids,
                            handled,
                            EventCounter(database_url),
                            tag,
                        )
                        levels.append(level)
                        previous = population
                        if not level["reached"]:
                            stopped = (
                                f"{population:,} not reached within {level['join']['limit_seconds']:.0f} s"
                            )
                        elif not level.get("intact_after_idle", False):
                            stopped = f"participants lost at {population:,} while idle"
                        elif not level.get("intact_after_activity", False):
                            stopped = f"participants lost at {population:,} during activity"
                    result["levels"] = levels
                    result["capacity"] = capacity_figure(levels)
                    result["stopped"] = stopped
                    result["rss_mb_at_end"] = _server_rss_mb(pids)
                    await children.ask_all({"op": "close"}, 120)
                    await asyncio.gather(*(child.finish(30) for child in spawned))
                finally:
                    await asyncio.gather(*(child.kill() for child in spawned))
                _log(
                    tag,
                    f"capacity: {result['capacity']:,} participants" + (f" ({stopped})" if stopped else ""),
                )
                return result


def settings_record(settings: CapacitySettings) -> dict[str, Any]:
    record = asdict(settings)
    record["populations"] = list(settings.populations)
    record.update(
        per_call=PER_CALL,
        period_seconds=PERIOD,
        mix={
            "SendCallEvent": 0.5,
            "UpdateParticipant": 0.2,
            "UpdateParticipantCustom": 0.2,
            "UpdateSessionCustom": 0.1,
        },
        per_channel=PER_CHANNEL,
        p99_target_ms=P99_TARGET_MS,
    )
    return record


# -- command line -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.capacity", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    child = commands.add_parser("child", help="a generator child (driven by `python -m tests.bench`)")
    child.add_argument("--target", action="append", required=True, help="a server (repeat: replicas)")
    child.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"default: ${TOKEN_ENV}")
    child.add_argument("--child", type=int, required=True)
    child.add_argument("--children", type=int, required=True)
    child.add_argument("--max-seconds", type=float, default=6 * 3600.0, help="stop by itself after this")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.token:
        parser.error(f"--token (or ${TOKEN_ENV}) is required")
    return runtime.run(_child(args))


if __name__ == "__main__":
    sys.exit(main())
