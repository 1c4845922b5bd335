"""Benchmark fixtures: fresh databases, Callplane and the reference server as separate processes,
seeding through the public API, and reading a server's own RPC counters from /metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callplane.v1 import call_pb2, call_service_pb2, call_service_pb2_grpc, user_pb2, user_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SECRET = "callplane-bench-secret-" + "0" * 48
CALL_TYPE = "default"
#: Five regions: `{"custom.region": "eu"}` matches 20 % of the seeded calls.
REGIONS = ("eu", "us", "ap", "sa", "af")
#: Distinct `custom.owner` (`team-<n>`) and `custom.team` (`t-<n>`) values: one of each matches 0.1 %.
OWNERS = 1_000
#: The custom indexes the bench server declares, as an operator would (`--custom-index`, repeated): the
#: compound index the "QueryCalls" row's filter and sort follow, and `team` for "QueryCalls selective
#: indexed". `owner` has none ("QueryCalls selective"), nor has `region` alone sorted by created_at.
CUSTOM_INDEXES = ("region:string,priority:number:desc", "team:string")
TOPICS = ("standup", "support", "sales", "interview", "town-hall")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_token() -> str:
    from callplane_server.auth.tokens import create_token

    return create_token(SECRET)


def call_id(index: int) -> str:
    return f"bench-{index:05d}"


def user_id(index: int) -> str:
    return f"user-{index:04d}"


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    target: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@contextlib.contextmanager
def _process(command: list[str], target: str, log_path: Path, env: dict[str, str]) -> Iterator[Process]:
    with log_path.open("wb") as log:
        popen = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield Process(popen, target, log_path)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


async def wait_serving(process: Process, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(process.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.popen.poll() is not None:
                raise RuntimeError(
                    f"server exited; see {process.log_path}:\n{process.log_path.read_text()[-2000:]}"
                )
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not serving after {within}s; see {process.log_path}")
            await asyncio.sleep(0.2)


def pinned(cpu: str | None) -> list[str]:
    """A command prefix running it on the given CPUs (`taskset -c`), or nothing."""
    return ["taskset", "-c", cpu] if cpu else []


def pin(pid: int, cpu: str) -> None:
    """Moves a running process, every thread of it, to the given CPUs."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def callplane(
    database_url: str,
    folder: Path,
    metrics_port: int,
    log_name: str = "callplane.log",
    extra: Sequence[str] = (),
) -> Iterator[Process]:
    """A Callplane server on a free port (several may share one PostgreSQL database: give each its own
    `log_name`), with `extra` options on its command line."""
    port = free_port()
    env = {**os.environ, "CALLPLANE_API_SECRET": SECRET}
    command = [
        str(VENV_BIN / "callplane"),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(folder),
        "--database-url",
        database_url,
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        *(flag for spec in CUSTOM_INDEXES for flag in ("--custom-index", spec)),
        *extra,
    ]
    with _process(command, f"127.0.0.1:{port}", folder / log_name, env) as process:
        yield process


@contextlib.contextmanager
def reference(replies: dict[str, bytes], folder: Path, cpu: str | None = None) -> Iterator[Process]:
    """The reference server answering each method of `replies` with its fixed reply (on `cpu` if given)."""
    port = free_port()
    replies_path = folder / "reference-replies.json"
    replies_path.write_text(
        json.dumps({method: base64.b64encode(reply).decode("ascii") for method, reply in replies.items()})
    )
    command = [
        *pinned(cpu),
        sys.executable,
        "-m",
        "tests.bench.reference_server",
        "--listen",
        f"127.0.0.1:{port}",
        "--replies",
        str(replies_path),
    ]
    with _process(command, f"127.0.0.1:{port}", folder / "reference.log", dict(os.environ)) as process:
        yield process


def handled_counts(metrics_port: int) -> dict[tuple[str, str], float]:
    """The server's own count of completed RPCs by (full method, status code)."""
    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("grpc_server_handled_total{"):
            continue
        labels_text, _, value = line.rpartition(" ")
        labels = dict(
            part.split("=", 1) for part in labels_text[len("grpc_server_handled_total{") : -1].split(",")
        )
        labels = {key: raw.strip('"') for key, raw in labels.items()}
        method = f"/{labels['grpc_service']}/{labels['grpc_method']}"
        counts[(method, labels["grpc_code"])] = float(value)
    return counts


def custom_for(index: int) -> struct_pb2.Struct:
    custom = struct_pb2.Struct()
    custom.update(
        {
            "region": REGIONS[index % len(REGIONS)],
            "owner": f"team-{index % OWNERS}",
            # Another permutation of the same 1,000 values than owner's (7 is prime to 1,000).
            "team": f"t-{index * 7 % OWNERS}",
            "topic": TOPICS[index % len(TOPICS)],
            "priority": index % 10,
            "tags": ["bench", f"cohort-{index % 50}"],
            "host": {"name": f"Host {index % 97}", "tier": "pro" if index % 3 else "free"},
        }
    )
    return custom


#: Seeding's concurrency: calls created at once, spread over this many connections.
SEED_IN_FLIGHT = 256
SEED_CHANNELS = 4


#: What the seed holds (users, calls, members, custom data): bump when seed() stores something else, so
#: cached seeds are not reused (tests/bench/seeding.py also hashes custom_for and the ids).
SEED_FORMAT = 2


async def seed(
    targets: list[str], token: str, *, calls: int, users: int, members_per_call: int, label: str = ""
) -> float:
    """Users, then calls with members and custom data, through the public API (as clients would; spread
    over the given servers, replicas on one database), printing progress every 5 %. Returns the calls
    created per second."""
    metadata = (("authorization", f"Bearer {token}"),)
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for target in targets
        for _ in range(SEED_CHANNELS)
    ]
    try:
        user_stub = user_pb2_grpc.UserServiceStub(channels[0])
        for start in range(0, users, 100):
            batch = [
                user_pb2.UserRequest(id=user_id(i), name=f"User {i}", teams=[])
                for i in range(start, min(start + 100, users))
            ]
            await user_stub.UpsertUsers(user_pb2.UpsertUsersRequest(users=batch), metadata=metadata)
        stubs = [call_service_pb2_grpc.CallServiceStub(channel) for channel in channels]
        indexes = iter(range(calls))
        step = max(calls // 20, 1)
        done = 0
        started = time.monotonic()

        def request(index: int) -> call_service_pb2.GetOrCreateCallRequest:
            members = [
                call_pb2.MemberRequest(
                    user_id=user_id((index * members_per_call + k) % users), role="host" if k == 0 else "user"
                )
                for k in range(members_per_call)
            ]
            return call_service_pb2.GetOrCreateCallRequest(
                type=CALL_TYPE,
                id=call_id(index),
                data=call_service_pb2.CallData(
                    created_by_id=members[0].user_id, members=members, custom=custom_for(index)
                ),
            )

        async def worker(number: int) -> None:
            nonlocal done
            stub = stubs[number % len(stubs)]
            for index in indexes:
                await stub.GetOrCreateCall(request(index), metadata=metadata, timeout=120)
                done += 1
                if done % step == 0 or done == calls:
                    elapsed = time.monotonic() - started
                    print(
                        f"{label}seeding: {done:,} of {calls:,} calls ({done / calls:.0%}), "
                        f"{done / elapsed:,.0f} calls/s, {elapsed:.0f} s",
                        flush=True,
                    )

        await asyncio.gather(*(worker(n) for n in range(min(SEED_IN_FLIGHT, calls))))
        return calls / max(time.monotonic() - started, 1e-9)
    finally:
        for channel in channels:
            await channel.close()
