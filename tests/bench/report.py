"""Benchmark output: a Markdown table, the JSON behind it, a PNG chart of the ratios, and the README's
results section (between the bench markers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RPCS = (
    "GetCall",
    "GetOrCreateCall",
    "QueryCalls",
    "QueryMembers",
    "SendCallEvent",
    "UpdateCall",
    "UpdateParticipantCustom",
    "GetOrCreateCall create",
    "JoinCall+LeaveCall",
    "UpdateCall no-op",
)
ROW_LABELS = {
    "GetOrCreateCall": "GetOrCreateCall (existing call)",
    "SendCallEvent": "SendCallEvent (to everyone)",
    "UpdateCall": "UpdateCall (a new set_custom value each time)",
    "UpdateParticipantCustom": "UpdateParticipantCustom (a new value each time)",
    "GetOrCreateCall create": "GetOrCreateCall creating a call with 5 members",
    "JoinCall+LeaveCall": "JoinCall + LeaveCall (pairs/s)",
    "UpdateCall no-op": "UpdateCall that changes nothing",
}
CHART_LABELS = {
    "GetOrCreateCall": "GetOrCreate\n(existing)",
    "SendCallEvent": "SendCall\nEvent",
    "UpdateParticipantCustom": "UpdatePart.\nCustom",
    "GetOrCreateCall create": "GetOrCreate\n(create, 5 m.)",
    "JoinCall+LeaveCall": "Join+Leave\n(pairs)",
    "UpdateCall no-op": "UpdateCall\n(no-op)",
}
# Ratio to the reference server per backend: reads from issue 5 (SQLite only), writes from issue 11.
TARGETS: dict[str, dict[str, float]] = {
    "GetCall": {"sqlite": 0.6},
    "GetOrCreateCall": {"sqlite": 0.5},
    "QueryCalls": {"sqlite": 0.15},
    "QueryMembers": {"sqlite": 0.2},
    "SendCallEvent": {"sqlite": 0.30, "postgres": 0.20},
    "UpdateCall": {"sqlite": 0.30, "postgres": 0.20},
    "UpdateParticipantCustom": {"sqlite": 0.25, "postgres": 0.15},
    "GetOrCreateCall create": {"sqlite": 0.10, "postgres": 0.07},
    "JoinCall+LeaveCall": {"sqlite": 0.10, "postgres": 0.07},
    "UpdateCall no-op": {"sqlite": 0.6, "postgres": 0.4},
}
FANOUT_P99_TARGET_MS = 50.0
IDLE_RSS_TARGET_MB = 300.0
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
    present = {name for b in results["backends"].values() for name in b["rpcs"]}
    return [name for name in RPCS if name in present]


def markdown(results: dict[str, Any]) -> str:
    backends = list(results["backends"])
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
        f"{settings['calls']:,} calls x {settings['members_per_call']} members, {settings['users']:,} users. "
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
    return "\n".join(lines)


def missed_targets(results: dict[str, Any]) -> list[str]:
    missed = []
    for backend, measured in results["backends"].items():
        for name, goals in TARGETS.items():
            entry = measured["rpcs"].get(name)
            if entry is not None and backend in goals and entry["ratio"] < goals[backend]:
                missed.append(
                    f"{LABELS.get(backend, backend)} {name} {entry['ratio']:.3f} < {goals[backend]}"
                )
    sqlite = results["backends"].get("sqlite")
    if sqlite is None:
        return missed
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


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(results["backends"])
    rows = _rows(results)
    width = 0.8 / max(len(backends), 1)
    figure, axes = plt.subplots(figsize=(13, 5), dpi=120)
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
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


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
    body = markdown(results) + "\n![ratios](tests/bench/results/latest.png)\n"
    readme.write_text(f"{head}{README_START}\n{body}{README_END}{tail}")
