"""Load a gRPC method with h2load (nghttp2), an independent HTTP/2 load generator, and read back
throughput and per-request latency. h2load knows nothing of gRPC: the body is the 5-byte gRPC frame
header plus the serialized request, and a gRPC error still counts as HTTP 200, so callers check the
server's own count of non-OK replies."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf.message import Message

from tests.bench.stats import percentile


@dataclass(frozen=True)
class LoadSettings:
    clients: int = 16  # h2load -c: connections
    streams: int = 16  # h2load -m: concurrent streams per connection
    seconds: float = 5.0  # h2load -D: measured duration
    warm_up_seconds: float = 1.0  # h2load --warm-up-time: not measured
    threads: int = 1  # h2load -t


@dataclass
class LoadResult:
    requests_per_second: float
    requests: int
    succeeded: int
    failed: int
    errored: int
    p50_ms: float
    p99_ms: float


def ensure_h2load() -> str:
    """h2load from Debian's nghttp2-client, installed when missing."""
    found = shutil.which("h2load")
    if found:
        return found
    print("installing h2load (Debian nghttp2-client) ...", flush=True)
    sudo = [] if _is_root() else ["sudo"]
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "nghttp2-client"], check=True
    )
    found = shutil.which("h2load")
    if not found:
        raise RuntimeError("h2load is still missing after installing nghttp2-client")
    return found


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def grpc_body(message: Message) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, payload."""
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


_FINISHED = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)


def _command(
    target: str,
    method: str,
    body_path: Path,
    log_path: Path,
    token: str | None,
    settings: LoadSettings,
    cpu: str | None,
) -> list[str]:
    command = [
        *(["taskset", "-c", cpu] if cpu else []),
        ensure_h2load(),
        "-c",
        str(settings.clients),
        "-m",
        str(settings.streams),
        "-t",
        str(settings.threads),
        "-D",
        f"{round(settings.seconds * 1000)}ms",
        "--warm-up-time",
        f"{round(settings.warm_up_seconds * 1000)}ms",
        "-d",
        str(body_path),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(log_path),
    ]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    command.append(f"http://{target}{method}")
    return command


def _counts(returncode: int, output: str, errors: str) -> tuple[float, tuple[int, ...]]:
    finished = _FINISHED.search(output)
    counts = _REQUESTS.search(output)
    if returncode != 0 or not finished or not counts:
        raise RuntimeError(f"h2load failed ({returncode}):\n{output}\n{errors}")
    return float(finished.group(1)), tuple(int(v) for v in counts.groups())


def run(
    target: str,
    method: str,
    body: bytes,
    token: str | None,
    settings: LoadSettings,
    folder: Path,
    cpu: str | None = None,
) -> LoadResult:
    """One h2load run against http://target/method (on the given CPUs, `taskset -c`, if any)."""
    return run_split([target], method, body, token, settings, folder, cpu)


def run_split(
    targets: list[str],
    method: str,
    body: bytes,
    token: str | None,
    settings: LoadSettings,
    folder: Path,
    cpu: str | None = None,
) -> LoadResult:
    """h2load against each target at the same time, `settings.clients` split evenly between them (one
    h2load process each): the rates summed, the latencies of all requests together."""
    if settings.clients % len(targets):
        raise ValueError(f"{settings.clients} h2load clients do not split evenly over {len(targets)} servers")
    share = replace(settings, clients=settings.clients // len(targets))
    body_path = folder / f"{method.strip('/').replace('/', '.')}.body"
    body_path.write_bytes(body)
    logs = [folder / f"h2load-requests-{index}.log" for index in range(len(targets))]
    processes = []
    for target, log_path in zip(targets, logs, strict=True):
        log_path.unlink(missing_ok=True)
        command = _command(target, method, body_path, log_path, token, share, cpu)
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rate = 0.0
    totals = [0, 0, 0, 0, 0, 0]
    for process in processes:
        output, errors = process.communicate()
        one_rate, counts = _counts(process.returncode, output, errors)
        rate += one_rate
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
    durations = sorted(d for log_path in logs for d in _durations_ms(log_path))
    total, _started, _done, succeeded, failed, errored = totals
    return LoadResult(
        requests_per_second=rate,
        requests=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        p50_ms=percentile(durations, 0.50),
        p99_ms=percentile(durations, 0.99),
    )


def _durations_ms(log_path: Path) -> list[float]:
    """h2load's --log-file: one line per request, `start (µs since epoch)\\tstatus\\tduration (µs)`."""
    durations = []
    for line in log_path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            durations.append(int(fields[2]) / 1000.0)
    return durations
