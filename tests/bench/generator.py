"""A load generator whose every request differs, for the writes h2load cannot measure (h2load repeats one
body, and an UpdateCall that sets the stored values again changes nothing).

A workload is a sequence of steps, each a gRPC method and a body template: the serialized request with a
16-character marker where a per-item number goes (a call id, a participant_session_id, a custom value).
The marker is replaced by the item's number as 16 digits, so the protobuf length prefixes stay right and a
body costs one bytes concatenation: no protobuf work on the client's hot path. One item sends its steps in
order (JoinCall then LeaveCall: a pair) and counts once when every step is OK. Calls go through grpc.aio
with identity (raw bytes) serializers over several connections, `concurrency` items in flight per process.

Children (`python -m tests.bench.generator child`) get the workload as JSON and the token in the
environment (not on the command line, visible in `ps`). All start at the same wall-clock instant,
warm up, then count the items that complete within the measured window, and print one JSON line: items
and steps completed, non-OK replies by code, and latencies. `run_load` starts them (pinned with taskset
when asked), waits, and sums them. A child finishes the items in flight before it exits, so once
`run_load` returns the server has answered every request it was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from tests.bench.stats import percentile

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Placeholder for the item number in a body template (16 characters, as the number it is replaced by).
MARKER = "@@CALLPLANE#N@@@"
TOKEN_ENV = "CALLPLANE_BENCH_TOKEN"
SPEC_ENV = "CALLPLANE_BENCH_GENERATOR"
#: Connections per child: the items in flight are spread over them.
CHANNELS = 4
#: Deadline of one request: generous, since a cancelled write is worse than a slow one.
TIMEOUT = 120.0
#: Seconds the children get to start (import grpc, connect) before the common start instant.
START_DELAY = 3.0


@dataclass(frozen=True)
class Step:
    method: str  # /package.Service/Method
    template: bytes  # serialized request containing MARKER exactly once (or not at all: a fixed body)

    def parts(self) -> tuple[bytes, bytes]:
        marker = MARKER.encode()
        count = self.template.count(marker)
        if count > 1:
            raise ValueError(f"{self.method}: the marker occurs {count} times in the template")
        if count == 0:
            return self.template, b""
        head, _, tail = self.template.partition(marker)
        return head, tail

    def varies(self) -> bool:
        return MARKER.encode() in self.template


def step(method: str, message: Message) -> Step:
    """A step whose body template is `message` serialized (with MARKER in some string field)."""
    return Step(method, message.SerializeToString())


@dataclass(frozen=True)
class GenSettings:
    concurrency: int = 64  # items in flight in all children together
    processes: int = 1  # children
    seconds: float = 5.0  # measured
    warm_up_seconds: float = 1.0  # not measured
    cpu: str | None = None  # taskset -c for the children (None: not pinned)


@dataclass
class GenResult:
    requests_per_second: float  # items (for a pair: pairs) per second in the measured window
    items: int  # items completed OK in the measured window
    items_total: int  # items completed OK during the whole run (warm-up and tail included)
    requests_total: int  # RPCs answered OK during the whole run, all steps
    non_ok: dict[str, int]  # non-OK replies by status code, whole run
    p50_ms: float
    p99_ms: float
    first_error: str = ""
    per_process: list[float] = field(default_factory=list)
    # CPU the children used in the measured window, as a share of one core (1.0: one core busy).
    cpu_share: float = 0.0


def number(base: int, value: int) -> bytes:
    text = f"{base + value:016d}"
    if len(text) != len(MARKER):
        raise ValueError(f"item number {base + value} does not fit in {len(MARKER)} digits")
    return text.encode()


def run_load(
    target: str, token: str, steps: list[Step], base: int, settings: GenSettings, log: Path | None = None
) -> GenResult:
    """Runs the children and sums their figures. Item numbers are `base + k` for k = 0, 1, ... (child i
    of n takes k ≡ i mod n), so callers that need every body ever sent to differ pass a fresh base."""
    for s in steps:
        s.parts()  # fails early on a bad template
    start_at = time.time() + START_DELAY
    share, rest = divmod(settings.concurrency, settings.processes)
    per_child = [share + (1 if i < rest else 0) for i in range(settings.processes)]
    spec_common = {
        "target": target,
        "steps": [
            {"method": s.method, "template": base64.b64encode(s.template).decode("ascii")} for s in steps
        ],
        "base": base,
        "stride": settings.processes,
        "start_at": start_at,
        "warm_up_seconds": settings.warm_up_seconds,
        "seconds": settings.seconds,
    }
    prefix = ["taskset", "-c", settings.cpu] if settings.cpu else []
    env = {**os.environ, TOKEN_ENV: token}
    outputs = []
    with tempfile.TemporaryDirectory(prefix="callplane-generator-") as tmp:
        children = []
        try:
            for index, concurrency in enumerate(per_child):
                spec = {**spec_common, "offset": index, "concurrency": concurrency}
                out_path = Path(tmp) / f"child-{index}.out"
                err_path = Path(tmp) / f"child-{index}.err"
                with out_path.open("wb") as out, err_path.open("wb") as err:
                    child = subprocess.Popen(
                        [*prefix, sys.executable, "-m", "tests.bench.generator", "child"],
                        cwd=REPO_ROOT,
                        env={**env, SPEC_ENV: json.dumps(spec)},
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                    )
                children.append((child, out_path, err_path))
            deadline = START_DELAY + settings.warm_up_seconds + settings.seconds + TIMEOUT + 30
            for child, out_path, err_path in children:
                child.wait(deadline)
                errors = err_path.read_bytes()
                if log is not None and errors:
                    with log.open("ab") as handle:
                        handle.write(errors)
                if child.returncode != 0:
                    raise RuntimeError(
                        f"generator child failed ({child.returncode}):\n"
                        + errors.decode(errors="replace")[-3000:]
                    )
                outputs.append(json.loads(out_path.read_text().strip().splitlines()[-1]))
        finally:
            for child, _, _ in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    latencies = sorted(value for out in outputs for value in out["latencies_ms"])
    non_ok: Counter[str] = Counter()
    for out in outputs:
        non_ok.update(out["non_ok"])
    items = sum(out["items"] for out in outputs)
    return GenResult(
        requests_per_second=items / settings.seconds,
        items=items,
        items_total=sum(out["items_total"] for out in outputs),
        requests_total=sum(out["requests_total"] for out in outputs),
        non_ok=dict(non_ok),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        first_error=next((out["first_error"] for out in outputs if out["first_error"]), ""),
        per_process=[out["items"] / settings.seconds for out in outputs],
        cpu_share=sum(out["cpu_seconds"] for out in outputs) / settings.seconds,
    )


# -- child ------------------------------------------------------------------------------------------


async def _child(spec: dict[str, Any], token: str) -> dict[str, Any]:
    steps = [Step(s["method"], base64.b64decode(s["template"])) for s in spec["steps"]]
    parts = [s.parts() for s in steps]
    varies = [s.varies() for s in steps]
    metadata = (("authorization", f"Bearer {token}"),)
    channels = [
        grpc.aio.insecure_channel(spec["target"], options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    for channel in channels:
        await channel.channel_ready()
    # Identity serializers: bodies go out as they are, replies stay bytes.
    callables = [[channel.unary_unary(s.method) for s in steps] for channel in channels]
    numbers = itertools.count(spec["offset"], spec["stride"])
    base = int(spec["base"])
    # The wall clock only to agree on the start across processes; then the monotonic clock.
    mono_start = time.monotonic() + max(float(spec["start_at"]) - time.time(), 0.0)
    mono_from = mono_start + float(spec["warm_up_seconds"])
    mono_stop = mono_from + float(spec["seconds"])
    latencies: list[float] = []
    counts = {"items": 0, "items_total": 0, "requests_total": 0}
    non_ok: Counter[str] = Counter()
    first_error = ""

    async def worker(index: int) -> None:
        nonlocal first_error
        calls = callables[index % len(callables)]
        await asyncio.sleep(max(mono_start - time.monotonic(), 0.0))
        while time.monotonic() < mono_stop:
            n = number(base, next(numbers))
            began = time.monotonic()
            ok = True
            for call, (head, tail), vary in zip(calls, parts, varies, strict=True):
                body = head + n + tail if vary else head
                try:
                    await call(body, metadata=metadata, timeout=TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    non_ok[error.code().name] += 1
                    if not first_error:
                        first_error = f"{error.code().name}: {error.details()}"
                    ok = False
                    break
                counts["requests_total"] += 1
            ended = time.monotonic()
            if not ok:
                return  # the run fails anyway; do not hammer a server that refuses
            counts["items_total"] += 1
            if mono_from <= ended < mono_stop:
                counts["items"] += 1
                latencies.append((ended - began) * 1000.0)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(int(spec["concurrency"]))]

    await asyncio.sleep(max(mono_from - time.monotonic(), 0.0))
    cpu_from = time.process_time()
    await asyncio.sleep(max(mono_stop - time.monotonic(), 0.0))
    cpu_measured = time.process_time() - cpu_from
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {
        **counts,
        "non_ok": dict(non_ok),
        "first_error": first_error,
        "latencies_ms": [round(v, 3) for v in latencies],
        "cpu_seconds": cpu_measured,
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
