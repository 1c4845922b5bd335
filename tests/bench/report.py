"""Benchmark output: a Markdown table, the JSON behind it, a PNG chart of the ratios, and the README's
results section (between the bench markers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RPCS = ("GetCall", "GetOrCreateCall", "UpdateCall", "QueryCalls", "QueryMembers")
# Ratio to the reference server, SQLite (issue 5).
TARGETS = {"GetCall": 0.6, "GetOrCreateCall": 0.5, "UpdateCall": 0.3, "QueryCalls": 0.15, "QueryMembers": 0.2}
FANOUT_P99_TARGET_MS = 50.0
IDLE_RSS_TARGET_MB = 300.0
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
LABELS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def _rpc_cells(entry: dict[str, Any] | None) -> list[str]:
    if entry is None:
        return ["–"] * 4
    return [
        f"{entry['requests_per_second']:,.0f}",
        f"{entry['p50_ms']:.1f}",
        f"{entry['p99_ms']:.1f}",
        f"**{entry['ratio']:.2f}**",
    ]


def markdown(results: dict[str, Any]) -> str:
    backends = list(results["backends"])
    machine = results["machine"]
    settings = results["settings"]
    load = settings["h2load"]
    lines = [
        f"Measured {results['date']} on {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gb']} GiB, {machine['os']}, Python {machine['python']}, "
        f"grpcio {machine['grpcio']}, SQLite {machine['sqlite']}, {machine['event_loop']}. "
        f"h2load -c {load['clients']} -m {load['streams']} -t {load['threads']}, "
        f"{load['seconds']:g} s after {load['warm_up_seconds']:g} s warm-up, "
        f"median of {settings['runs']} runs; "
        f"{settings['calls']:,} calls x {settings['members_per_call']} members, {settings['users']:,} users. "
        "Ratio = req/s ÷ the reference server's req/s in the same run.",
        "",
    ]
    header = ["RPC", "target (SQLite)"]
    for backend in backends:
        label = LABELS.get(backend, backend)
        header += [f"{label} req/s", "p50 ms", "p99 ms", "ratio"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name in ("reference", *RPCS):
        target = "1" if name == "reference" else f"≥ {TARGETS[name]}"
        row = ["reference (bare grpc.aio GetCall)" if name == "reference" else name, target]
        for backend in backends:
            row += _rpc_cells(results["backends"][backend]["rpcs"].get(name))
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
    sqlite = results["backends"].get("sqlite")
    if sqlite is None:
        return []
    missed = [
        f"{name} {sqlite['rpcs'][name]['ratio']:.2f} < {target}"
        for name, target in TARGETS.items()
        if sqlite["rpcs"][name]["ratio"] < target
    ]
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
    width = 0.8 / max(len(backends), 1)
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=120)
    positions = range(len(RPCS))
    for index, backend in enumerate(backends):
        ratios = [results["backends"][backend]["rpcs"][name]["ratio"] for name in RPCS]
        bars = axes.bar(
            [p + (index - (len(backends) - 1) / 2) * width for p in positions],
            ratios,
            width,
            label=LABELS.get(backend, backend),
        )
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    for position, name in zip(positions, RPCS, strict=True):
        axes.hlines(TARGETS[name], position - 0.45, position + 0.45, colors="black", linestyles="dashed")
    axes.set_xticks(list(positions), RPCS)
    axes.set_ylabel("throughput ÷ reference (bare grpc.aio)")
    axes.set_title(f"Callplane vs the transport's limit ({results['date']}; dashed: SQLite target)")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.legend()
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
