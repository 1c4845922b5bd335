"""The live-capacity benchmark's pure parts (tests/bench/capacity.py, report.py): its plan, how it matches
events to writes, and how it counts deliveries and decides that a population held. The benchmark itself
runs in `make bench`, not here."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from google.protobuf import struct_pb2

from callplane.v1 import event_pb2, event_service_pb2, session_pb2
from tests.bench import capacity, report


def _event(**payload: Any) -> bytes:
    return event_service_pb2.WatchCallResponse(event=event_pb2.Event(**payload)).SerializeToString()


def _custom(values: dict[str, Any]) -> struct_pb2.Struct:
    custom = struct_pb2.Struct()
    custom.update(values)
    return custom


def test_schedule_spreads_every_participant_once_per_period_with_the_mix() -> None:
    population = 100
    plan = capacity.schedule(range(population), population, start=1000.0, seconds=30.0, base=500)
    assert len(plan) == 3 * population
    assert [w.due for w in plan] == sorted(w.due for w in plan)
    assert len({w.number for w in plan}) == len(plan)
    assert Counter(w.participant for w in plan) == dict.fromkeys(range(population), 3)
    # Evenly spread: one write every PERIOD / population seconds.
    gaps = {round(b.due - a.due, 9) for a, b in itertools.pairwise(plan)}
    assert gaps == {capacity.PERIOD / population}
    for round_start in range(0, len(plan), population):
        kinds = Counter(w.kind for w in plan[round_start : round_start + population])
        assert kinds == {"reaction": 50, "tracks": 20, "participant_custom": 20, "session_custom": 10}
    # A participant's kind rotates from one action to the next.
    first = [w.kind for w in plan if w.participant == 7]
    assert first == [capacity.KINDS[7], capacity.KINDS[8], capacity.KINDS[9]]


def test_schedule_of_a_child_is_its_share_of_the_whole_plan() -> None:
    population = 50
    whole = capacity.schedule(range(population), population, start=0.0, seconds=20.0, base=0)
    owned = [
        p
        for call in capacity.owned_calls(1, 4, population)
        for p in range(call * capacity.PER_CALL, (call + 1) * capacity.PER_CALL)
    ]
    part = capacity.schedule(owned, population, start=0.0, seconds=20.0, base=0)
    assert part == [w for w in whole if w.participant in set(owned)]
    assert capacity.owned_calls(1, 4, population) == [1, 5, 9]


def test_track_sets_change_every_time_and_differ_for_fifteen_updates() -> None:
    sets = [tuple(capacity.tracks_for(count)) for count in range(15)]
    assert len(set(sets)) == 15
    assert all(sets)
    # In the server's canonical order (the enum's), so the event carries the same tuple.
    assert all(list(s) == sorted(s) for s in sets)
    assert capacity.tracks_for(15) == capacity.tracks_for(0)


def test_identify_matches_each_kind_of_event_to_its_write() -> None:
    assert capacity.identify(
        _event(type="custom", custom=event_pb2.CustomEvent(custom=_custom({"bench_n": 7})))
    ) == (
        "n",
        7,
        None,
    )
    participant = session_pb2.Participant(
        participant_session_id="cap-p00003",
        custom=_custom({"bench_n": 9}),
        published_tracks=[session_pb2.TRACK_TYPE_AUDIO, session_pb2.TRACK_TYPE_VIDEO],
    )
    assert capacity.identify(
        _event(
            type="call.participant_custom_updated",
            call_participant_custom_updated=event_pb2.ParticipantEvent(participant=participant),
        )
    ) == ("n", 9, None)
    # A tracks update carries the participant's custom data too: matched by its tracks, not by that.
    assert capacity.identify(
        _event(
            type="call.session_participant_updated",
            call_session_participant_updated=event_pb2.ParticipantEvent(participant=participant),
        )
    ) == ("tracks", "cap-p00003", (1, 2))
    assert capacity.identify(
        _event(
            type="call.session_custom_updated",
            call_session_custom_updated=event_pb2.SessionCustomEvent(custom=_custom({"bench_n": 11})),
        )
    ) == ("n", 11, None)
    assert capacity.identify(
        _event(
            type="call.session_participant_joined",
            call_session_participant_joined=event_pb2.ParticipantEvent(participant=participant),
        )
    ) == ("joined", "cap-p00003", None)
    assert capacity.identify(
        _event(
            type="call.session_participant_left",
            call_session_participant_left=event_pb2.ParticipantEvent(
                participant=participant, reason="lease_expired"
            ),
        )
    ) == ("left", "lease_expired", None)
    assert capacity.identify(_event(type="custom", custom=event_pb2.CustomEvent(custom=_custom({})))) == (
        "other",
        "custom",
        None,
    )
    assert capacity.big_index_of("big-p00042") == 42
    assert capacity.big_index_of("cap-p00042") is None


def test_deliveries_count_each_write_once_per_stream_of_its_call() -> None:
    acked = {1: 10.0, 2: 11.0, 3: 12.0}
    calls = {1: "a", 2: "a", 3: "b", 4: "a"}  # 4 failed: not acknowledged
    receipts = [
        ("a", [(1, 10.5), (2, 10.9), (2, 11.2), (4, 13.0)]),  # 2 arrives before its ack, then again
        ("a", [(1, 10.1)]),  # 2 lost on this stream
        ("b", [(3, 12.25), (1, 12.3)]),  # 1 is not b's
    ]
    summary = capacity.summarize_deliveries(acked, calls, receipts, sent={1: 9.9, 2: 10.8, 3: 12.0, 4: 12.9})
    assert summary["expected"] == 2 + 2 + 1
    assert summary["delivered"] == 4
    assert summary["lost"] == 1
    assert summary["duplicates"] == 1
    assert summary["unexpected"] == 2
    assert summary["received_before_ack"] == 1
    assert sorted(round(x, 3) for x in summary["latencies"]) == [0.0, 0.1, 0.25, 0.5]
    assert sorted(round(x, 3) for x in summary["send_latencies"]) == [0.1, 0.2, 0.25, 0.6]
    assert summary["last_receive"] == 12.25


def test_big_join_owes_each_join_to_the_streams_live_before_it_was_sent() -> None:
    sent = {0: 1.0, 1: 2.0, 2: 3.0}
    streams = [
        (0, 1.5, [1, 2]),  # live before 1 and 2 were sent: owed both
        (1, 2.5, []),  # owed 2's: missing
        (2, 3.5, [0]),  # nothing owed (extra receipts are fine)
    ]
    assert capacity.big_join_deliveries(sent, streams) == {"expected": 3, "missing": 1}


def _part(**changes: Any) -> dict[str, Any]:
    part: dict[str, Any] = {
        "writes": 10,
        "ok": 10,
        "expected": 50,
        "delivered": 50,
        "duplicates": 0,
        "unexpected": 0,
        "received_before_ack": 0,
        "failed": {},
        "failed_samples": [],
        "ok_by_kind": {"reaction": 5, "tracks": 2, "participant_custom": 2, "session_custom": 1},
        "left_events": {},
        "other_events": {},
        "latencies_ms": [1.0] * 49 + [5.0],
        "send_latencies_ms": [2.0] * 50,
        "ack_ms": [3.0] * 10,
        "first_sent": 100.0,
        "last_ack": 110.0,
        "last_receive": 110.0,
        "worst_send_lag_ms": 1.0,
        "drained": True,
        "drain_seconds": 0.1,
    }
    part.update(changes)
    return part


def _level(population: int, activity: dict[str, Any], intact: bool = True) -> dict[str, Any]:
    level = {"population": population, "activity": activity, "intact_after_activity": intact}
    level["held"] = capacity.activity_held(level)
    return level


def test_activity_holds_only_with_low_p99_nothing_lost_or_failed_and_everyone_present() -> None:
    good = capacity.combine_activity([_part(), _part()])
    assert good["writes_ok"] == 20 and good["delivered"] == 100 and good["lost"] == 0
    assert good["writes_per_second"] == 2.0
    assert good["p99_ms"] == 5.0
    offered = {"checks_passed": True, "offered_writes_per_second": 2.0}
    good.update(offered)
    slow = capacity.combine_activity([_part(latencies_ms=[150.0] * 50)]) | offered
    lost = capacity.combine_activity([_part(delivered=49)]) | offered
    failed = capacity.combine_activity([_part(failed={"DEADLINE_EXCEEDED": 1})]) | offered
    unverified = capacity.combine_activity([_part()]) | {**offered, "checks_passed": False}
    # The last ack came 5 s late (the writes queued): 20 writes in 15 s instead of 10.
    behind = capacity.combine_activity([_part(), _part(last_ack=115.0)]) | offered
    assert lost["lost"] == 1 and failed["writes_failed"] == 1
    levels = [
        _level(1000, good),
        _level(2000, good, intact=False),
        _level(3000, slow),
        _level(4000, lost),
        _level(5000, failed),
        _level(6000, unverified),
        _level(7000, behind),
    ]
    assert [level["held"] for level in levels] == [True, False, False, False, False, False, False]
    assert capacity.capacity_figure(levels) == 1000
    assert capacity.capacity_figure([{"population": 10, "not_run": "x"}]) == 0


def test_writes_count_as_verified_only_when_the_server_and_the_events_table_agree() -> None:
    ok_by_kind = {"reaction": 5, "tracks": 2, "participant_custom": 2, "session_custom": 1}
    server_ok = {capacity.METHODS[kind]: float(count) for kind, count in ok_by_kind.items()}
    appended = {capacity.EVENT_TYPES[kind]: count for kind, count in ok_by_kind.items()}
    assert capacity.check_writes(ok_by_kind, server_ok, {}, appended)["passed"]
    short = dict(appended, custom=4)
    assert not capacity.check_writes(ok_by_kind, server_ok, {}, short)["passed"]
    assert not capacity.check_writes({}, {}, {}, {})["passed"]


def _results(capacity_backends: dict[str, Any], date: str = "2026-01-02") -> dict[str, Any]:
    return {
        "date": date,
        "machine": {
            "cores": 2,
            "cpu": "cpu",
            "memory_gb": 1,
            "os": "os",
            "python": "3",
            "grpcio": "1",
            "sqlite": "3",
            "event_loop": "uvloop",
        },
        "settings": {},
        "backends": {},
        "capacity": {
            "date": date,
            "settings": capacity.settings_record(capacity.CapacitySettings()),
            "pinned": True,
            "backends": capacity_backends,
        },
    }


def test_report_renders_reached_unreached_and_skipped_populations() -> None:
    activity = capacity.combine_activity([_part()]) | {
        "checks_passed": True,
        "offered_writes_per_second": 100.0,
        "generator_cpu_percent": 3.0,
    }
    idle = {"cpu_percent": 12.5, "rss_mb": 300.0, "generator_cpu_percent": 1.0, "check": {}}
    join = {"per_second": 80.0, "joined": 1000, "added": 1000, "seconds": 12.0, "failed": {}}
    held = {
        "population": 1000,
        "reached": True,
        "join": join,
        "idle": idle,
        "intact_after_idle": True,
        "activity": activity,
        "intact_after_activity": True,
        "held": True,
    }
    unreached = {
        "population": 2000,
        "reached": False,
        "join": {**join, "joined": 400, "added": 1000, "failed": {"DEADLINE_EXCEEDED": 3}},
    }
    skipped = {"population": 5000, "not_run": "2,000 not reached within 110 s"}
    sqlite = {
        "replicas": 1,
        "capacity": 1000,
        "stopped": skipped["not_run"],
        "levels": [held, unreached, skipped],
    }
    sqlite["big_join"] = {
        "participants": 1000,
        "joined": 900,
        "failed": {},
        "not_started": 100,
        "seconds": 110.0,
        "joins_per_second": 8.2,
        "join_p50_ms": 900.0,
        "join_p99_ms": 3000.0,
        "joined_events_expected": 400_000,
        "joined_events_missing": 0,
        "all_joined_events_seconds": 111.0,
    }
    text = report.markdown(_results({"sqlite": sqlite}))
    assert "**110.0 s** (900 joined, 8/s; **100 not started** within the time limit)" in text
    assert "| 1,000 | SQLite | 12.5 | 300 | 80 | 1 (100) |" in text
    assert "**not reached**: 400 of 1,000 joined in 12 s" in text
    assert "| 5,000 | SQLite | not run (2,000 not reached within 110 s) |" in text
    assert "SQLite **1,000** (stopped: 2,000 not reached within 110 s)" in text
    assert "capacity 1,000 < 10,000" in report.missed_targets(_results({"sqlite": sqlite}))


def test_merge_keeps_what_this_run_did_not_measure() -> None:
    previous = _results({"sqlite": {"capacity": 1}, "postgres": {"capacity": 2}}, date="2026-01-01")
    previous["backends"] = {"sqlite": {"rpcs": {"GetCall": {}}}}
    only_capacity = _results({"sqlite": {"capacity": 3}}, date="2026-01-05")
    previous["machine"] = {**previous["machine"], "cpu": "the one the RPC part ran on"}
    merged = report.merge(only_capacity, previous, ["capacity"])
    assert merged["backends"] == previous["backends"] and merged["date"] == "2026-01-01"
    assert merged["machine"] == previous["machine"]
    assert merged["capacity"]["backends"] == {"sqlite": {"capacity": 3}, "postgres": {"capacity": 2}}
    assert list(merged["capacity"]["backends"]) == ["sqlite", "postgres"]
    only_rpcs = {**_results({}, date="2026-01-05"), "backends": {"sqlite": {"rpcs": {}}}}
    del only_rpcs["capacity"]
    merged = report.merge(only_rpcs, previous, ["rpcs"])
    assert merged["capacity"] == previous["capacity"] and merged["backends"] == only_rpcs["backends"]
    assert report.merge(only_rpcs, None, ["rpcs"]) is only_rpcs
