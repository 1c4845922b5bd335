"""Stream property tests (acceptance 2), in the style of etcd's robustness tests: concurrent writers on
several calls while watchers (WatchCall and SubscribeEvents) disconnect, resume from their last seen
seq/position and lag, all at random (seeded). Every history is recorded and then validated against the
final log:

- ordered: within a stream segment keys (seq / position) strictly increase;
- unique: across all of a watcher's segments no event appears twice;
- gap-free and complete ("reliable" + "resumable"): each segment equals the log, filtered like the
  stream, over the range it covered, and the segments together cover the log from the watcher's start
  to the end without a hole; payloads equal the log's;
- progress: a progress message never claims more than was delivered (nothing later in the stream is at
  or below it), so it is a safe resume point;
- snapshot: a snapshot's state is the state the log implies at snapshot.seq;
- writes: every acknowledged write's event is in the log exactly once; a rejected write left nothing;
- commit order: a reader tailing the log by cursor (as the server does) never sees position N+1 before
  N: with concurrent writers on PostgreSQL this is what per-call locking and the position counter buy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, json_format

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.events import hub as hub_module
from callplane_server.store.events import StoredEvent
from tests.support import BACKENDS, RunningServer, running_server, struct

SEED = 20260101
CALLS = 3
USERS = 6
WRITERS = 4
OPS_PER_WRITER = 25
CATCH_UP_TIMEOUT = 60.0
#: Every watcher asks for progress (50 ms), so progress messages are checked too, and a watcher that has
#: everything learns it is done without waiting for an event.
PROGRESS = duration_pb2.Duration(nanos=50_000_000)


def tokens_of(event: event_pb2.Event) -> list[str]:
    """The write tokens an event carries (a writer puts a unique `op` in the custom data it writes)."""
    kind = event.WhichOneof("payload")
    if kind in ("call_created", "call_updated"):
        call = getattr(event, kind).call
        op = json_format.MessageToDict(call.custom).get("op")
        return [op] if kind == "call_updated" and op else []
    if kind in ("call_member_added", "call_member_updated"):
        found = []
        for member in getattr(event, kind).members:
            op = json_format.MessageToDict(member.custom).get("op")
            if op:
                found.append(op)
        return found
    return []


# -- recording ------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One connection of a watcher: what it asked for and everything it received, in order."""

    request: str
    start: int | None = None  # keys after this one are covered (None: not known yet)
    events: list[event_pb2.Event] = field(default_factory=list)
    progress: list[tuple[int, int]] = field(default_factory=list)  # (events received so far, progress seq)
    snapshot: event_service_pb2.CallSnapshot | None = None
    ended_by: str = ""


@dataclass
class WatcherHistory:
    name: str
    kind: str  # "call" or "firehose"
    cid: str = ""
    call_cids: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    segments: list[Segment] = field(default_factory=list)

    def key(self, event: event_pb2.Event) -> int:
        return event.seq if self.kind == "call" else event.position

    def matches(self, event: event_pb2.Event) -> bool:
        if self.kind == "call":
            return event.call_cid == self.cid
        return (not self.call_cids or event.call_cid in self.call_cids) and (
            not self.event_types or event.type in self.event_types
        )

    @property
    def last_key(self) -> int | None:
        for segment in reversed(self.segments):
            if segment.events:
                return self.key(segment.events[-1])
            if segment.start is not None:
                return segment.start
        return None


class Watcher:
    """Follows one stream, disconnecting, resuming and lagging at random."""

    def __init__(
        self, history: WatcherHistory, stub: event_service_pb2_grpc.EventServiceStub, rng: random.Random
    ) -> None:
        self.history = history
        self.stub = stub
        self.rng = rng
        self.target: int | None = None  # set when the writers are done: the last key it must reach
        self.reached = asyncio.Event()

    def _open(self, resume: int | None, mode: str) -> grpc.aio.UnaryStreamCall:
        h = self.history
        if h.kind == "call":
            call_type, call_id = h.cid.split(":", 1)
            request = event_service_pb2.WatchCallRequest(
                type=call_type, id=call_id, progress_interval=PROGRESS
            )
            if mode == "snapshot":
                request.snapshot = True
            elif resume is not None:
                request.after_seq = resume
            return self.stub.WatchCall(request)
        request = event_service_pb2.SubscribeEventsRequest(
            call_cids=list(h.call_cids), event_types=list(h.event_types), progress_interval=PROGRESS
        )
        if resume is not None:
            request.after_position = resume
        return self.stub.SubscribeEvents(request)

    def _check_done(self) -> None:
        last = self.history.last_key
        if self.target is not None and last is not None and last >= self.target:
            self.reached.set()

    async def run(self, first_mode: str) -> None:
        h = self.history
        mode = first_mode  # "snapshot", "start" (after 0) or "now" (unset)
        while not self.reached.is_set():
            resume = h.last_key
            if resume is None and mode == "start":
                resume = 0
            segment = Segment(request=f"{mode if resume is None else f'after {resume}'}")
            if resume is not None:
                segment.start = resume
            h.segments.append(segment)
            call = self._open(resume, mode if resume is None else "resume")
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        segment.ended_by = "eof"
                        raise AssertionError(f"{h.name}: the server ended a watch stream")
                    kind = message.WhichOneof("message")
                    if kind == "snapshot":
                        segment.snapshot = message.snapshot
                        segment.start = message.snapshot.seq
                    elif kind == "progress":
                        if segment.start is None:
                            segment.start = message.progress.seq
                        segment.progress.append((len(segment.events), message.progress.seq))
                    else:
                        if segment.start is None:
                            # From now, before any progress: the stream covers at least from here.
                            segment.start = h.key(message.event) - 1
                        segment.events.append(message.event)
                    self._check_done()
                    if self.reached.is_set():
                        segment.ended_by = "done"
                        break
                    roll = self.rng.random()
                    if roll < 0.04 and segment.start is not None:
                        segment.ended_by = "disconnect"
                        break
                    if roll < 0.16:
                        await asyncio.sleep(self.rng.uniform(0, 0.03))  # lag
            finally:
                call.cancel()
            mode = "resume"
            if self.rng.random() < 0.3:
                await asyncio.sleep(self.rng.uniform(0, 0.02))  # stay away a little


# -- validation -----------------------------------------------------------------------------------------


def validate_history(history: WatcherHistory, log: list[event_pb2.Event]) -> None:
    """etcd-style validators for one watcher against the full log (all events, position order)."""
    name = history.name
    expected = [e for e in log if history.matches(e)]
    by_key = {history.key(e): e for e in expected}
    seen: Counter[int] = Counter()
    covered_until: int | None = None
    for index, segment in enumerate(history.segments):
        where = f"{name} segment {index} ({segment.request})"
        if not segment.events and segment.start is None:
            continue  # disconnected before anything arrived: covers nothing
        assert segment.start is not None, where
        keys = [history.key(e) for e in segment.events]
        # ordered
        assert all(a < b for a, b in itertools.pairwise(keys)), f"{where}: not ordered: {keys}"
        # gap-free and complete over the range it covered
        end = keys[-1] if keys else segment.start
        want = [history.key(e) for e in expected if segment.start < history.key(e) <= end]
        assert keys == want, f"{where}: got {keys}, the log has {want} after {segment.start}"
        # payloads are the log's
        for event in segment.events:
            assert event == by_key[history.key(event)], f"{where}: event {history.key(event)} differs"
        # progress is a safe resume point
        for received, mark in segment.progress:
            if received:
                assert mark >= keys[received - 1], f"{where}: progress {mark} behind delivered {keys}"
            later = keys[received:]
            assert not later or later[0] > mark, f"{where}: event {later[0]} after progress {mark}"
            if history.kind == "call":
                assert mark == (keys[received - 1] if received else segment.start), where
        # resumable: each resume continues exactly where the previous segment left off
        if covered_until is not None and segment.request.startswith("after"):
            assert segment.start == covered_until, f"{where}: resumed at {segment.start}, had {covered_until}"
        seen.update(keys)
        covered_until = end
    # unique across the whole watcher
    twice = [key for key, count in seen.items() if count > 1]
    assert not twice, f"{name}: received twice: {twice}"
    # complete: from the first segment's start to the final key, every matching event was received
    starts = [s.start for s in history.segments if s.start is not None]
    if starts:
        first = starts[0]
        want = [history.key(e) for e in expected if history.key(e) > first]
        assert sorted(seen) == want, f"{name}: missing {sorted(set(want) - set(seen))} after {first}"


def validate_snapshot(history: WatcherHistory, log: list[event_pb2.Event]) -> None:
    """The snapshot's call custom data is the one of the last call.created/updated at or before its seq."""
    for segment in history.segments:
        if segment.snapshot is None:
            continue
        snapshot = segment.snapshot
        state: dict[str, Any] | None = None
        for event in log:
            if event.call_cid == history.cid and event.seq <= snapshot.seq:
                kind = event.WhichOneof("payload")
                if kind in ("call_created", "call_updated"):
                    state = json_format.MessageToDict(getattr(event, kind).call.custom)
        assert state == json_format.MessageToDict(snapshot.call.custom), (
            f"{history.name}: snapshot at {snapshot.seq} shows {snapshot.call.custom}, the log {state}"
        )


def validate_log(log: list[event_pb2.Event], cids: list[str]) -> None:
    positions = [e.position for e in log]
    assert positions == list(range(positions[0], positions[0] + len(positions))), "positions have gaps"
    for cid in cids:
        seqs = [e.seq for e in log if e.call_cid == cid]
        assert seqs == list(range(1, len(seqs) + 1)), f"{cid}: seqs {seqs}"


# -- the test -------------------------------------------------------------------------------------------


@dataclass
class WriteOutcomes:
    acknowledged: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


async def writer(
    number: int,
    running: RunningServer,
    call_ids: list[str],
    user_ids: list[str],
    rng: random.Random,
    outcomes: WriteOutcomes,
) -> None:
    calls = call_service_pb2_grpc.CallServiceStub(running.channel)

    async def attempt(token: str | list[str], rpc: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
        tokens = [token] if isinstance(token, str) else token
        rejectable = bool(getattr(request, "etag", ""))
        try:
            result = await rpc(request)
        except grpc.aio.AioRpcError as error:
            if rejectable and error.code() == grpc.StatusCode.ABORTED:
                outcomes.rejected.extend(tokens)
                return None
            outcomes.unknown.extend(tokens)
            raise
        assert not rejectable, f"{tokens}: a stale etag was accepted"
        outcomes.acknowledged.extend(tokens)
        return result

    def update(call_id: str, token: str, etag: str = "") -> call_service_pb2.UpdateCallRequest:
        return call_service_pb2.UpdateCallRequest(
            type="default", id=call_id, set_custom=struct({"op": token, "w": number}), etag=etag
        )

    for op in range(OPS_PER_WRITER):
        token = f"w{number}-{op}"
        call_id = rng.choice(call_ids)
        roll = rng.random()
        if roll < 0.45:
            await attempt(token, calls.UpdateCall, update(call_id, token))
        elif roll < 0.8:
            # One or two members added or updated, sometimes others removed: up to three events in
            # one transaction, which a tiny subscriber queue cannot hold.
            chosen = rng.sample(user_ids, rng.choice((1, 2)))
            remove = [u for u in user_ids if u not in chosen and rng.random() < 0.15]
            request = call_service_pb2.UpdateCallMembersRequest(
                type="default",
                id=call_id,
                update_members=[
                    call_pb2.MemberRequest(user_id=user_id, custom=struct({"op": f"{token}/{user_id}"}))
                    for user_id in chosen
                ],
                remove_members=remove,
            )
            await attempt([f"{token}/{u}" for u in chosen], calls.UpdateCallMembers, request)
        else:
            # A write that must be rejected (its etag is made stale by our own update in between) and
            # leave nothing in the log.
            first = await attempt(f"{token}a", calls.UpdateCall, update(call_id, f"{token}a"))
            await attempt(f"{token}b", calls.UpdateCall, update(call_id, f"{token}b"))
            await attempt(f"{token}c", calls.UpdateCall, update(call_id, f"{token}c", first.call.etag))
        if rng.random() < 0.2:
            await asyncio.sleep(rng.uniform(0, 0.01))


async def tail_log_by_cursor(running: RunningServer, stop: asyncio.Event, seen: list[int]) -> None:
    """Reads the log by `position > cursor` as fast as it can; records every position in read order."""
    store = running.server.store
    assert store is not None
    cursor = 0
    while True:
        done = stop.is_set()
        batch: list[StoredEvent] = await store.read(
            lambda tx, after=cursor: tx.events.events_after_position(after, 1000)
        )
        for stored in batch:
            seen.append(stored.position)
            cursor = stored.position
        if done and not batch:
            return
        await asyncio.sleep(0)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_watchers_that_disconnect_resume_and_lag_see_exactly_the_log(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = SEED + BACKENDS.index(backend)
    rng = random.Random(seed)
    overflows = Counter[str]()
    original_offer = hub_module.Subscription.offer

    def counting_offer(self: hub_module.Subscription, item: StoredEvent) -> None:
        was = self.overflowed
        original_offer(self, item)
        if self.overflowed and not was:
            overflows["overflow"] += 1

    monkeypatch.setattr(hub_module.Subscription, "offer", counting_offer)

    # A tiny queue so bursts overflow it and streams catch up from the log; fast progress allowed.
    async with running_server(
        backend, tmp_path, event_queue_size=2, min_progress_interval_seconds=0.01
    ) as running:
        calls = call_service_pb2_grpc.CallServiceStub(running.channel)
        users = user_pb2_grpc.UserServiceStub(running.channel)
        events = event_service_pb2_grpc.EventServiceStub(running.channel)
        user_ids = [f"u{n}" for n in range(USERS)]
        await users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=u) for u in user_ids])
        )
        call_ids = [f"prop-{n}" for n in range(CALLS)]
        cids = [f"default:{c}" for c in call_ids]
        for call_id in call_ids:
            await calls.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(
                    type="default", id=call_id, data=call_service_pb2.CallData(custom=struct({"op": "init"}))
                )
            )

        histories = [
            WatcherHistory("watch-0-snapshot", "call", cid=cids[0]),
            WatcherHistory("watch-1-start", "call", cid=cids[1]),
            WatcherHistory("watch-2-now", "call", cid=cids[2]),
            WatcherHistory("watch-0-now", "call", cid=cids[0]),
            WatcherHistory("firehose-all", "firehose"),
            WatcherHistory("firehose-two-calls", "firehose", call_cids=(cids[0], cids[2])),
            WatcherHistory(
                "firehose-members", "firehose", event_types=("call.member_added", "call.member_removed")
            ),
        ]
        modes = ["snapshot", "start", "now", "now", "start", "now", "start"]
        watchers = [Watcher(h, events, random.Random(rng.random())) for h in histories]
        watch_tasks = [
            asyncio.create_task(w.run(mode), name=w.history.name)
            for w, mode in zip(watchers, modes, strict=True)
        ]
        tail_stop = asyncio.Event()
        tailed: list[int] = []
        tailer = asyncio.create_task(tail_log_by_cursor(running, tail_stop, tailed))
        await asyncio.sleep(0.2)  # let the "now" watchers set up (they may also start later; both fine)

        outcomes = WriteOutcomes()
        await asyncio.gather(
            *(
                writer(n, running, call_ids, user_ids, random.Random(rng.random()), outcomes)
                for n in range(WRITERS)
            )
        )
        tail_stop.set()
        await tailer

        store = running.server.store
        assert store is not None
        log = [s.event for s in await store.read(lambda tx: tx.events.events_after_position(0, 100_000))]
        for watcher in watchers:
            h = watcher.history
            keys = [h.key(e) for e in log if h.matches(e)]
            watcher.target = keys[-1] if keys else 0
            watcher._check_done()
        try:
            done, pending = await asyncio.wait(watch_tasks, timeout=CATCH_UP_TIMEOUT)
            for task in done:
                task.result()  # a watcher that failed fails the test
            assert not pending, f"seed {seed}: watchers did not catch up: {[t.get_name() for t in pending]}"
        finally:
            for task in watch_tasks:
                task.cancel()
            for task in watch_tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    context = f"seed {seed}, backend {backend}"
    # the log itself: gap-free positions and per-call seqs
    validate_log(log, cids)
    # every acknowledged write is in the log exactly once; rejected writes left nothing
    written = Counter(token for event in log for token in tokens_of(event))
    assert not outcomes.unknown, f"{context}: writes failed unexpectedly: {outcomes.unknown}"
    for token in outcomes.acknowledged:
        assert written[token] == 1, f"{context}: write {token} appears {written[token]} times: " + str(
            [(e.call_cid, e.seq, e.type) for e in log if token in tokens_of(e)]
        )
    for token in outcomes.rejected:
        assert written[token] == 0, f"{context}: rejected write {token} is in the log"
    assert set(written) == set(outcomes.acknowledged), context
    assert outcomes.rejected, f"{context}: no rejected write was exercised"
    # commit order: a cursor reader never saw a later position before an earlier one
    assert tailed == list(range(1, len(tailed) + 1)), f"{context}: the log tail skipped or reordered"
    assert tailed[-1] == log[-1].position
    # the watchers
    for history in histories:
        validate_history(history, log)
        validate_snapshot(history, log)
    reconnects = sum(len(h.segments) - 1 for h in histories)
    assert reconnects >= len(histories), f"{context}: too few reconnects ({reconnects}) to mean anything"
    assert overflows["overflow"] > 0, f"{context}: no queue overflowed; the catch-up path went untested"
    print(  # shown with -s: how much the run exercised
        f"{context}: {len(log)} events, {len(outcomes.acknowledged)} writes "
        f"({len(outcomes.rejected)} rejected), {reconnects} reconnects, {overflows['overflow']} overflows"
    )


# -- the validators catch what they should --------------------------------------------------------------


def _event(cid: str, seq: int, position: int) -> event_pb2.Event:
    return event_pb2.Event(call_cid=cid, seq=seq, position=position, type="call.updated")


def test_validators_reject_gaps_duplicates_and_disorder() -> None:
    log = [_event("default:a", n, n) for n in range(1, 7)]
    good = WatcherHistory("good", "call", cid="default:a")
    good.segments = [
        Segment("start", start=0, events=log[0:2]),
        Segment("after 2", start=2, events=log[2:6], progress=[(4, 6)]),
    ]
    validate_history(good, log)

    gap = WatcherHistory("gap", "call", cid="default:a")
    gap.segments = [Segment("start", start=0, events=[log[0], log[2]])]
    with pytest.raises(AssertionError, match="the log has"):
        validate_history(gap, log)

    twice = WatcherHistory("twice", "call", cid="default:a")
    twice.segments = [
        Segment("start", start=0, events=log[0:3]),
        Segment("after 2", start=2, events=log[2:6]),
    ]
    with pytest.raises(AssertionError, match="resumed at 2, had 3"):
        validate_history(twice, log)

    disorder = WatcherHistory("disorder", "call", cid="default:a")
    disorder.segments = [Segment("start", start=0, events=[log[1], log[0]])]
    with pytest.raises(AssertionError, match="not ordered"):
        validate_history(disorder, log)

    incomplete = WatcherHistory("incomplete", "call", cid="default:a")
    incomplete.segments = [
        Segment("start", start=0, events=log[0:2]),
        Segment("after 3", start=3, events=log[3:6]),
    ]
    with pytest.raises(AssertionError):
        validate_history(incomplete, log)

    early_progress = WatcherHistory("progress", "call", cid="default:a")
    early_progress.segments = [Segment("start", start=0, events=log[0:3], progress=[(1, 2)])]
    with pytest.raises(AssertionError, match="after progress"):
        validate_history(early_progress, log)

    altered = _event("default:a", 3, 3)
    altered.type = "call.ended"
    changed = WatcherHistory("changed", "call", cid="default:a")
    changed.segments = [Segment("start", start=0, events=[log[0], log[1], altered])]
    with pytest.raises(AssertionError, match="differs"):
        validate_history(changed, log)
