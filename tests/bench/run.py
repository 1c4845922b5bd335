"""`make bench`: Callplane against the transport's own limit, on SQLite and PostgreSQL.

For each backend: a database seeded through the API (100,000 calls with 5 members and custom data, 1,000
users; the seed cached and reused while the same, see tests/bench/seeding.py), then the rows of
tests/bench/workloads.py, interleaved with the reference server (bare
grpc.aio answering fixed replies), 3 runs each, median reported, with the servers pinned to CPU 0 and the
load on CPU 1. Reads, SendCallEvent and the no-op UpdateCall go through h2load (one body, repeated);
writes whose every request must differ (UpdateCall, UpdateParticipantCustom, GetOrCreateCall creating a
call, JoinCall + LeaveCall) through tests/bench/generator.py, which also runs against the reference in
the same run to show it is not the limit. Every ratio is to the reference under h2load -c16 -m16 (GetCall);
generator rows also show their ratio to the reference under the same generator. Every reply must be OK by
the server's own count (/metrics), and each write row must have appended the events its OK replies owe
(counted in the `events` table); the no-op and the reads must append none. On PostgreSQL, GetCall and the
broad QueryCalls again with a second server on the same database and the load split over both. Then the
mixed load (tests/bench/mixed.py): GetCall's p99 under reads and writes ÷ under the reads alone. Then
event fan-out (1,000
WatchCall streams on one call, 100 UpdateCalls/s for 10 s) and server RSS with 10,000 idle watch
streams. Then the live-capacity scenario (tests/bench/capacity.py: connected participants holding presence
with WatchCall, idle cost, join rate, an activity profile, one big join), on a fresh database with its own
server (on PostgreSQL two replicas). Then webhook delivery (tests/bench/webhooks.py: events/s delivered
to a local receiver and commit → delivery latency, at full speed and at a paced rate, and the write rate
without an endpoint), on a fresh small database with its own server. Writes Markdown, JSON and a PNG
chart, and the README's results section. `--only capacity` (or `--only rpcs`, `--only webhooks`, or a
comma-separated list) runs those parts and keeps the others' last results.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from callplane.v1 import call_service_pb2, call_service_pb2_grpc
from callplane_server import runtime
from tests.bench import (
    capacity,
    fanout,
    generator,
    h2load,
    mixed,
    otlp_sink,
    report,
    seeding,
    webhooks,
    workloads,
)
from tests.bench.servers import (
    CALL_TYPE,
    REPO,
    call_id,
    callplane,
    free_port,
    handled_counts,
    pin,
    reference,
    server_token,
    wait_serving,
)
from tests.bench.stats import proc_status

RESULTS_DIR = REPO / "tests" / "bench" / "results"
#: What `--only` can choose: the RPC rows with fan-out and idle streams, the live-capacity scenario, and
#: webhook delivery.
PARTS = ("rpcs", "capacity", "webhooks")
#: Where --quick writes (small runs never overwrite the committed results).
QUICK_OUTPUT = Path(tempfile.gettempdir()) / "callplane-bench-quick"
MEMBERS_PER_CALL = 5


def _non_ok(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], method: str) -> dict:
    delta: dict[str, float] = {}
    for (name, code), value in after.items():
        if name == method:
            delta[code] = value - before.get((name, code), 0.0)
    return {code: count for code, count in delta.items() if count}


@dataclass
class Bench:
    """One backend's load part: where to send what, and how to check it."""

    backend: str
    callplane_target: str
    reference_target: str
    metrics_port: int
    token: str
    args: Any
    folder: Path
    stage: workloads.Stage
    counter: workloads.EventCounter
    load_cpu: str | None
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: More servers on the same database (PostgreSQL): h2load rows split their clients over all of them.
    replicas: tuple[tuple[str, int], ...] = ()

    async def drain(self, methods: list[str], within: float = 300.0) -> float:
        """Waits until the server has answered what it was still working on when the load ended (h2load
        closes its connections with requests in flight, which a slow server goes on handling): until its
        count of completed `methods` stays the same for half a second. Returns the seconds waited."""
        started = time.monotonic()
        previous = None
        while time.monotonic() - started < within:
            counts = self.handled()
            now = sum(v for (method, _), v in counts.items() if method in methods)
            if now == previous:
                break
            previous = now
            await asyncio.sleep(0.5)
        return max(time.monotonic() - started - 0.5, 0.0)

    def handled(self) -> dict[tuple[str, str], float]:
        """Completed RPCs by (method, code), summed over the servers."""
        total: dict[tuple[str, str], float] = {}
        for port in (self.metrics_port, *(port for _, port in self.replicas)):
            for key, value in handled_counts(port).items():
                total[key] = total.get(key, 0.0) + value
        return total

    def h2load_settings(self) -> h2load.LoadSettings:
        args = self.args
        return h2load.LoadSettings(
            clients=args.clients, streams=args.streams, seconds=args.seconds, warm_up_seconds=args.warm_up
        )

    def generator_settings(self) -> generator.GenSettings:
        args = self.args
        return generator.GenSettings(
            concurrency=args.in_flight,
            processes=args.generator_processes,
            seconds=args.seconds,
            warm_up_seconds=args.warm_up,
            cpu=self.load_cpu,
        )

    def fresh_base(self) -> int:
        """Item numbers no earlier generator run used (each run takes fewer than 10^9)."""
        return next(self.numbers) * 1_000_000_000

    async def reference(self) -> dict[str, Any]:
        result = await asyncio.to_thread(
            h2load.run,
            self.reference_target,
            workloads.GET_CALL,
            workloads.h2load_reference_body(self.stage),
            None,
            self.h2load_settings(),
            self.folder,
            self.load_cpu,
        )
        return asdict(result)

    async def generator_reference(self, workload: workloads.Workload) -> dict[str, Any]:
        """The same generator, bodies and concurrency against the reference server (fixed replies)."""
        result = await asyncio.to_thread(
            generator.run_load,
            self.reference_target,
            self.token,
            list(workload.steps),
            self.fresh_base(),
            self.generator_settings(),
            self.folder / "generator.log",
        )
        if result.non_ok:
            raise SystemExit(
                f"{workload.name} on the reference server: non-OK replies {result.non_ok} "
                f"({result.first_error})"
            )
        return asdict(result)

    async def measure(self, workload: workloads.Workload) -> dict[str, Any]:
        """One run of a row against Callplane, checked: every reply OK by the server's own count, and
        the events its OK replies owe appended (nothing appended by a row that must not write)."""
        keys = workloads.event_keys(workload)
        events_before = await self.counter.counts(keys)
        before = self.handled()
        measured: dict[str, Any]
        if workload.loader == "h2load":
            (only,) = workload.steps
            load = await asyncio.to_thread(
                h2load.run_split,
                [self.callplane_target, *(target for target, _ in self.replicas)],
                only.method,
                workload.h2load_body(),
                self.token,
                self.h2load_settings(),
                self.folder,
                self.load_cpu,
            )
            measured = asdict(load)
            client_ok, client_failed = load.succeeded, load.failed + load.errored
            client_errors = f"h2load {load.succeeded} succeeded, {load.failed} failed, {load.errored} errored"
        else:
            result = await asyncio.to_thread(
                generator.run_load,
                self.callplane_target,
                self.token,
                list(workload.steps),
                self.fresh_base(),
                self.generator_settings(),
                self.folder / "generator.log",
            )
            measured = asdict(result)
            client_ok, client_failed = result.requests_total, sum(result.non_ok.values())
            client_errors = f"generator {result.requests_total} OK, non-OK {result.non_ok or 'none'}" + (
                f" (first: {result.first_error})" if result.first_error else ""
            )
        measured["drain_seconds"] = await self.drain(workload.methods)
        if measured["drain_seconds"] >= 1.0:
            print(
                f"  [{self.backend}] {workload.name}: the server was still busy "
                f"{measured['drain_seconds']:.0f} s after the load ended (waited before the next row)",
                flush=True,
            )
        after = self.handled()
        events_after = await self.counter.counts(keys)
        ok: dict[str, float] = {}
        non_ok: dict[str, dict[str, float]] = {}
        cut = 0.0
        for method in workload.methods:
            replies = _non_ok(before, after, method)
            ok[method] = replies.pop("OK", 0.0)
            if workload.loader == "h2load":
                # h2load ends a run by closing its connections with requests still in flight (it counts
                # none of them); the server may see those as CANCELLED. At most one per stream.
                cut += replies.pop("CANCELLED", 0.0)
            if replies:
                non_ok[method] = replies
        in_flight = self.args.clients * self.args.streams
        if cut > in_flight:
            non_ok.setdefault("CANCELLED beyond the requests in flight at h2load's end", {})["CANCELLED"] = (
                cut
            )
        measured["cancelled_at_end"] = cut
        if non_ok or client_failed or sum(ok.values()) < client_ok:
            raise SystemExit(
                f"{workload.name} on {self.backend}: not every reply was OK (server counted "
                f"{non_ok or 'none'} non-OK, {sum(ok.values()):.0f} OK; {client_errors})"
            )
        measured["server_ok"] = ok
        measured["events"] = workloads.check_events(
            workload.name, self.backend, workload, ok, events_before, events_after
        )
        return measured


async def load_rpcs(
    bench: Bench, rows: list[workloads.Workload] | None = None, reference_rps: float | None = None
) -> dict[str, Any]:
    """Each row `args.runs` times, medians, ratios to the reference: measured in each run before the
    rows, or `reference_rps` when given (rows measured after the reference of the same bench)."""
    if rows is None:
        rows = workloads.workloads(bench.stage)
    runs: dict[str, list[dict[str, Any]]] = {
        **({"reference": []} if reference_rps is None else {}),
        **{w.name: [] for w in rows},
    }
    generator_references: dict[str, list[dict[str, Any]]] = {
        w.name: [] for w in rows if w.loader == "generator"
    }
    tag = bench.backend
    for run_index in range(bench.args.runs):
        if reference_rps is None:
            result = await bench.reference()
            runs["reference"].append(result)
            print(
                f"  [{tag} run {run_index + 1}] reference: {result['requests_per_second']:,.0f} req/s",
                flush=True,
            )
        for workload in rows:
            if workload.loader == "generator":
                on_reference = await bench.generator_reference(workload)
                generator_references[workload.name].append(on_reference)
                print(
                    f"  [{tag} run {run_index + 1}] {workload.name} on the reference (generator): "
                    f"{on_reference['requests_per_second']:,.0f} {workload.unit}, "
                    f"generator CPU {on_reference['cpu_share']:.0%} of a core",
                    flush=True,
                )
            result = await bench.measure(workload)
            runs[workload.name].append(result)
            events = "; ".join(
                f"{label}: +{figures['appended']:,}"
                + (" (must stay 0)" if "expected" in figures else f" (≥ {figures['expected_at_least']:,})")
                for label, figures in result["events"].items()
            )
            print(
                f"  [{tag} run {run_index + 1}] {workload.name} ({workload.loader}): "
                f"{result['requests_per_second']:,.0f} {workload.unit} p50 {result['p50_ms']:.1f} ms "
                f"p99 {result['p99_ms']:.1f} ms ({sum(result['server_ok'].values()):,.0f} OK, 0 non-OK"
                + (
                    f", {result['cancelled_at_end']:.0f} cut by h2load's end"
                    if result.get("cancelled_at_end")
                    else ""
                )
                + (f"; events {events}" if events else "")
                + ")",
                flush=True,
            )
    if reference_rps is None:
        reference_rps = statistics.median(r["requests_per_second"] for r in runs["reference"])
    summary: dict[str, Any] = {}
    loaders = {w.name: w for w in rows}
    for name, results in runs.items():
        rps = statistics.median(r["requests_per_second"] for r in results)
        entry: dict[str, Any] = {
            "requests_per_second": rps,
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "ratio": rps / reference_rps,
            "runs": results,
        }
        if name in loaders:
            workload = loaders[name]
            entry.update(loader=workload.loader, unit=workload.unit, description=workload.description)
        if name in generator_references:
            same = generator_references[name]
            same_rps = statistics.median(r["requests_per_second"] for r in same)
            entry["generator_reference"] = {
                "requests_per_second": same_rps,
                "p50_ms": statistics.median(r["p50_ms"] for r in same),
                "cpu_share": statistics.median(r["cpu_share"] for r in same),
                "runs": same,
            }
            entry["ratio_to_generator_reference"] = rps / same_rps if same_rps else 0.0
            entry["generator_cpu_share"] = statistics.median(r["cpu_share"] for r in results)
        summary[name] = entry
    return summary


#: The rows measured again with the load split over two servers on one PostgreSQL database.
REPLICA_ROWS = ("GetCall", "QueryCalls broad")
REPLICA_SUFFIX = " (2 replicas)"


async def two_replicas(bench: Bench, database_url: str, server_cpu: str | None, reference_rps: float) -> dict:
    """REPLICA_ROWS with a second server process on the same database: two h2load processes at once, half
    the clients each (the rates summed), both servers on the servers' CPU."""
    metrics_port = free_port()
    with callplane(database_url, bench.folder, metrics_port, log_name="callplane-replica.log") as second:
        await wait_serving(second)
        if server_cpu:
            pin(second.pid, server_cpu)
        print(
            f"[{bench.backend}] two replicas: a second server on the same database"
            + (f", both pinned to CPU {server_cpu}" if server_cpu else ""),
            flush=True,
        )
        rows = [
            replace(
                w,
                name=w.name + REPLICA_SUFFIX,
                description=w.description + "; h2load split over 2 servers on one database",
            )
            for w in workloads.workloads(bench.stage)
            if w.name in REPLICA_ROWS
        ]
        split = replace(bench, replicas=((second.target, metrics_port),))
        summary = await load_rpcs(split, rows, reference_rps)
    for entry in summary.values():
        entry["replicas"] = 2
        entry["servers_cpu"] = server_cpu
    return summary


#: GetCalls a mixed-load phase must have answered within its window for its p99 to count.
MIXED_MIN_GETCALLS = 20


async def mixed_load(bench: Bench, target: str, clients: int, calls: int, users: int) -> dict[str, Any]:
    """Reads under writes (tests/bench/mixed.py): per run, the clients sending only the reads and the mix
    with the writers (each first in turn); the writers' events checked in the events table, the reads-only
    phase checked to append none. Medians of the runs, and GetCall's p99 with ÷ without the writers."""
    settings = mixed.MixSettings(
        clients=clients,
        seconds=bench.args.mixed_seconds,
        warm_up_seconds=bench.args.warm_up,
        cpu=bench.load_cpu,
    )
    phases: dict[str, list[dict[str, Any]]] = {"reads_only": [], "with_writers": []}
    methods = {
        "UpdateCall": workloads.UPDATE_CALL,
        "UpdateCallMembers": workloads.UPDATE_CALL_MEMBERS,
        **{m: workloads.CALL_SERVICE + m for m in mixed.READS},
    }
    for run_index in range(bench.args.runs):
        order = [("reads_only", False), ("with_writers", True)]
        for phase, writers in order if run_index % 2 == 0 else order[::-1]:  # neither always first
            check = workloads.Workload(
                f"mixed load ({phase})",
                "mixed",
                (),
                "",
                expects=(
                    (
                        workloads.Expect(workloads.UPDATE_CALL, "call.updated"),
                        workloads.Expect(workloads.UPDATE_CALL_MEMBERS, "call.member_updated"),
                    )
                    if writers
                    else ()
                ),
                unchanged=() if writers else workloads.READS_WRITE_NOTHING,
            )
            keys = workloads.event_keys(check)
            await bench.drain(list(methods.values()))
            events_before = await bench.counter.counts(keys)
            before = bench.handled()
            result = await asyncio.to_thread(
                mixed.run_mix,
                target,
                bench.token,
                calls=calls,
                users=users,
                writers=writers,
                base=bench.fresh_base(),
                settings=settings,
                log=bench.folder / "mixed.log",
            )
            after = bench.handled()
            events_after = await bench.counter.counts(keys)
            if result["non_ok"]:
                raise SystemExit(
                    f"mixed load on {bench.backend}: non-OK replies {result['non_ok']} "
                    f"({result['first_error']})"
                )
            ok = {}
            for name, method in methods.items():
                replies = _non_ok(before, after, method)
                ok[method] = replies.pop("OK", 0.0)
                if replies or ok[method] < result["ok_total"].get(name, 0):
                    raise SystemExit(
                        f"mixed load on {bench.backend}: {name}: the server counted {ok[method]:.0f} OK and "
                        f"{replies or 'no'} non-OK, the clients {result['ok_total'].get(name, 0)} OK"
                    )
            result["events"] = workloads.check_events(
                check.name, bench.backend, check, ok, events_before, events_after
            )
            phases[phase].append(result)
            figures = ", ".join(
                f"{name} {m['requests_per_second']:,.0f}/s p50 {m['p50_ms']:.1f} p99 {m['p99_ms']:.1f} ms"
                for name, m in result["methods"].items()
            )
            events = "; ".join(f"{label}: +{f['appended']:,}" for label, f in result["events"].items())
            print(
                f"  [{bench.backend} run {run_index + 1}] mixed load, {clients} clients, {phase}: {figures} "
                f"(events {events})",
                flush=True,
            )
    summary: dict[str, Any] = {"clients": clients, "mix": list(mixed.MIX), "reads": list(mixed.READS)}
    for phase, results in phases.items():
        summary[phase] = {
            name: {
                figure: statistics.median(r["methods"][name][figure] for r in results)
                for figure in ("requests_per_second", "p50_ms", "p99_ms")
            }
            for name in results[0]["methods"]
        }
        summary[phase + "_runs"] = results
    without = summary["reads_only"]["GetCall"]["p99_ms"]
    with_writers = summary["with_writers"]["GetCall"]["p99_ms"]
    measured = all(
        r["methods"]["GetCall"]["ok"] >= MIXED_MIN_GETCALLS for results in phases.values() for r in results
    )
    # None: some phase had too few GetCalls answered within its window for a p99 to compare.
    summary["get_call_p99_ratio"] = with_writers / without if measured and without else None
    print(
        f"[{bench.backend}] mixed load: GetCall p99 {with_writers:.1f} ms with writers, {without:.1f} ms "
        "reads only: "
        + (
            f"{summary['get_call_p99_ratio']:.2f}x (target <= 2)"
            if summary["get_call_p99_ratio"] is not None
            else f"not measured (a phase had fewer than {MIXED_MIN_GETCALLS} GetCalls answered in its window)"
        ),
        flush=True,
    )
    return summary


async def bench_backend(backend: str, args: Any, postgres_url: str) -> dict[str, Any]:
    token = server_token()
    server_cpu, load_cpu = _cpus(args)
    with tempfile.TemporaryDirectory(prefix=f"callplane-bench-{backend}-") as tmp:
        folder = Path(tmp)
        async with seeding.seeded_database(
            backend,
            folder,
            postgres_url,
            token,
            calls=args.calls,
            users=args.users,
            members_per_call=MEMBERS_PER_CALL,
            reuse=not args.no_seed_cache,
        ) as database_url:
            metrics_port = free_port()
            with callplane(database_url, folder, metrics_port) as server:
                await wait_serving(server)
                stage = workloads.Stage(calls=args.calls, users=args.users)
                await workloads.prepare(server.target, token, stage)
                with reference(stage.replies, folder, server_cpu) as reference_server:
                    await wait_serving(reference_server)
                    if server_cpu:
                        pin(server.pid, server_cpu)
                    profiler = _start_profiler(server.pid, backend, args)
                    try:
                        bench = Bench(
                            backend=backend,
                            callplane_target=server.target,
                            reference_target=reference_server.target,
                            metrics_port=metrics_port,
                            token=token,
                            args=args,
                            folder=folder,
                            stage=stage,
                            counter=workloads.EventCounter(database_url),
                            load_cpu=load_cpu,
                        )
                        async with workloads.keep_alive(server.target, token, stage):
                            rpcs = await load_rpcs(bench)
                            if backend == "postgres" and not args.no_replicas:
                                rpcs.update(
                                    await two_replicas(
                                        bench,
                                        database_url,
                                        server_cpu,
                                        rpcs["reference"]["requests_per_second"],
                                    )
                                )
                            mix = None
                            if args.mixed_clients and backend in args.mixed_backends.split(","):
                                mix = await mixed_load(
                                    bench, server.target, args.mixed_clients, args.calls, args.users
                                )
                    finally:
                        _stop_profiler(profiler)
                        if server_cpu:
                            pin(server.pid, f"0-{(os.cpu_count() or 1) - 1}")
                reply = stage.replies[workloads.GET_CALL]
                result: dict[str, Any] = {"rpcs": rpcs, "reply_bytes": len(reply)}
                if mix is not None:
                    result["mixed"] = mix
                if not args.skip_streams:
                    async with grpc.aio.insecure_channel(server.target) as channel:
                        await call_service_pb2_grpc.CallServiceStub(channel).GetOrCreateCall(
                            call_service_pb2.GetOrCreateCallRequest(type=CALL_TYPE, id="fanout"),
                            metadata=(("authorization", f"Bearer {token}"),),
                        )
                    result["fanout"] = await fanout.measure_fanout(
                        server.target,
                        token,
                        CALL_TYPE,
                        "fanout",
                        watchers=args.watchers,
                        rate=args.rate,
                        seconds=args.fanout_seconds,
                    )
                    print(f"[{backend}] fan-out: {json.dumps(result['fanout'])}", flush=True)
                    # One call per stream at most: the children get the calls on their command line, and
                    # 100,000 of them are more than an argument list may hold.
                    idle_calls = [(CALL_TYPE, call_id(i)) for i in range(min(args.calls, args.idle_streams))]
                    result["idle_watches"] = await fanout.measure_idle_rss(
                        server.target, token, server.pid, idle_calls, streams=args.idle_streams
                    )
                    print(f"[{backend}] idle watches: {json.dumps(result['idle_watches'])}", flush=True)
                    with reference({workloads.GET_CALL: reply}, folder) as reference_server:
                        await wait_serving(reference_server)
                        result["idle_watches_reference"] = await fanout.measure_idle_rss(
                            reference_server.target,
                            token,
                            reference_server.pid,
                            idle_calls,
                            streams=args.idle_streams,
                        )
                    print(
                        f"[{backend}] idle watches on the reference: "
                        f"{json.dumps(result['idle_watches_reference'])}",
                        flush=True,
                    )
                result["server_rss_mb_at_end"] = proc_status(server.pid)["VmRSS"] / 1024
                return result


def _capacity_settings(args: Any) -> capacity.CapacitySettings:
    """The capacity scenario's settings: the defaults (or --quick's), with what the options say."""
    settings = capacity.CapacitySettings.quick_settings() if args.quick else capacity.CapacitySettings()
    changes: dict[str, Any] = {}
    if args.capacity_populations:
        changes["populations"] = tuple(int(n) for n in args.capacity_populations.split(","))
    for option, name in (
        ("capacity_processes", "processes"),
        ("capacity_idle_seconds", "idle_seconds"),
        ("capacity_activity_seconds", "activity_seconds"),
        ("capacity_big_join", "big_join"),
        ("capacity_replicas", "replicas"),
    ):
        if getattr(args, option) is not None:
            changes[name] = getattr(args, option)
    if args.profile:
        changes["profile_dir"] = str(args.output)
    return replace(settings, **changes)


def _webhook_settings(args: Any) -> webhooks.WebhookSettings:
    """The webhook scenario's settings: the defaults (or --quick's), with what the options say."""
    settings = webhooks.WebhookSettings.quick_settings() if args.quick else webhooks.WebhookSettings()
    changes: dict[str, Any] = {}
    for option, name in (
        ("webhook_seconds", "seconds"),
        ("webhook_seconds", "paced_seconds"),
        ("webhook_calls", "calls"),
        ("webhook_in_flight", "in_flight"),
    ):
        if getattr(args, option) is not None:
            changes[name] = getattr(args, option)
    if args.webhook_rates:
        changes["rates"] = tuple(float(rate) for rate in args.webhook_rates.split(","))
    if args.profile:
        changes["profile_dir"] = str(args.output)
    return replace(settings, **changes)


def _previous(path: Path) -> dict[str, Any] | None:
    """The results a part not run this time keeps (None when there are none)."""
    try:
        previous: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return previous


def _cpus(args: Any) -> tuple[str | None, str | None]:
    """(servers' CPU, load generators' CPU) for taskset, or (None, None) when not pinning."""
    if args.no_pin or (os.cpu_count() or 1) < 2:
        return None, None
    return "0", "1"


def _start_profiler(pid: int, backend: str, args: Any) -> subprocess.Popen[bytes] | None:
    if not args.profile:
        return None
    output = RESULTS_DIR / f"profile-{backend}.speedscope.json"
    py_spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--format",
            "speedscope",
            "--rate",
            "200",
            "-o",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(2)  # SIGINT: py-spy writes its output and exits
        profiler.wait(60)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "sqlite": sqlite3.sqlite_version,
        "event_loop": runtime.loop_name(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "CALLPLANE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=100_000,
        help="calls seeded (with 5 members each); the seeded database is cached and reused (see "
        "tests/bench/seeding.py)",
    )
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=16, help="h2load -c")
    parser.add_argument("--streams", type=int, default=16, help="h2load -m")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured seconds per run (h2load -D; the generator too)"
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=1.0,
        help="unmeasured seconds first (h2load --warm-up-time; the generator too)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--watchers", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=100.0, help="UpdateCalls per second during fan-out")
    parser.add_argument("--fanout-seconds", type=float, default=10.0)
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument(
        "--in-flight", type=int, default=64, help="generator rows: requests in flight (all processes)"
    )
    parser.add_argument("--generator-processes", type=int, default=1, help="generator rows: processes")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the servers to CPU 0 and h2load / the generator to CPU 1 during the RPC part",
    )
    parser.add_argument(
        "--skip-streams",
        action="store_true",
        help="only the RPC part (no fan-out, no idle streams); with e.g. --calls 500 --users 100 --runs 1 "
        "--seconds 3 --no-readme --output /tmp/bench-out for a quick check",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server during the RPC part, during each idle and activity window of the "
        "capacity scenario (profile-capacity-*.speedscope.json in the output folder), and during the webhook "
        "part's measured phases (profile-webhooks-*.speedscope.json)",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help="parts to run, comma-separated: rpcs (the RPC rows, fan-out, idle streams), capacity (live "
        "capacity), webhooks (webhook delivery); the results of a part not run are kept from the output "
        "folder's latest.json",
    )
    parser.add_argument(
        "--webhook-seconds",
        type=float,
        help="webhooks: seconds of each load phase (full speed, and paced) (default 10; --quick 3)",
    )
    parser.add_argument(
        "--webhook-rates",
        help="webhooks: SendCallEvents per second of the paced phases, comma-separated (default 50,200)",
    )
    parser.add_argument("--webhook-calls", type=int, help="webhooks: calls the events go to (default 50)")
    parser.add_argument(
        "--webhook-in-flight", type=int, help="webhooks: requests in flight at full speed (default 64)"
    )
    parser.add_argument(
        "--capacity-populations",
        help="connected participants, comma-separated, each a multiple of 5 (default 1000,2000,5000,10000; "
        "--quick 200,500)",
    )
    parser.add_argument("--capacity-processes", type=int, help="load generator processes (default 4)")
    parser.add_argument("--capacity-idle-seconds", type=float, help="idle window (default 20; --quick 10)")
    parser.add_argument(
        "--capacity-activity-seconds", type=float, help="activity window (default 30; --quick 10)"
    )
    parser.add_argument(
        "--capacity-big-join", type=int, help="participants joining one call (default 1000; --quick 200)"
    )
    parser.add_argument("--capacity-replicas", type=int, help="PostgreSQL server processes (default 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a quick check: --calls 500 --users 100 --runs 1 --seconds 3 --mixed-seconds 3 --skip-streams "
        "--no-readme, and "
        f"capacity with 200 and 500 participants and shorter windows, webhook phases of 3 s; results in "
        f"{QUICK_OUTPUT} unless "
        "--output says otherwise",
    )
    parser.add_argument(
        "--mixed-clients",
        type=int,
        default=50,
        help="reads under writes: concurrent clients of the mixed load (0: not measured)",
    )
    parser.add_argument(
        "--mixed-seconds", type=float, default=10.0, help="mixed load: measured seconds of each phase"
    )
    parser.add_argument(
        "--mixed-backends",
        default="sqlite,postgres",
        help="backends the mixed load runs on (comma-separated)",
    )
    parser.add_argument(
        "--no-replicas",
        action="store_true",
        help="PostgreSQL: skip the rows with the load split over two servers",
    )
    parser.add_argument(
        "--no-seed-cache",
        action="store_true",
        help=f"seed a fresh database through the API and keep nothing (default: reuse the seed cached in "
        f"{seeding.cache_folder()} / a PostgreSQL template database when the seed is the same)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's results")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="servers trace every RPC and export the spans over OTLP/gRPC to a no-op receiver "
        "(tests/bench/otlp_sink.py) on the load generators' CPU: what tracing costs (implies --no-readme)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.users, args.runs, args.seconds, args.mixed_seconds = 500, 100, 1, 3.0, 3.0
        args.skip_streams = args.no_readme = True
        if args.output == RESULTS_DIR:
            args.output = QUICK_OUTPUT

    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--only takes {', '.join(PARTS)} (comma-separated), not {args.only!r}")
    capacity_settings = _capacity_settings(args)
    if any(n <= 0 or n % capacity.PER_CALL for n in capacity_settings.populations):
        parser.error(f"--capacity-populations must be positive multiples of {capacity.PER_CALL}")
    if args.generator_processes < 1 or args.in_flight < args.generator_processes:
        parser.error("--in-flight must be at least --generator-processes, which must be at least 1")
    if args.calls < workloads.MIN_CALLS:
        parser.error(f"--calls must be at least {workloads.MIN_CALLS}")
    if "rpcs" in parts:
        h2load.ensure_h2load()
    args.output.mkdir(parents=True, exist_ok=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {
            "h2load": asdict(
                h2load.LoadSettings(
                    clients=args.clients,
                    streams=args.streams,
                    seconds=args.seconds,
                    warm_up_seconds=args.warm_up,
                )
            ),
            "generator": {
                "in_flight": args.in_flight,
                "processes": args.generator_processes,
                "channels_per_process": generator.CHANNELS,
            },
            "pinned": _cpus(args)[0] is not None,
            "runs": args.runs,
            "calls": args.calls,
            "users": args.users,
            "members_per_call": MEMBERS_PER_CALL,
            "seed_key": seeding.seed_key(
                calls=args.calls, users=args.users, members_per_call=MEMBERS_PER_CALL
            ),
            "watchers": args.watchers,
            "updates_per_second": args.rate,
            "fanout_seconds": args.fanout_seconds,
            "idle_streams": args.idle_streams,
            "mixed_clients": args.mixed_clients,
            "mixed_seconds": args.mixed_seconds,
        },
        "backends": {},
    }
    server_cpu, load_cpu = _cpus(args)
    if args.tracing:
        args.no_readme = True
        otlp_sink.start(load_cpu)
    results["settings"]["tracing"] = args.tracing
    live: dict[str, Any] = {
        "date": results["date"],
        "machine": results["machine"],
        "settings": capacity.settings_record(capacity_settings),
        "pinned": server_cpu is not None,
        "backends": {},
    }
    webhook_settings = _webhook_settings(args)
    hooks: dict[str, Any] = {
        "date": results["date"],
        "machine": results["machine"],
        "settings": webhooks.settings_record(webhook_settings),
        "pinned": server_cpu is not None,
        "backends": {},
    }
    for backend in args.backends.split(","):
        if "rpcs" in parts:
            print(f"[{backend}] starting", flush=True)
            results["backends"][backend] = runtime.run(bench_backend(backend, args, args.postgres_url))
        if "capacity" in parts:
            print(f"[{backend}] live capacity", flush=True)
            measured = runtime.run(
                capacity.measure_backend(backend, args.postgres_url, capacity_settings, server_cpu, load_cpu)
            )
            live["backends"][backend] = {"date": live["date"], "settings": live["settings"], **measured}
        if "webhooks" in parts:
            print(f"[{backend}] webhooks", flush=True)
            measured = runtime.run(
                webhooks.measure_backend(backend, args.postgres_url, webhook_settings, server_cpu, load_cpu)
            )
            hooks["backends"][backend] = {"date": hooks["date"], "settings": hooks["settings"], **measured}
    if "capacity" in parts:
        results["capacity"] = live
    if "webhooks" in parts:
        results["webhooks"] = hooks
    results = report.merge(results, _previous(args.output / "latest.json"), parts)
    paths = report.write(results, args.output)
    if not args.no_readme:
        report.update_readme(results, REPO / "README.md")
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths))
    missed = report.missed_targets(results)
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
