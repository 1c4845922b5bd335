"""`make bench`: Callplane against the transport's own limit, on SQLite and PostgreSQL.

For each backend: a fresh database seeded through the API (10,000 calls with 5 members and custom data,
1,000 users), then h2load at fixed settings against the reference server (bare grpc.aio, fixed GetCall
reply) and each measured RPC, interleaved, 3 runs each, median reported. Every reply must be OK by the
server's own count (/metrics). Then event fan-out (1,000 WatchCall streams on one call, 100 UpdateCalls/s
for 10 s) and server RSS with 10,000 idle watch streams. Writes Markdown, JSON and a PNG chart, and the
README's results section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, query_pb2
from callplane_server import runtime
from tests.bench import fanout, h2load, report
from tests.bench.servers import (
    CALL_TYPE,
    REPO,
    call_id,
    callplane,
    free_port,
    handled_counts,
    reference,
    seed,
    server_token,
    wait_serving,
)
from tests.bench.stats import proc_status
from tests.support import new_database, struct

RESULTS_DIR = REPO / "tests" / "bench" / "results"
GET_CALL = "/callplane.v1.CallService/GetCall"


def workloads(calls: int) -> dict[str, tuple[str, bytes]]:
    """RPC name → (method path, h2load body). h2load sends the same body every time."""
    hot = call_id(calls // 2)
    return {
        "GetCall": (GET_CALL, h2load.grpc_body(call_service_pb2.GetCallRequest(type=CALL_TYPE, id=hot))),
        "GetOrCreateCall": (
            "/callplane.v1.CallService/GetOrCreateCall",
            h2load.grpc_body(call_service_pb2.GetOrCreateCallRequest(type=CALL_TYPE, id=hot)),
        ),
        "UpdateCall": (
            "/callplane.v1.CallService/UpdateCall",
            h2load.grpc_body(
                call_service_pb2.UpdateCallRequest(
                    type=CALL_TYPE,
                    id=call_id(calls // 2 + 1),
                    set_custom=struct({"host.tier": "pro", "bump": 1}),
                )
            ),
        ),
        "QueryCalls": (
            "/callplane.v1.CallService/QueryCalls",
            h2load.grpc_body(
                call_service_pb2.QueryCallsRequest(
                    filter_conditions=struct({"custom.region": "eu", "custom.priority": {"$gte": 5}}),
                    sort=[
                        query_pb2.SortParam(
                            field="custom.priority",
                            direction=query_pb2.SORT_DIRECTION_DESC,
                            type=query_pb2.SORT_TYPE_NUMBER,
                        )
                    ],
                    limit=25,
                )
            ),
        ),
        "QueryMembers": (
            "/callplane.v1.CallService/QueryMembers",
            h2load.grpc_body(call_service_pb2.QueryMembersRequest(type=CALL_TYPE, id=hot, limit=25)),
        ),
    }


async def fetch_reply(target: str, token: str, calls: int) -> bytes:
    """A real GetCallResponse for the hot call: what the reference server answers with."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = call_service_pb2_grpc.CallServiceStub(channel)
        reply = await stub.GetCall(
            call_service_pb2.GetCallRequest(type=CALL_TYPE, id=call_id(calls // 2)),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        return reply.SerializeToString()


def _non_ok(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], method: str) -> dict:
    delta: dict[str, float] = {}
    for (name, code), value in after.items():
        if name == method:
            delta[code] = value - before.get((name, code), 0.0)
    return {code: count for code, count in delta.items() if count}


def load_rpcs(
    backend: str,
    callplane_target: str,
    reference_target: str,
    metrics_port: int,
    token: str,
    args: Any,
    folder: Path,
) -> dict[str, Any]:
    settings = h2load.LoadSettings(
        clients=args.clients, streams=args.streams, seconds=args.seconds, warm_up_seconds=args.warm_up
    )
    loads = workloads(args.calls)
    runs: dict[str, list[h2load.LoadResult]] = {"reference": [], **{name: [] for name in loads}}
    for run_index in range(args.runs):
        result = h2load.run(reference_target, GET_CALL, loads["GetCall"][1], None, settings, folder)
        runs["reference"].append(result)
        print(
            f"  [{backend} run {run_index + 1}] reference: {result.requests_per_second:,.0f} req/s",
            flush=True,
        )
        for name, (method, body) in loads.items():
            before = handled_counts(metrics_port)
            result = h2load.run(callplane_target, method, body, token, settings, folder)
            after = handled_counts(metrics_port)
            replies = _non_ok(before, after, method)
            ok = replies.pop("OK", 0)
            if replies or result.failed or result.errored or ok < result.succeeded:
                raise SystemExit(
                    f"{name} on {backend}: not every reply was OK (server counted "
                    f"{replies or 'none'} non-OK, {ok:.0f} OK; h2load {result.succeeded} succeeded, "
                    f"{result.failed} failed, {result.errored} errored)"
                )
            runs[name].append(result)
            print(
                f"  [{backend} run {run_index + 1}] {name}: {result.requests_per_second:,.0f} req/s "
                f"p50 {result.p50_ms:.1f} ms p99 {result.p99_ms:.1f} ms ({ok:.0f} OK, 0 non-OK)",
                flush=True,
            )
    summary: dict[str, Any] = {}
    reference_rps = statistics.median(r.requests_per_second for r in runs["reference"])
    for name, results in runs.items():
        rps = statistics.median(r.requests_per_second for r in results)
        summary[name] = {
            "requests_per_second": rps,
            "p50_ms": statistics.median(r.p50_ms for r in results),
            "p99_ms": statistics.median(r.p99_ms for r in results),
            "ratio": rps / reference_rps,
            "runs": [asdict(r) for r in results],
        }
    return summary


async def bench_backend(backend: str, args: Any, postgres_url: str) -> dict[str, Any]:
    token = server_token()
    with tempfile.TemporaryDirectory(prefix=f"callplane-bench-{backend}-") as tmp:
        folder = Path(tmp)
        async with new_database(backend, folder, postgres_url, prefix="callplane_bench") as database_url:
            metrics_port = free_port()
            with callplane(database_url, folder, metrics_port) as server:
                await wait_serving(server)
                started = time.monotonic()
                await seed(server.target, token, calls=args.calls, users=args.users, members_per_call=5)
                print(
                    f"[{backend}] seeded {args.calls:,} calls x 5 members and {args.users:,} users "
                    f"in {time.monotonic() - started:.0f} s",
                    flush=True,
                )
                reply = await fetch_reply(server.target, token, args.calls)
                with reference(reply, folder) as reference_server:
                    await wait_serving(reference_server)
                    profiler = _start_profiler(server.pid, backend, args)
                    try:
                        rpcs = await asyncio.to_thread(
                            load_rpcs,
                            backend,
                            server.target,
                            reference_server.target,
                            metrics_port,
                            token,
                            args,
                            folder,
                        )
                    finally:
                        _stop_profiler(profiler)
                result: dict[str, Any] = {"rpcs": rpcs, "reply_bytes": len(reply)}
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
                    idle_calls = [(CALL_TYPE, call_id(i)) for i in range(args.calls)]
                    result["idle_watches"] = await fanout.measure_idle_rss(
                        server.target, token, server.pid, idle_calls, streams=args.idle_streams
                    )
                    print(f"[{backend}] idle watches: {json.dumps(result['idle_watches'])}", flush=True)
                    with reference(reply, folder) as reference_server:
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
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=16, help="h2load -c")
    parser.add_argument("--streams", type=int, default=16, help="h2load -m")
    parser.add_argument("--seconds", type=float, default=5.0, help="h2load -D per run")
    parser.add_argument("--warm-up", type=float, default=1.0, help="h2load --warm-up-time")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--watchers", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=100.0, help="UpdateCalls per second during fan-out")
    parser.add_argument("--fanout-seconds", type=float, default=10.0)
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument("--skip-streams", action="store_true", help="only the h2load part")
    parser.add_argument("--profile", action="store_true", help="py-spy the server during the h2load part")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's results")
    args = parser.parse_args(argv)

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
            "runs": args.runs,
            "calls": args.calls,
            "users": args.users,
            "members_per_call": 5,
            "watchers": args.watchers,
            "updates_per_second": args.rate,
            "fanout_seconds": args.fanout_seconds,
            "idle_streams": args.idle_streams,
        },
        "backends": {},
    }
    for backend in args.backends.split(","):
        print(f"[{backend}] starting", flush=True)
        results["backends"][backend] = runtime.run(bench_backend(backend, args, args.postgres_url))
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
