"""Benchmark output: Markdown tables, the JSON behind them, a PNG chart (the ratios, and the live
capacity's idle CPU and activity latency by population), and the README's results section (between the
bench markers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RPCS = (
    "GetCall",
    "GetOrCreateCall",
    "QueryCalls",
    "QueryCalls broad",
    "QueryCalls selective",
    "QueryCalls selective indexed",
    "QueryMembers",
    "GetCall (2 replicas)",
    "QueryCalls broad (2 replicas)",
    "SendCallEvent",
    "UpdateCall",
    "UpdateParticipantCustom",
    "GetOrCreateCall create",
    "JoinCall+LeaveCall",
    "UpdateCall no-op",
)
ROW_LABELS = {
    "GetOrCreateCall": "GetOrCreateCall (existing call)",
    "QueryCalls": "QueryCalls region eu, priority ≥ 5 by priority desc (declared index region,priority)",
    "QueryCalls broad": "QueryCalls region eu (20 %) by created_at desc, 25 (no declared index)",
    "QueryCalls selective": "QueryCalls owner team-42 (0.1 %) by created_at desc, 25 (no declared index)",
    "QueryCalls selective indexed": (
        "QueryCalls team t-42 (0.1 %) by created_at desc, 25 (declared index team)"
    ),
    "GetCall (2 replicas)": "GetCall on 2 replicas (load split; both servers share CPU 0 when pinned)",
    "QueryCalls broad (2 replicas)": (
        "QueryCalls broad on 2 replicas (load split; both servers share CPU 0 when pinned)"
    ),
    "SendCallEvent": "SendCallEvent (to everyone)",
    "UpdateCall": "UpdateCall (a new set_custom value each time)",
    "UpdateParticipantCustom": "UpdateParticipantCustom (a new value each time)",
    "GetOrCreateCall create": "GetOrCreateCall creating a call with 5 members",
    "JoinCall+LeaveCall": "JoinCall + LeaveCall (pairs/s)",
    "UpdateCall no-op": "UpdateCall that changes nothing",
}
CHART_LABELS = {
    "GetOrCreateCall": "GetOrCreate\n(existing)",
    "QueryCalls": "QueryCalls\n(indexed sort)",
    "QueryCalls broad": "QueryCalls\nbroad",
    "QueryCalls selective": "QueryCalls\nselective",
    "QueryCalls selective indexed": "QueryCalls\nsel. indexed",
    "GetCall (2 replicas)": "GetCall\n(2 replicas)",
    "QueryCalls broad (2 replicas)": "QueryCalls broad\n(2 replicas)",
    "SendCallEvent": "SendCall\nEvent",
    "UpdateParticipantCustom": "UpdatePart.\nCustom",
    "GetOrCreateCall create": "GetOrCreate\n(create, 5 m.)",
    "JoinCall+LeaveCall": "Join+Leave\n(pairs)",
    "UpdateCall no-op": "UpdateCall\n(no-op)",
}
# Ratio to the reference server per backend: reads from issue 5 (SQLite) and issue 13 (PostgreSQL, the
# QueryCalls rows at 100,000 calls), writes from issue 11.
TARGETS: dict[str, dict[str, float]] = {
    "GetCall": {"sqlite": 0.6, "postgres": 0.4},
    "GetOrCreateCall": {"sqlite": 0.5, "postgres": 0.35},
    "QueryCalls": {"sqlite": 0.15},
    "QueryCalls broad": {"sqlite": 0.1, "postgres": 0.1},
    "QueryCalls selective indexed": {"sqlite": 0.15, "postgres": 0.15},
    "QueryMembers": {"sqlite": 0.2, "postgres": 0.3},
    "SendCallEvent": {"sqlite": 0.30, "postgres": 0.20},
    "UpdateCall": {"sqlite": 0.30, "postgres": 0.20},
    "UpdateParticipantCustom": {"sqlite": 0.25, "postgres": 0.15},
    "GetOrCreateCall create": {"sqlite": 0.10, "postgres": 0.07},
    "JoinCall+LeaveCall": {"sqlite": 0.10, "postgres": 0.07},
    "UpdateCall no-op": {"sqlite": 0.6, "postgres": 0.4},
}
FANOUT_P99_TARGET_MS = 50.0
# Issue 13, goal 3: GetCall's p99 under the mixed load with writers ÷ without them (SQLite).
MIXED_P99_RATIO_TARGET = 2.0
IDLE_RSS_TARGET_MB = 300.0
# Issue 12's goals (SQLite, one server process).
CAPACITY_POPULATION_TARGET = 10_000
CAPACITY_IDLE_CPU_TARGET = 5.0  # % of one core, at 10,000 participants
CAPACITY_RSS_TARGET_MB = 1024.0  # at 10,000 participants
CAPACITY_JOIN_RATE_TARGET = 500.0  # JoinCall + WatchCall pairs per second
CAPACITY_P99_TARGET_MS = 100.0
BIG_JOIN_SECONDS_TARGET = 5.0
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
LABELS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def ratio_text(ratio: float) -> str:
    """Two decimals, three below 0.1 (where the slow writes are)."""
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"


def _rpc_cells(entry: dict[str, Any] | None) -> list[str]:
    if entry is None:
        return ["–"] * 4
    return [
        f"{entry['requests_per_second']:,.0f}",
        f"{entry['p50_ms']:.1f}",
        f"{entry['p99_ms']:.1f}",
        f"**{ratio_text(entry['ratio'])}**",
    ]


def _target_cell(name: str) -> str:
    goals = TARGETS.get(name, {})
    if not goals:
        return "–"
    return " / ".join(f"≥ {goals[b]:g}" if b in goals else "–" for b in ("sqlite", "postgres"))


def _rows(results: dict[str, Any]) -> list[str]:
    """The measured rows in table order (rows of an older or partial run only where present)."""
    present = {name for b in results.get("backends", {}).values() for name in b.get("rpcs", {})}
    return [name for name in RPCS if name in present]


def _backend_order(name: str) -> tuple[int, str]:
    order = list(LABELS)
    return (order.index(name) if name in order else len(order), name)


def merge(results: dict[str, Any], previous: dict[str, Any] | None, parts: list[str]) -> dict[str, Any]:
    """This run's results, with the last results (`previous`) of what it did not measure: the RPC part
    when it did not run it, the capacity scenario and the webhook part when it did not run them, and
    their backends it did not run."""
    if not previous:
        return results
    merged = dict(results)
    if "rpcs" not in parts:
        for key in ("date", "machine", "settings", "backends"):
            if key in previous:
                merged[key] = previous[key]
    for part in ("capacity", "webhooks"):
        before = previous.get(part)
        if not before:
            continue
        if part not in parts:
            merged[part] = before
        else:
            now = results[part]
            backends = {**before.get("backends", {}), **now["backends"]}
            merged[part] = {
                **now,
                "backends": {name: backends[name] for name in sorted(backends, key=_backend_order)},
            }
    return merged


def _machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']} GiB, {machine['os']}, "
        f"Python {machine['python']}, grpcio {machine['grpcio']}, SQLite {machine['sqlite']}, "
        f"{machine['event_loop']}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = _rpc_markdown(results) if _rows(results) else []
    live = results.get("capacity")
    if live and live.get("backends"):
        lines += capacity_markdown(live, _machine_line(live.get("machine", results["machine"])))
    hooks = results.get("webhooks")
    if hooks and hooks.get("backends"):
        lines += webhooks_markdown(hooks, _machine_line(hooks.get("machine", results["machine"])))
    return "\n".join(lines)


def _rpc_markdown(results: dict[str, Any]) -> list[str]:
    backends = [b for b in results["backends"] if "rpcs" in results["backends"][b]]
    machine = results["machine"]
    settings = results["settings"]
    load = settings["h2load"]
    gen = settings.get("generator", {})
    pinned = (
        "servers pinned to CPU 0, h2load and the generator to CPU 1 (`taskset`; PostgreSQL itself is not "
        "pinned)"
        if settings.get("pinned")
        else "nothing pinned"
    )
    lines = [
        f"Measured {results['date']} on {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gb']} GiB, {machine['os']}, Python {machine['python']}, "
        f"grpcio {machine['grpcio']}, SQLite {machine['sqlite']}, {machine['event_loop']}; {pinned}. "
        f"{load['seconds']:g} s measured after {load['warm_up_seconds']:g} s warm-up, "
        f"median of {settings['runs']} runs; "
        f"{settings['calls']:,} calls x {settings['members_per_call']} members, {settings['users']:,} users, "
        "seeded through the API (a cached seed reused when the same). "
        f"Load `h2load`: h2load -c {load['clients']} -m {load['streams']} -t {load['threads']}, one request "
        f"body repeated. Load `generator`: tests/bench/generator.py, a new value in every request "
        f"(grpc.aio, raw-bytes bodies, {gen.get('in_flight', '?')} in flight, "
        f"{gen.get('processes', '?')} process(es)). **Every ratio = req/s ÷ the reference server's req/s "
        "under h2load -c 16 -m 16 (bare grpc.aio GetCall) in the same run**, generator rows included; "
        "each write row is checked to have appended its events (the no-op and the reads none). "
        "Targets: SQLite / PostgreSQL.",
        "",
    ]
    header = ["RPC", "load", "target"]
    for backend in backends:
        label = LABELS.get(backend, backend)
        header += [f"{label} req/s", "p50 ms", "p99 ms", "ratio"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name in ("reference", *_rows(results)):
        if name == "reference":
            row = ["reference (bare grpc.aio GetCall)", "h2load", "1"]
        else:
            loader = next(
                (
                    b["rpcs"][name].get("loader", "h2load")
                    for b in results["backends"].values()
                    if name in b["rpcs"]
                ),
                "h2load",
            )
            row = [ROW_LABELS.get(name, name), loader, _target_cell(name)]
        for backend in backends:
            row += _rpc_cells(results["backends"][backend]["rpcs"].get(name))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    generated = [
        name
        for name in _rows(results)
        if any("generator_reference" in b["rpcs"].get(name, {}) for b in results["backends"].values())
    ]
    if generated:
        header = ["generator row"]
        for backend in backends:
            label = LABELS.get(backend, backend)
            header += [
                f"{label}: the generator on the reference",
                "Callplane ÷ it",
                "generator CPU (reference / Callplane run)",
            ]
        lines.append(
            "The generator is not the limit: the same generator, bodies and concurrency against the "
            "reference server (fixed replies of the same types and sizes) in the same run, and the share of "
            "its core it used:"
        )
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name in generated:
            row = [ROW_LABELS.get(name, name)]
            for backend in backends:
                entry = results["backends"][backend]["rpcs"].get(name)
                same = entry.get("generator_reference") if entry else None
                if not entry or not same:
                    row += ["–"] * 3
                    continue
                row += [
                    f"{same['requests_per_second']:,.0f} {entry.get('unit', 'req/s')}",
                    ratio_text(entry["ratio_to_generator_reference"]),
                    f"{same['cpu_share']:.0%} / {entry['generator_cpu_share']:.0%}",
                ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += mixed_markdown(results, backends)
    if any("fanout" in results["backends"][b] for b in backends):
        lines.append("| streams | target | " + " | ".join(LABELS.get(b, b) for b in backends) + " |")
        lines.append("|---|---|" + "---|" * len(backends))
        fan = [results["backends"][b].get("fanout") for b in backends]
        idle = [results["backends"][b].get("idle_watches") for b in backends]
        lines.append(
            f"| fan-out: {settings['watchers']:,} WatchCall streams, {settings['updates_per_second']:g} "
            f"UpdateCall/s for {settings['fanout_seconds']:g} s; updates acknowledged | all | "
            + " | ".join(
                f"{f['updates_acked']:,} of {f['updates_sent']:,}"
                + ("" if f["all_acked"] else " (rest CANCELLED: server overloaded)")
                if f
                else "–"
                for f in fan
            )
            + " |"
        )
        lines.append(
            "| fan-out: events delivered (watchers x acknowledged updates), missing, duplicates | all | "
            + " | ".join(
                f"{f['delivered']:,} of {f['expected_deliveries']:,}, {f['missing']}, {f['duplicates']}"
                if f
                else "–"
                for f in fan
            )
            + " |"
        )
        lines.append(
            "| fan-out: deliveries per second (server) | 100,000 | "
            + " | ".join(f"{f['deliveries_per_second']:,.0f}" if f else "–" for f in fan)
            + " |"
        )
        lines.append(
            "| fan-out latency, write acknowledged → event received: p50 / p99 | p99 ≤ 50 ms | "
            + " | ".join(
                f"{f['latency_ms']['p50']:.1f} / **{f['latency_ms']['p99']:.1f}** ms" if f else "–"
                for f in fan
            )
            + " |"
        )
        lines.append(
            f"| server RSS with {settings['idle_streams']:,} idle WatchCall streams | ≤ 300 MB | "
            + " | ".join(
                f"**{i['rss_with_streams_mb']:.0f} MB** ({i['per_stream_kb']:.1f} KB/stream)" if i else "–"
                for i in idle
            )
            + " |"
        )
        floor = [results["backends"][b].get("idle_watches_reference") for b in backends]
        lines.append(
            "| the same streams on the reference (bare grpc.aio): RSS, KB/stream, Callplane's KB/stream "
            "as a ratio to it | – | "
            + " | ".join(
                f"{f['rss_with_streams_mb']:.0f} MB, {f['per_stream_kb']:.1f} KB/stream, "
                f"{i['per_stream_kb'] / f['per_stream_kb']:.2f}x"
                if f and i and f["per_stream_kb"]
                else "–"
                for f, i in zip(floor, idle, strict=True)
            )
            + " |"
        )
        lines.append("")
    return lines


def mixed_markdown(results: dict[str, Any], backends: list[str]) -> list[str]:
    """The mixed load (reads under writes): GetCall's latency with and without the writers."""
    measured = [b for b in backends if "mixed" in results["backends"][b]]
    if not measured:
        return []
    mixes = [results["backends"][b]["mixed"] for b in measured]
    clients = mixes[0]["clients"]
    lines = [
        f"Reads under writes: {clients} clients, each sending one request after the other, cycling through "
        "GetCall, UpdateCall (a new custom value), QueryCalls (team t-n by created_at desc), "
        "UpdateCallMembers (a new member custom value) and QueryMembers on calls spread over the seeded "
        "ones; then the same clients sending only the three reads. Writes checked in the events table.",
        "",
        "| mixed load | target | " + " | ".join(LABELS.get(b, b) for b in measured) + " |",
        "|---|---|" + "---|" * len(measured),
    ]

    def cell(mix: dict[str, Any], phase: str, method: str) -> str:
        figures = mix[phase].get(method)
        if not figures:
            return "–"
        return (
            f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f} ms ({figures['requests_per_second']:,.0f}/s)"
        )

    for method in ("GetCall", "QueryCalls", "QueryMembers"):
        lines.append(
            f"| {method} p50 / p99, reads only | – | "
            + " | ".join(cell(m, "reads_only", method) for m in mixes)
            + " |"
        )
    for method in ("GetCall", "QueryCalls", "QueryMembers", "UpdateCall", "UpdateCallMembers"):
        lines.append(
            f"| {method} p50 / p99, with the writers | – | "
            + " | ".join(cell(m, "with_writers", method) for m in mixes)
            + " |"
        )
    lines.append(
        f"| **GetCall p99 with the writers ÷ reads only** | ≤ {MIXED_P99_RATIO_TARGET:g} (SQLite) | "
        + " | ".join(
            f"**{m['get_call_p99_ratio']:.2f}**"
            if m.get("get_call_p99_ratio") is not None
            else "not measured (too few GetCalls answered within a phase's window)"
            for m in mixes
        )
        + " |"
    )
    lines.append("")
    return lines


def _level_row(level: dict[str, Any], label: str) -> list[str]:
    population = f"{level['population']:,}"
    if "not_run" in level:
        return [population, label, f"not run ({level['not_run']})", *["–"] * 9]
    join = level["join"]
    joins = f"{join['per_second']:,.0f}"
    if not level["reached"]:
        joins = (
            f"**not reached**: {join['joined']:,} of {join['added']:,} joined in {join['seconds']:.0f} s"
            + (f" (failed: {join['failed']})" if join["failed"] else "")
        )
        return [population, label, "–", "–", joins, *["–"] * 7]
    idle = level["idle"]
    idle_cells = [f"{idle['cpu_percent']:.1f}", f"{idle['rss_mb']:,.0f}"]
    if not level.get("intact_after_idle"):
        check = idle["check"]
        idle_cells[0] += (
            f" (**participants lost while idle**: {check['present']:,} present, "
            f"{check['streams_ended']:,} streams ended)"
        )
    activity = level.get("activity")
    if not activity:
        return [population, label, *idle_cells, joins, *["–"] * 6, f"{idle['generator_cpu_percent']:.0f} / –"]
    lost = f"{activity['lost']:,}"
    if not level.get("intact_after_activity"):
        after = level["check_after_activity"]
        lost += f" ({after['streams_ended']:,} streams ended, {after['present']:,} present after)"
    return [
        population,
        label,
        *idle_cells,
        joins,
        f"{activity['writes_per_second']:,.0f} ({activity['offered_writes_per_second']:,.0f})",
        f"{activity['deliveries_per_second']:,.0f}",
        f"{activity['p50_ms']:.1f} / **{activity['p99_ms']:.1f}** ({activity.get('send_p99_ms', 0):.0f})",
        lost,
        f"{activity['writes_failed']:,}",
        ("yes" if level.get("held") else "**no**")
        + (" (generator at its core's limit: a lower bound)" if activity.get("generator_bound") else ""),
        f"{idle['generator_cpu_percent']:.0f} / {activity['generator_cpu_percent']:.0f}",
    ]


def _capacity_label(backend: str, measured: dict[str, Any]) -> str:
    label = LABELS.get(backend, backend)
    replicas = measured.get("replicas", 1)
    return f"{label} ({replicas} servers)" if replicas > 1 else label


def _big_join_cell(big: dict[str, Any]) -> str:
    cell = f"**{big['seconds']:.1f} s** ({big['joined']:,} joined, {big['joins_per_second']:,.0f}/s"
    if big["not_started"]:
        cell += f"; **{big['not_started']:,} not started** within the time limit"
    if big["failed"]:
        cell += f"; **failed**: {big['failed']}"
    return cell + ")"


def capacity_markdown(live: dict[str, Any], machine: str) -> list[str]:
    backends = list(live["backends"])
    first = live["backends"][backends[0]]
    settings = first.get("settings", live["settings"])
    dates = sorted({live["backends"][b].get("date", live.get("date", "?")) for b in backends})
    pinned = (
        "server processes pinned to CPU 0, the load generator to CPU 1 (`taskset`; PostgreSQL itself "
        "is not pinned)"
        if live.get("pinned")
        else "nothing pinned"
    )
    lines = [
        "**Live capacity** (issue 12): how many connected participants one server holds. "
        f"Measured {' and '.join(dates)} on {machine}; {pinned}. A participant = JoinCall (server token, "
        "its own user) then a WatchCall opened with its `participant_session_id` (the stream holds its "
        f"presence), kept open; {settings['per_call']} per call, users and calls created through the API "
        "beforehand; a fresh database and server per backend (PostgreSQL: "
        f"{settings['replicas']} server processes on one database, participants alternating between them; "
        "CPU and RSS are their sums, PostgreSQL's own processes not counted). Load generator: "
        f"{settings['processes']} processes (grpc.aio, raw-bytes streams parsed after each phase, at most "
        f"{settings['per_channel']} per connection). **Joins**: {settings['joiners']} at a time, rate of "
        "JoinCall + WatchCall pairs (JoinCall sent → the stream's first message) while growing to the "
        f"population. **Idle**: after {settings['settle_seconds']:g} s, server CPU (% of one core) over "
        f"{settings['idle_seconds']:g} s with nothing happening, and RSS; every participant is then checked "
        "present (QueryCallParticipants on every call) with no stream ended. **Activity**: every participant "
        f"acts once per {settings['period_seconds']:g} s on an open-loop schedule spread evenly (50 % "
        "SendCallEvent, 20 % UpdateParticipant tracks, 20 % UpdateParticipantCustom, 10 % "
        f"UpdateSessionCustom) for {settings['activity_seconds']:g} s; each write's event must reach its "
        "call's 5 streams; latency from the write's acknowledgement to each receipt (0 when the event came "
        "first), and from its sending; lost = deliveries owed "
        "- received after a drain; failed = non-OK writes; every OK write checked against the server's own "
        "count (/metrics) and the `events` rows appended. The profile **holds** when the server kept up "
        "(OK writes/s from the first sent to the last acknowledged ≥ 90 % of the offered rate: an event is "
        "published at its write's commit, before the reply, so ack → delivery stays near 0 even when writes "
        f"queue), p99 ≤ {settings['p99_target_ms']:g} ms, nothing lost or failed and every participant "
        "still present afterwards. "
        f"Targets (SQLite): ≤ {CAPACITY_IDLE_CPU_TARGET:g} % of a core and ≤ 1 GB idle at "
        f"{CAPACITY_POPULATION_TARGET:,}; ≥ {CAPACITY_JOIN_RATE_TARGET:,.0f} joins/s; the profile held at "
        f"{CAPACITY_POPULATION_TARGET:,} (1,000 writes/s, 5,000 deliveries/s).",
        "",
    ]
    header = [
        "participants",
        "backend",
        "idle server CPU %",
        "RSS MB",
        "joins/s",
        "writes/s (offered)",
        "deliveries/s",
        "ack → delivery p50 / p99 ms (send → delivery p99)",
        "lost",
        "failed",
        "held",
        "generator CPU % (idle / activity)",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    populations = sorted(
        {level["population"] for b in backends for level in live["backends"][b].get("levels", [])}
    )
    for population in populations:
        for backend in backends:
            measured = live["backends"][backend]
            for level in measured.get("levels", []):
                if level["population"] == population:
                    row = _level_row(level, _capacity_label(backend, measured))
                    lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    figures = []
    for backend in backends:
        measured = live["backends"][backend]
        figure = f"{_capacity_label(backend, measured)} **{measured.get('capacity', 0):,}**"
        if measured.get("stopped"):
            figure += f" (stopped: {measured['stopped']})"
        figures.append(figure)
    lines.append(
        "**Capacity** (the largest population at which the activity profile held): "
        + "; ".join(figures)
        + "."
    )
    lines.append("")
    big = [live["backends"][b].get("big_join") for b in backends]
    if any(big):
        count = next(b["participants"] for b in big if b)
        lines.append(
            f"| big join: {count:,} participants join one call, {settings['joiners']} at a time | target | "
            + " | ".join(_capacity_label(b, live["backends"][b]) for b in backends)
            + " |"
        )
        lines.append("|---|---|" + "---|" * len(backends))
        lines.append(
            "| every stream live (first JoinCall → last stream's first message) | "
            f"≤ {BIG_JOIN_SECONDS_TARGET:g} s | "
            + " | ".join(_big_join_cell(b) if b else "–" for b in big)
            + " |"
        )
        lines.append(
            "| JoinCall sent → the stream's first message: p50 / p99 | – | "
            + " | ".join(f"{b['join_p50_ms']:.0f} / {b['join_p99_ms']:.0f} ms" if b else "–" for b in big)
            + " |"
        )
        lines.append(
            "| joined events owed to streams live before the join: delivered of owed, missing | all | "
            + " | ".join(
                f"{b['joined_events_expected'] - b['joined_events_missing']:,} of "
                f"{b['joined_events_expected']:,}, **{b['joined_events_missing']:,}**"
                if b
                else "–"
                for b in big
            )
            + " |"
        )
        lines.append(
            "| last joined event received (from the first JoinCall) | – | "
            + " | ".join(f"{b['all_joined_events_seconds']:.1f} s" if b else "–" for b in big)
            + " |"
        )
        lines.append("")
    return lines


def _latency_cell(spread: dict[str, float], created: dict[str, float]) -> str:
    return (
        f"{spread['p50']:.1f} / **{spread['p99']:.1f}** ms ({created['p50']:.1f} / {created['p99']:.1f} ms)"
    )


def webhooks_markdown(hooks: dict[str, Any], machine: str) -> list[str]:
    """Webhook delivery (issue 14): throughput and commit → delivery latency per backend."""
    backends = list(hooks["backends"])
    first = hooks["backends"][backends[0]]
    settings = first.get("settings", hooks["settings"])
    dates = sorted({hooks["backends"][b].get("date", hooks.get("date", "?")) for b in backends})
    pinned = (
        "the server pinned to CPU 0, the load generator and the receiver to CPU 1 (`taskset`; PostgreSQL "
        "itself is not pinned)"
        if hooks.get("pinned")
        else "nothing pinned"
    )
    lines = [
        "**Webhooks** (issue 14): events delivered to a local receiver. "
        f"Measured {' and '.join(dates)} on {machine}; {pinned}. Per backend a fresh database with "
        f"{settings['calls']} calls and one endpoint (every event; the server's defaults: "
        f"{settings['endpoint_concurrency']} attempts in flight per endpoint, a call's events one at a time "
        "in order); the receiver, a separate process, is aiohttp.web answering 204 at once; the load is "
        "SendCallEvent (one event each) round-robin over the calls from one grpc.aio process, at full "
        f"speed ({settings['in_flight']} in flight) for {settings['seconds']:g} s and paced "
        f"({' and '.join(f'{rate:g}' for rate in settings['rates'])}/s, open loop) for "
        f"{settings['paced_seconds']:g} s each. Each phase is checked: "
        "every reply OK (the generator's count and the server's /metrics), the `events` rows appended = the "
        "OK replies = the distinct `webhook-id`s received (each `evt_<position>` of its body), every "
        "request's signature verified with `standardwebhooks`, each call's events received in order, and "
        "the endpoint's `delivered_position` at the phase's last event. **Delivered/s** = distinct events "
        "received ÷ (first write acknowledged → last receipt). **Latency** per event at its first receipt: "
        "from the write's OK reply (ack → delivery; the commit came before the reply, so commit → delivery "
        "is at most this plus the reply's way back; 0 when the delivery came first), and in brackets from "
        "the event's `createdAt` (the server's clock inside the write's transaction, just before the commit) "
        "on the same machine's clock.",
        "",
        "| webhooks | " + " | ".join(LABELS.get(b, b) for b in backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    measured = [hooks["backends"][b] for b in backends]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(m) if m else "–" for m in measured) + " |")

    for index, rate in enumerate(settings["rates"]):

        def paced(m: dict[str, Any], index: int = index) -> dict[str, Any]:
            phase: dict[str, Any] = m["paced"][index]
            return phase

        row(
            f"paced {rate:g}/s: writes/s, events delivered/s",
            lambda m, paced=paced: (
                f"{paced(m)['writes_per_second']:,.0f}, {paced(m)['delivered_per_second']:,.0f}"
            ),
        )
        row(
            f"paced {rate:g}/s: ack → delivery p50 / **p99** (createdAt → delivery p50 / p99)",
            lambda m, paced=paced: _latency_cell(
                paced(m)["ack_to_delivery_ms"], paced(m)["created_to_delivery_ms"]
            ),
        )
    row(
        "writes/s at full speed without an endpoint (the write path's own rate) / with it",
        lambda m: f"{m['no_endpoint']['writes_per_second']:,.0f} / {m['full']['writes_per_second']:,.0f}",
    )
    row("full speed: **events delivered/s**", lambda m: f"**{m['full']['delivered_per_second']:,.0f}**")
    row(
        "full speed: ack → delivery p50 / **p99** (createdAt → delivery p50 / p99)",
        lambda m: _latency_cell(m["full"]["ack_to_delivery_ms"], m["full"]["created_to_delivery_ms"]),
    )
    row(
        "full speed: backlog when the writes ended, drained in (its rate)",
        lambda m: (
            f"{m['full']['backlog_at_writes_end']:,} events, {m['full']['drain_seconds']:.1f} s "
            f"({m['full'].get('drained_per_second', 0):,.0f}/s)"
        ),
    )
    row(
        "replay: the full-speed phase's events sent again (RedeliverWebhook) while nothing is written: "
        "**events delivered/s**",
        lambda m: (
            f"**{m['replay']['delivered_per_second']:,.0f}** ({m['replay']['events_received']:,} events)"
            if "replay" in m
            else "–"
        ),
    )

    def phases(m: dict[str, Any]) -> list[dict[str, Any]]:
        return [*m["paced"], m["full"]]  # the replay's events are the full phase's again

    def total(m: dict[str, Any], figure: str) -> int:
        return sum(int(p["checks"][figure] if figure in p["checks"] else p[figure]) for p in phases(m))

    row(
        "checked (all phases with the endpoint): events appended = distinct received; repeated receipts; "
        "signatures verified; out of order",
        lambda m: (
            f"{total(m, 'events_appended'):,} = {total(m, 'events_received'):,}; "
            f"{total(m, 'repeated_receipts')}; {total(m, 'signatures_verified'):,}; "
            f"{total(m, 'out_of_order')}"
        ),
    )
    rates = " / ".join(f"paced {rate:g}/s" for rate in settings["rates"])
    row(
        f"server CPU % of a core: no endpoint / {rates} / full speed / replay; generator / receiver CPU % "
        "at full speed",
        lambda m: (
            f"{m['no_endpoint']['server_cpu_percent']:.0f} / "
            + " / ".join(f"{p['server_cpu_percent']:.0f}" for p in m["paced"])
            + f" / {m['full']['server_cpu_percent']:.0f} / "
            + (f"{m['replay']['server_cpu_percent']:.0f}" if "replay" in m else "–")
            + f"; {m['full']['generator_cpu_percent']:.0f} / {m['full']['receiver_cpu_percent']:.0f}"
        ),
    )
    row(
        "the machine's load average (1 min) before / after (other work on the same 2 cores shows here)",
        lambda m: f"{m['load_average'][0]:.1f} / {m['load_average'][1]:.1f}" if "load_average" in m else "–",
    )
    lines.append("")
    return lines


def missed_targets(results: dict[str, Any]) -> list[str]:
    missed = []
    for backend, measured in results.get("backends", {}).items():
        for name, goals in TARGETS.items():
            entry = measured.get("rpcs", {}).get(name)
            if entry is not None and backend in goals and entry["ratio"] < goals[backend]:
                missed.append(
                    f"{LABELS.get(backend, backend)} {name} {entry['ratio']:.3f} < {goals[backend]}"
                )
    missed += _missed_capacity(results)
    sqlite = results.get("backends", {}).get("sqlite")
    if sqlite is None:
        return missed
    mix = sqlite.get("mixed")
    if mix and mix.get("get_call_p99_ratio") is None:
        missed.append("mixed load: SQLite GetCall p99 not measured (too few GetCalls answered in a window)")
    elif mix and mix["get_call_p99_ratio"] > MIXED_P99_RATIO_TARGET:
        missed.append(
            f"mixed load: SQLite GetCall p99 with writers {mix['get_call_p99_ratio']:.2f}x the reads-only p99"
        )
    fan = sqlite.get("fanout")
    if fan and (fan["latency_ms"]["p99"] > FANOUT_P99_TARGET_MS or fan["missing"] or not fan["all_acked"]):
        missed.append(
            f"fan-out p99 {fan['latency_ms']['p99']:.1f} ms, {fan['updates_acked']} of {fan['updates_sent']} "
            f"updates acknowledged, {fan['missing']} missing"
        )
    idle = sqlite.get("idle_watches")
    if idle and idle["rss_with_streams_mb"] > IDLE_RSS_TARGET_MB:
        missed.append(f"idle watches RSS {idle['rss_with_streams_mb']:.0f} MB")
    return missed


def _missed_capacity(results: dict[str, Any]) -> list[str]:
    sqlite = (results.get("capacity") or {}).get("backends", {}).get("sqlite")
    if not sqlite:
        return []
    missed = []
    if sqlite.get("capacity", 0) < CAPACITY_POPULATION_TARGET:
        missed.append(f"capacity {sqlite.get('capacity', 0):,} < {CAPACITY_POPULATION_TARGET:,}")
    for level in sqlite.get("levels", []):
        if level.get("reached") and level["join"]["per_second"] < CAPACITY_JOIN_RATE_TARGET:
            missed.append(f"joins {level['join']['per_second']:,.0f}/s growing to {level['population']:,}")
        idle = level.get("idle")
        if idle and level["population"] == CAPACITY_POPULATION_TARGET:
            if idle["cpu_percent"] > CAPACITY_IDLE_CPU_TARGET:
                missed.append(f"idle CPU {idle['cpu_percent']:.1f} % at {level['population']:,}")
            if idle["rss_mb"] > CAPACITY_RSS_TARGET_MB:
                missed.append(f"idle RSS {idle['rss_mb']:,.0f} MB at {level['population']:,}")
    big = sqlite.get("big_join")
    if big and (big["seconds"] > BIG_JOIN_SECONDS_TARGET or big["joined_events_missing"]):
        missed.append(
            f"big join {big['seconds']:.1f} s, {big['joined_events_missing']:,} joined events missing"
        )
    return missed


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = results.get("capacity") or {}
    has_live = any(b.get("levels") for b in live.get("backends", {}).values())
    if _rows(results) and has_live:
        figure = plt.figure(figsize=(13, 9), dpi=120)
        grid = figure.add_gridspec(2, 2, height_ratios=[5, 4])
        _ratio_panel(figure.add_subplot(grid[0, :]), results)
        _capacity_panels(figure.add_subplot(grid[1, 0]), figure.add_subplot(grid[1, 1]), live)
    elif has_live:
        figure, (idle_axes, p99_axes) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=120)
        _capacity_panels(idle_axes, p99_axes, live)
    else:
        figure, axes = plt.subplots(figsize=(13, 5), dpi=120)
        _ratio_panel(axes, results)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _capacity_panels(idle_axes: Any, p99_axes: Any, live: dict[str, Any]) -> None:
    """Idle server CPU and activity p99 by population, one line per backend."""
    for backend, measured in live["backends"].items():
        label = _capacity_label(backend, measured)
        idle = [
            (lv["population"], lv["idle"]["cpu_percent"]) for lv in measured.get("levels", []) if "idle" in lv
        ]
        busy = [
            (lv["population"], max(lv["activity"]["p99_ms"], 0.1))
            for lv in measured.get("levels", [])
            if "activity" in lv
        ]
        if idle:
            idle_axes.plot(*zip(*idle, strict=True), marker="o", label=label)
        if busy:
            (line,) = p99_axes.plot(*zip(*busy, strict=True), marker="o", label=f"{label}: ack → delivery")
            sent = [
                (lv["population"], max(lv["activity"].get("send_p99_ms", 0.0), 0.1))
                for lv in measured.get("levels", [])
                if "activity" in lv
            ]
            p99_axes.plot(
                *zip(*sent, strict=True),
                marker=".",
                linestyle="dotted",
                color=line.get_color(),
                label=f"{label}: send → delivery",
            )
    idle_axes.axhline(CAPACITY_IDLE_CPU_TARGET, color="black", linestyle="dashed", linewidth=0.8)
    idle_axes.set_xlabel("connected participants")
    idle_axes.set_ylabel("idle server CPU, % of one core")
    idle_axes.set_title("Live capacity: idle cost (dashed: target at 10,000)")
    idle_axes.set_ylim(bottom=0)
    idle_axes.legend(loc="upper left")
    p99_axes.axhline(CAPACITY_P99_TARGET_MS, color="black", linestyle="dashed", linewidth=0.8)
    p99_axes.set_yscale("log")
    p99_axes.set_xlabel("connected participants (each acting once per 10 s)")
    p99_axes.set_ylabel("p99 latency to each watcher, ms (0 drawn at 0.1)")
    p99_axes.set_title("Live capacity: activity latency (dashed: 100 ms)")
    p99_axes.legend(loc="best", fontsize=8)


def _ratio_panel(axes: Any, results: dict[str, Any]) -> None:
    backends = [b for b in results["backends"] if "rpcs" in results["backends"][b]]
    rows = _rows(results)
    width = 0.8 / max(len(backends), 1)
    positions = range(len(rows))
    for index, backend in enumerate(backends):
        measured = results["backends"][backend]["rpcs"]
        offsets = [p + (index - (len(backends) - 1) / 2) * width for p in positions]
        ratios = [measured[name]["ratio"] if name in measured else 0.0 for name in rows]
        bars = axes.bar(offsets, ratios, width, label=LABELS.get(backend, backend))
        axes.bar_label(bars, labels=[ratio_text(r) for r in ratios], fontsize=7)
        for offset, name in zip(offsets, rows, strict=True):
            goal = TARGETS.get(name, {}).get(backend)
            if goal is not None:
                axes.hlines(goal, offset - width / 2, offset + width / 2, colors="black", linestyles="dashed")
    axes.set_xticks(list(positions), [CHART_LABELS.get(name, name) for name in rows], fontsize=8)
    axes.set_ylabel("throughput ÷ reference (bare grpc.aio, h2load)")
    axes.set_title(f"Callplane vs the transport's limit ({results['date']}; dashed: each backend's target)")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.legend(loc="upper left")
    mixes = [
        f"{LABELS.get(b, b)} {results['backends'][b]['mixed']['get_call_p99_ratio']:.2f}x"
        for b in backends
        if results["backends"][b].get("mixed", {}).get("get_call_p99_ratio") is not None
    ]
    if mixes:
        axes.text(
            0.99,
            0.97,
            "mixed load: GetCall p99 with writers ÷ reads only (target ≤ "
            f"{MIXED_P99_RATIO_TARGET:g}): " + ", ".join(mixes),
            transform=axes.transAxes,
            horizontalalignment="right",
            verticalalignment="top",
            fontsize=8,
        )


def write(results: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "latest.json", folder / "latest.md", folder / "latest.png"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text(markdown(results))
    chart(results, paths[2])
    return paths


def update_readme(results: dict[str, Any], readme: Path) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    body = markdown(results) + "\n![benchmark chart](tests/bench/results/latest.png)\n"
    readme.write_text(f"{head}{README_START}\n{body}{README_END}{tail}")
