"""Load a gRPC method with h2load (nghttp2), an independent HTTP/2 load generator, and read back
throughput and per-request latency. h2load knows nothing of gRPC: the body is the 5-byte gRPC frame
header plus the serialized request, and a gRPC error still counts as HTTP 200, so callers check the
server's own count of non-OK replies."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
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
    body_path = folder / f"{method.strip('/').replace('/', '.')}.body"
    body_path.write_bytes(body)
    log_path = folder / "h2load-requests.log"
    log_path.unlink(missing_ok=True)
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
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    output = completed.stdout
    finished = _FINISHED.search(output)
    counts = _REQUESTS.search(output)
    if completed.returncode != 0 or not finished or not counts:
        raise RuntimeError(f"h2load failed ({completed.returncode}):\n{output}\n{completed.stderr}")
    durations = sorted(_durations_ms(log_path))
    total, _started, _done, succeeded, failed, errored = (int(v) for v in counts.groups())
    return LoadResult(
        requests_per_second=float(finished.group(1)),
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
