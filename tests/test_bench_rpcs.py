"""The RPC benchmark's pure parts (tests/bench/): the seeded custom data the QueryCalls rows count on, the
seed cache's key, the mixed load's requests and the report of the issue-13 rows. The benchmark itself runs
in `make bench`, not here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from callplane.v1 import call_service_pb2
from tests.bench import mixed, report, seeding, servers, workloads


def test_seeded_custom_data_gives_the_query_rows_their_selectivity() -> None:
    calls = 10_000
    customs = [servers.custom_for(i) for i in range(calls)]
    regions = Counter(c["region"] for c in customs)
    assert regions[workloads.BROAD_REGION] == calls // 5 and len(regions) == 5
    owners = Counter(c["owner"] for c in customs)
    teams = Counter(c["team"] for c in customs)
    assert len(owners) == len(teams) == servers.OWNERS
    assert owners[workloads.SELECTIVE_OWNER] == teams[workloads.SELECTIVE_TEAM] == calls // 1000
    # The rows' filters name those values, sorted newest first.
    assert workloads.QUERY_CALLS_SELECTIVE.filter_conditions["custom.owner"] == workloads.SELECTIVE_OWNER
    assert (
        workloads.QUERY_CALLS_SELECTIVE_INDEXED.filter_conditions["custom.team"] == workloads.SELECTIVE_TEAM
    )
    assert [s.field for s in workloads.QUERY_CALLS_BROAD.sort] == ["created_at"]
    # team is declared as an index on the bench server; owner and region alone are not.
    assert "team:string" in servers.CUSTOM_INDEXES
    assert not any(spec.startswith("owner") for spec in servers.CUSTOM_INDEXES)


def _migration(folder: Path, revision: str, down: str | None) -> None:
    down_text = f'"{down}"' if down else "None"
    (folder / f"{revision}_x.py").write_text(
        f'revision: str = "{revision}"\ndown_revision: str | None = {down_text}\n'
    )


def test_seed_key_follows_the_parameters_and_the_schema_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert seeding.alembic_heads()  # the repository's own migrations have a head
    _migration(tmp_path, "0001", None)
    _migration(tmp_path, "0002", "0001")
    assert seeding.alembic_heads(tmp_path) == ["0002"]
    monkeypatch.setattr(seeding, "MIGRATIONS", tmp_path)
    params = {"calls": 1000, "users": 100, "members_per_call": 5}
    key = seeding.seed_key(**params)
    assert seeding.seed_key(**params) == key
    assert seeding.seed_key(**{**params, "calls": 2000}) != key
    _migration(tmp_path, "0003", "0002")  # a new migration: the cached seed is not reused
    assert seeding.alembic_heads(tmp_path) == ["0003"]
    assert seeding.seed_key(**params) != key


def test_mixed_load_writes_change_something_every_time_on_calls_spread_out() -> None:
    calls, users = 1000, 100
    indexes = set()
    for n in range(50):
        method, request = mixed.requests("GetCall", n, calls, users)
        assert method.endswith("/GetCall")
        assert isinstance(request, call_service_pb2.GetCallRequest)
        indexes.add(request.id)
    assert len(indexes) == 50
    bodies = {mixed.requests("UpdateCall", n, calls, users)[1].SerializeToString() for n in range(20)}
    assert len(bodies) == 20
    _, members = mixed.requests("UpdateCallMembers", 7, calls, users)
    assert isinstance(members, call_service_pb2.UpdateCallMembersRequest)
    (member,) = members.update_members
    assert member.custom["mix_n"] == 7
    assert set(mixed.READS) < set(mixed.MIX) and set(mixed.WRITES) == set(mixed.MIX) - set(mixed.READS)


def _entry(ratio: float) -> dict[str, Any]:
    return {"requests_per_second": 1000 * ratio, "p50_ms": 1.0, "p99_ms": 2.0, "ratio": ratio, "runs": []}


def _mix(ratio: float | None) -> dict[str, Any]:
    figures = {"requests_per_second": 100.0, "p50_ms": 5.0, "p99_ms": 10.0}
    return {
        "clients": 50,
        "reads_only": {m: figures for m in mixed.READS},
        "with_writers": {m: {**figures, "p99_ms": 10.0 * (ratio or 0)} for m in mixed.MIX},
        "get_call_p99_ratio": ratio,
    }


def test_report_shows_the_issue_13_rows_and_the_mixed_load(tmp_path: Path) -> None:
    rows = {
        "reference": _entry(1.0),
        "GetCall": _entry(0.7),
        "QueryCalls broad": _entry(0.05),
        "QueryCalls selective": _entry(0.2),
        "QueryCalls selective indexed": _entry(0.3),
    }
    results = {
        "date": "2026-01-02",
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
        "settings": {
            "h2load": {"clients": 16, "streams": 16, "threads": 1, "seconds": 5, "warm_up_seconds": 1},
            "runs": 3,
            "calls": 100_000,
            "users": 1000,
            "members_per_call": 5,
            "pinned": True,
        },
        "backends": {
            "sqlite": {"rpcs": rows, "mixed": _mix(3.0)},
            "postgres": {
                "rpcs": {
                    **rows,
                    "GetCall (2 replicas)": _entry(0.5),
                    "QueryCalls broad (2 replicas)": _entry(0.2),
                },
                "mixed": _mix(1.5),
            },
        },
    }
    text = report.markdown(results)
    assert "100,000 calls x 5 members" in text
    for name in (
        "QueryCalls broad",
        "QueryCalls selective",
        "QueryCalls selective indexed",
        "GetCall (2 replicas)",
        "QueryCalls broad (2 replicas)",
    ):
        assert report.ROW_LABELS[name] in text
    assert "| **GetCall p99 with the writers ÷ reads only** | ≤ 2 (SQLite) | **3.00** | **1.50** |" in text
    missed = report.missed_targets(results)
    unmeasured = {**results, "backends": {"sqlite": {"rpcs": rows, "mixed": _mix(None)}}}
    assert "not measured (too few GetCalls answered" in report.markdown(unmeasured)
    assert any("p99 not measured" in m for m in report.missed_targets(unmeasured))
    assert "SQLite QueryCalls broad 0.050 < 0.1" in missed
    assert any(m.startswith("mixed load: SQLite GetCall p99") for m in missed)
    assert report._rows(results)[:6] == [
        "GetCall",
        "QueryCalls broad",
        "QueryCalls selective",
        "QueryCalls selective indexed",
        "GetCall (2 replicas)",
        "QueryCalls broad (2 replicas)",
    ]
    pytest.importorskip("matplotlib")  # the chart: `make bench` installs the bench extra
    paths = report.write(results, tmp_path)
    assert all(p.stat().st_size for p in paths)
