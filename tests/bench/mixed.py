"""Reads under writes (issue 13, goal 3): `clients` concurrent clients, each sending one request after the
other, cycling through GetCall, QueryCalls, QueryMembers, UpdateCall (a new custom value each time) and
UpdateCallMembers (a new member custom value each time) on calls spread over the seeded ones; then the
same clients sending only the reads. The figure of merit is GetCall's p99 with the writers ÷ its p99
without them (target ≤ 2).

The clients run in a child process (`python -m tests.bench.mixed child`, pinned to the load CPU like
h2load and the generator), the token in its environment; once connected the child warms up, measures
for `seconds`, lets the requests in flight finish and prints one JSON line: per method, requests OK in
the window, p50 and p99, and non-OK replies over the whole run. `run_mix` starts it and reads it back;
the bench checks the writes against the events table (tests/bench/run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from callplane.v1 import call_pb2, call_service_pb2, query_pb2
from tests.bench.servers import CALL_TYPE, OWNERS, call_id, user_id
from tests.bench.stats import percentile

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN_ENV = "CALLPLANE_BENCH_TOKEN"
SPEC_ENV = "CALLPLANE_BENCH_MIXED"
CHANNELS = 4
TIMEOUT = 120.0
#: Seconds the child may take to start and connect.
STARTUP = 60.0
SERVICE = "/callplane.v1.CallService/"
READS = ("GetCall", "QueryCalls", "QueryMembers")
WRITES = ("UpdateCall", "UpdateCallMembers")
#: Each client's cycle: with writers every method in turn (two in five requests write), without only the
#: reads. Client i starts at position i, so at any moment the clients send every method.
MIX = ("GetCall", "UpdateCall", "QueryCalls", "UpdateCallMembers", "QueryMembers")


@dataclass(frozen=True)
class MixSettings:
    clients: int = 50
    seconds: float = 5.0
    warm_up_seconds: float = 1.0
    cpu: str | None = None  # taskset -c for the child


def run_mix(
    target: str,
    token: str,
    *,
    calls: int,
    users: int,
    writers: bool,
    base: int,
    settings: MixSettings,
    log: Path | None = None,
) -> dict[str, Any]:
    """Runs the child and returns its figures (per method: ok, p50_ms, p99_ms, requests_per_second;
    non_ok by method and code)."""
    spec = {
        "target": target,
        "calls": calls,
        "users": users,
        "writers": writers,
        "base": base,
        "clients": settings.clients,
        "seconds": settings.seconds,
        "warm_up_seconds": settings.warm_up_seconds,
    }
    prefix = ["taskset", "-c", settings.cpu] if settings.cpu else []
    completed = subprocess.run(
        [*prefix, sys.executable, "-m", "tests.bench.mixed", "child"],
        cwd=REPO_ROOT,
        env={**os.environ, TOKEN_ENV: token, SPEC_ENV: json.dumps(spec)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STARTUP + settings.warm_up_seconds + settings.seconds + TIMEOUT + 30,
        check=False,
    )
    if log is not None and completed.stderr:
        with log.open("a") as handle:
            handle.write(completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"mixed-load child failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    built = struct_pb2.Struct()
    built.update(values)
    return built


def requests(method: str, n: int, calls: int, users: int) -> tuple[str, Message]:
    """The n-th request of `method`: on seeded call (n * 7919) mod calls (7919 is prime, so consecutive
    requests land on calls far apart), with n in the written values (each write changes something)."""
    index = n * 7919 % calls
    call = call_id(index)
    if method == "GetCall":
        return SERVICE + method, call_service_pb2.GetCallRequest(type=CALL_TYPE, id=call)
    if method == "QueryMembers":
        return SERVICE + method, call_service_pb2.QueryMembersRequest(type=CALL_TYPE, id=call, limit=25)
    if method == "QueryCalls":
        return SERVICE + method, call_service_pb2.QueryCallsRequest(
            filter_conditions=struct({"custom.team": f"t-{n % OWNERS}"}),
            sort=[query_pb2.SortParam(field="created_at", direction=query_pb2.SORT_DIRECTION_DESC)],
            limit=25,
        )
    if method == "UpdateCall":
        return SERVICE + method, call_service_pb2.UpdateCallRequest(
            type=CALL_TYPE, id=call, set_custom=struct({"mix_n": n})
        )
    if method == "UpdateCallMembers":
        # The call's second member (see servers.seed), its custom data replaced by a new value.
        member = call_pb2.MemberRequest(
            user_id=user_id((index * 5 + 1) % users), role="user", custom=struct({"mix_n": n})
        )
        return SERVICE + method, call_service_pb2.UpdateCallMembersRequest(
            type=CALL_TYPE, id=call, update_members=[member]
        )
    raise ValueError(method)


async def _child(spec: dict[str, Any], token: str) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    channels = [
        grpc.aio.insecure_channel(spec["target"], options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    for channel in channels:
        await channel.channel_ready()
    cycle = MIX if spec["writers"] else tuple(m for m in MIX if m in READS)
    calls, users = int(spec["calls"]), int(spec["users"])
    numbers = itertools.count(int(spec["base"]))
    for method in cycle:  # anything done once (imports, descriptors) before the clock starts
        requests(method, 0, calls, users)
    # One child: it starts once connected (however long a busy machine took to start it).
    mono_start = time.monotonic()
    mono_from = mono_start + float(spec["warm_up_seconds"])
    mono_stop = mono_from + float(spec["seconds"])
    latencies: dict[str, list[float]] = {m: [] for m in cycle}
    ok_total: Counter[str] = Counter()
    non_ok: dict[str, Counter[str]] = {m: Counter() for m in cycle}
    first_error = ""

    async def client(index: int) -> None:
        nonlocal first_error
        channel = channels[index % len(channels)]
        methods = itertools.islice(itertools.cycle(cycle), index % len(cycle), None)
        await asyncio.sleep(max(mono_start - time.monotonic(), 0.0))
        for method in methods:
            if time.monotonic() >= mono_stop:
                return
            path, request = requests(method, next(numbers), calls, users)
            call = channel.unary_unary(
                path, request_serializer=type(request).SerializeToString, response_deserializer=None
            )
            began = time.monotonic()
            try:
                await call(request, metadata=metadata, timeout=TIMEOUT)
            except grpc.aio.AioRpcError as error:
                non_ok[method][error.code().name] += 1
                if not first_error:
                    first_error = f"{method} {error.code().name}: {error.details()}"
                return  # the run fails anyway
            ended = time.monotonic()
            ok_total[method] += 1
            if mono_from <= ended < mono_stop:
                latencies[method].append((ended - began) * 1000.0)

    await asyncio.gather(*(client(i) for i in range(int(spec["clients"]))))
    for channel in channels:
        await channel.close()
    seconds = float(spec["seconds"])
    methods = {}
    for method, values in latencies.items():
        values.sort()
        methods[method] = {
            "ok": len(values),
            "requests_per_second": len(values) / seconds,
            "p50_ms": percentile(values, 0.50),
            "p99_ms": percentile(values, 0.99),
        }
    return {
        "writers": bool(spec["writers"]),
        "methods": methods,
        "ok_total": dict(ok_total),
        "non_ok": {m: dict(c) for m, c in non_ok.items() if c},
        "first_error": first_error,
        "requests_per_second": sum(m["requests_per_second"] for m in methods.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["child"])
    parser.parse_args()
    from callplane_server import runtime

    spec = json.loads(os.environ[SPEC_ENV])
    print(json.dumps(runtime.run(_child(spec, os.environ[TOKEN_ENV]))), flush=True)


if __name__ == "__main__":
    main()
