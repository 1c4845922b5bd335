"""Fan-out benchmarks for WatchCall: delivery latency to many watchers, and server memory per idle stream.

Fan-out (`measure_fanout`): child processes (`python -m tests.bench.fanout watch`) open the watchers as
WatchCall streams "from now" on one call, at most `PER_CHANNEL` streams per channel (each channel its own
connection). They read raw bytes (no deserializer) and only note `(time.monotonic(), bytes)` per message,
so receiving stays cheap; messages are parsed after the run. A child says `ready` once every stream got
its first (progress) message. The parent then sends UpdateCall with `set_custom {"bench_n": i}` on a fixed
open-loop schedule (`start + i / rate`, each send its own task, so a slow reply never delays the next
one) and notes when each was sent and acknowledged. A child says `done` once every stream has all the
events (or the parent gives up `DRAIN_SECONDS` after the last ack), then on `stop` prints one JSON line:
for each update, when each stream received it, plus per-stream counts, duplicates and stream errors.
CLOCK_MONOTONIC is shared by all processes on Linux, so the children's receive times compare directly
with the parent's send and ack times. Expected deliveries are watchers × acknowledged updates (a failed
update may have produced no event; events of failed updates count as `unexpected`). Latency is
ack→received (negative when an event outran its ack: clamped at 0 and counted) and send→received;
percentiles are over every delivery.

Idle memory (`measure_idle_rss`): children (`... idle`) open `streams` WatchCall streams, round-robin over
the given calls, in paced batches; once all are open and have their first message, the parent waits 3 s
and reads the server's VmRSS and VmHWM from /proc. per_stream_kb = (RSS with streams - RSS before) /
streams.

Children end on `stop`, on end of stdin (the parent died) or on their own deadline; the parent kills
them on any error, and every wait has a timeout, so a failing child raises instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import struct_pb2

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, event_service_pb2
from tests.bench.stats import percentile, proc_status

REPO_ROOT = Path(__file__).resolve().parents[2]
WATCH_CALL = "/callplane.v1.EventService/WatchCall"
#: Streams per channel (each channel gets its own connection).
PER_CHANNEL = 200
#: Streams opened at once by one child before waiting for their first messages.
OPEN_BATCH = 250
#: How long children get, after the last ack, to receive everything.
DRAIN_SECONDS = 30.0
#: Deadline of one UpdateCall: generous, since an overloaded server acks late, and a cancelled write is
#: worse than a slow one (it can disturb the server for the runs that follow).
UPDATE_TIMEOUT = 120.0
#: First byte of a serialized WatchCallResponse carrying `event` (field 2, length-delimited).
EVENT_TAG = 0x12
#: Children get the token here rather than on their command line (visible in `ps`).
TOKEN_ENV = "CALLPLANE_BENCH_TOKEN"
#: Output lines of a child can be large (one JSON line with every receive time).
LINE_LIMIT = 1 << 30


class BenchError(RuntimeError):
    """A benchmark run failed (a child died, timed out, or an RPC failed)."""


class ChildTimeout(BenchError):
    """A child did not say what was expected in time."""


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _channel(target: str) -> grpc.aio.Channel:
    # A local subchannel pool gives every channel its own connection (otherwise channels with the same
    # target and arguments share one).
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _ms(value: float) -> float:
    return round(value * 1000, 3)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- children ---------------------------------------------------------------------------------------


@dataclass
class _Stream:
    call: Any = None
    messages: list[tuple[float, bytes]] = field(default_factory=list)
    events: int = 0
    complete: bool = False
    first: asyncio.Future[None] | None = None
    error: str | None = None


class _Watchers:
    """WatchCall streams of one child, receiving raw bytes into memory."""

    def __init__(
        self, target: str, token: str, calls: list[tuple[str, str]], *, keep: bool, expected: int = 0
    ) -> None:
        self._target = target
        self._metadata = _metadata(token)
        self._calls = calls
        self._keep = keep
        self._expected = expected
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.streams: list[_Stream] = []
        self.stopping = False
        self.complete = asyncio.Event()
        self._incomplete = 0

    def expect(self, expected: int) -> None:
        """Sets how many events every stream should get; `complete` is set once all have them."""
        self._expected = expected
        for stream in self.streams:
            stream.complete = stream.complete or stream.events >= expected
        self._incomplete = sum(1 for stream in self.streams if not stream.complete)
        if self._incomplete == 0:
            self.complete.set()

    async def open(self, count: int, first_index: int) -> None:
        """Opens `count` streams in batches; returns once each got its first message (raises if one fails)."""
        loop = asyncio.get_running_loop()
        for start in range(0, count, OPEN_BATCH):
            batch: list[_Stream] = []
            for index in range(start, min(count, start + OPEN_BATCH)):
                if index % PER_CHANNEL == 0:
                    self._channels.append(_channel(self._target))
                channel = self._channels[-1]
                watch = channel.unary_stream(
                    WATCH_CALL,
                    request_serializer=event_service_pb2.WatchCallRequest.SerializeToString,
                    response_deserializer=lambda raw: raw,
                )
                call_type, call_id = self._calls[(first_index + index) % len(self._calls)]
                stream = _Stream(first=loop.create_future())
                stream.call = watch(
                    event_service_pb2.WatchCallRequest(type=call_type, id=call_id), metadata=self._metadata
                )
                self.streams.append(stream)
                batch.append(stream)
                self._tasks.append(asyncio.create_task(self._receive(stream)))
            await asyncio.gather(*(stream.first for stream in batch if stream.first is not None))
        if self._expected > 0:
            self.expect(self._expected)

    async def _receive(self, stream: _Stream) -> None:
        clock = time.monotonic
        messages = stream.messages
        keep = self._keep
        call = stream.call
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                now = clock()
                if keep:
                    messages.append((now, raw))
                if stream.first is not None and not stream.first.done():
                    stream.first.set_result(None)
                if raw and raw[0] == EVENT_TAG:
                    stream.events += 1
                    if not stream.complete and 0 < self._expected <= stream.events:
                        stream.complete = True
                        self._incomplete -= 1
                        if self._incomplete == 0:
                            self.complete.set()
            if not self.stopping:
                stream.error = "ended early (OK)"
        except asyncio.CancelledError:
            if not self.stopping:
                stream.error = "cancelled"
        except grpc.aio.AioRpcError as error:
            if not (self.stopping and error.code() == grpc.StatusCode.CANCELLED):
                stream.error = f"{error.code().name}: {error.details()}"
        except Exception as error:  # reported: one stream must not stop the rest
            stream.error = f"{type(error).__name__}: {error}"
        if stream.first is not None and not stream.first.done():
            stream.first.set_exception(BenchError(f"stream ended before its first message: {stream.error}"))

    async def close(self) -> None:
        self.stopping = True
        for stream in self.streams:
            if stream.call is not None:
                stream.call.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        for channel in self._channels:
            await channel.close(grace=None)


def _bench_number(raw: bytes) -> tuple[int, int | None]:
    """(seq, bench_n) of a serialized event message; bench_n is None for other events."""
    message = event_service_pb2.WatchCallResponse.FromString(raw)
    event = message.event
    if event.WhichOneof("payload") != "call_updated":
        return event.seq, None
    custom = event.call_updated.call.custom
    if "bench_n" not in custom.fields:
        return event.seq, None
    return event.seq, int(custom.fields["bench_n"].number_value)


def _summarize_watch(watchers: _Watchers) -> dict[str, Any]:
    """Parses every message once per distinct payload: the same event is the same bytes on every stream."""
    parsed: dict[bytes, tuple[int, int | None]] = {}
    times: dict[int, list[float]] = {}
    counts: list[int] = []
    duplicates = out_of_order = other_events = progress = 0
    for stream in watchers.streams:
        seen: set[int] = set()
        last_seq = 0
        for at, raw in stream.messages:
            if not raw or raw[0] != EVENT_TAG:
                progress += 1
                continue
            info = parsed.get(raw)
            if info is None:
                info = parsed[raw] = _bench_number(raw)
            seq, number = info
            if seq <= last_seq:
                out_of_order += 1
            last_seq = max(last_seq, seq)
            if number is None:
                other_events += 1
                continue
            if number in seen:
                duplicates += 1
                continue
            seen.add(number)
            times.setdefault(number, []).append(at)
        counts.append(len(seen))
    errors = [stream.error for stream in watchers.streams if stream.error]
    return {
        "times": {str(number): values for number, values in times.items()},
        "counts": counts,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "other_events": other_events,
        "progress": progress,
        "stream_errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
    }


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _wait_stop(stdin: asyncio.StreamReader, deadline: float, watchers: _Watchers) -> None:
    """Returns on a `stop` line, end of stdin (the parent is gone) or the deadline; `expect N` lowers the
    event count that makes the child say `done` (when some updates failed)."""

    async def stop_line() -> None:
        while True:
            line = await stdin.readline()
            if not line or line.strip() == b"stop":
                return
            word, _, number = line.decode().partition(" ")
            if word == "expect":
                watchers.expect(int(number))

    stop = asyncio.create_task(stop_line())
    try:
        await asyncio.wait_for(stop, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        print("child deadline reached before stop", file=sys.stderr, flush=True)
    finally:
        stop.cancel()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _child(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.max_seconds
    calls = [(spec.partition(":")[0], spec.partition(":")[2]) for spec in args.call]
    keep = args.command == "watch"
    watchers = _Watchers(args.target, args.token, calls, keep=keep, expected=args.expected if keep else 0)
    stdin = await _stdin_reader()
    try:
        await asyncio.wait_for(watchers.open(args.streams, args.first_index), args.open_timeout)
    except Exception as error:
        await watchers.close()
        print(f"opening {args.streams} streams failed: {error!r}", file=sys.stderr, flush=True)
        return 2
    opened = time.monotonic()
    _say("ready")

    async def announce_complete() -> None:
        await watchers.complete.wait()
        _say("done")

    announcer = asyncio.create_task(announce_complete()) if keep and args.expected > 0 else None
    await _wait_stop(stdin, deadline, watchers)
    if announcer is not None:
        announcer.cancel()
    await watchers.close()
    cpu = time.process_time()
    result: dict[str, Any] = {"streams": len(watchers.streams), "open_seconds": opened - started}
    if keep:
        result.update(_summarize_watch(watchers))
    else:
        errors = [stream.error for stream in watchers.streams if stream.error]
        result.update(stream_errors=len(errors), error_samples=sorted(set(errors))[:5])
    result["cpu_seconds"] = cpu
    result["wall_seconds"] = time.monotonic() - started
    _say(json.dumps(result, separators=(",", ":")))
    return 0


# -- parent -----------------------------------------------------------------------------------------


class _Child:
    """One child process, with its stderr in a temporary file for error messages."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: IO[bytes], name: str) -> None:
        self.proc = proc
        self.stderr = stderr
        self.name = name

    @classmethod
    async def start(
        cls,
        name: str,
        argv: list[str],
        token: str,
        *,
        module: str = "tests.bench.fanout",
        prefix: Sequence[str] = (),
    ) -> _Child:
        """`python -m module *argv`, after `prefix` (e.g. taskset's) when given."""
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the child's life, closed by kill()
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                sys.executable,
                "-m",
                module,
                *argv,
                cwd=REPO_ROOT,
                env={
                    **os.environ,
                    TOKEN_ENV: token,
                    "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR"),
                },
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=LINE_LIMIT,
            )
        except BaseException:
            stderr.close()
            raise
        return cls(proc, stderr, name)

    def stderr_tail(self, limit: int = 2000) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:].strip()

    async def expect(self, word: str | None, within: float) -> str:
        """Reads the next stdout line (must equal `word` when given); raises on EOF or timeout."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, within))
        except TimeoutError:
            raise ChildTimeout(
                f"{self.name}: no {word or 'output'!r} within {within:.0f}s; stderr: {self.stderr_tail()}"
            ) from None
        if not line:
            code = await self._exit_code()
            raise BenchError(
                f"{self.name} exited ({code}) before {word or 'output'!r}; stderr: {self.stderr_tail()}"
            )
        text = line.decode().strip()
        if word is not None and text != word:
            raise BenchError(f"{self.name}: expected {word!r}, got {text[:200]!r}")
        return text

    async def _exit_code(self) -> int | None:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.proc.wait(), 5)
        return None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write(line.encode() + b"\n")

    async def finish(self, within: float) -> None:
        """Waits for a clean exit after the result line."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise BenchError(f"{self.name} did not exit within {within:.0f}s") from None
        if code != 0:
            raise BenchError(f"{self.name} exited with {code}; stderr: {self.stderr_tail()}")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        self.stderr.close()


def _shares(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total)) if total > 0 else 1
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


async def _start_children(
    command: str,
    target: str,
    token: str,
    calls: list[tuple[str, str]],
    total: int,
    processes: int,
    extra: list[str],
    max_seconds: float,
) -> list[_Child]:
    children: list[_Child] = []
    first = 0
    try:
        for number, share in enumerate(_shares(total, processes)):
            argv = [command, "--target", target, "--streams", str(share)]
            argv += ["--first-index", str(first), "--max-seconds", str(max_seconds), *extra]
            for call_type, call_id in calls:
                argv += ["--call", f"{call_type}:{call_id}"]
            children.append(await _Child.start(f"{command} child {number} ({share} streams)", argv, token))
            first += share
    except BaseException:
        await asyncio.gather(*(child.kill() for child in children))
        raise
    return children


def _open_timeout(streams: int) -> float:
    return 60.0 + streams / 50


async def _await_all(children: list[_Child], word: str | None, within: float) -> list[str]:
    return list(await asyncio.gather(*(child.expect(word, within) for child in children)))


async def _results(children: list[_Child], within: float) -> list[dict[str, Any]]:
    """The JSON result line of every child (skipping a `done` that came after all)."""
    deadline = time.monotonic() + within

    async def one(child: _Child) -> dict[str, Any]:
        while True:
            line = await child.expect(None, deadline - time.monotonic())
            if line.startswith("{"):
                return json.loads(line)

    return list(await asyncio.gather(*(one(child) for child in children)))


async def measure_fanout(
    target: str,
    token: str,
    call_type: str,
    call_id: str,
    *,
    watchers: int = 1000,
    rate: float = 100.0,
    seconds: float = 10.0,
    processes: int = 2,
) -> dict:
    """Delivery of `rate * seconds` UpdateCalls to `watchers` WatchCall streams on one call (see top)."""
    updates = int(rate * seconds)
    open_timeout = _open_timeout(watchers)
    max_seconds = open_timeout + seconds + UPDATE_TIMEOUT + DRAIN_SECONDS + 120
    children = await _start_children(
        "watch",
        target,
        token,
        [(call_type, call_id)],
        watchers,
        processes,
        ["--expected", str(updates), "--open-timeout", str(open_timeout)],
        max_seconds,
    )
    channel = _channel(target)
    try:
        opening = time.monotonic()
        await _await_all(children, "ready", open_timeout + 10)
        ready_seconds = time.monotonic() - opening

        update = call_service_pb2_grpc.CallServiceStub(channel).UpdateCall
        metadata = _metadata(token)
        await asyncio.wait_for(channel.channel_ready(), 10)
        sent: list[float] = [0.0] * updates
        acked: list[float | None] = [None] * updates
        failures: list[str] = []

        async def send(number: int) -> None:
            custom = struct_pb2.Struct()
            custom.update({"bench_n": number})
            request = call_service_pb2.UpdateCallRequest(type=call_type, id=call_id, set_custom=custom)
            sent[number] = time.monotonic()
            try:
                await update(request, metadata=metadata, timeout=UPDATE_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{number}: {error.code().name}: {error.details()}")
                return
            acked[number] = time.monotonic()

        start = time.monotonic() + 0.2
        tasks: list[asyncio.Task[None]] = []
        worst_lag = 0.0
        for number in range(updates):
            due = start + number / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, time.monotonic() - due)
            tasks.append(asyncio.create_task(send(number)))
        if tasks:
            await asyncio.wait(tasks)
        send_seconds = (max(sent) - min(sent)) if updates else 0.0
        acks = [at for at in acked if at is not None]
        last_ack = max(acks, default=time.monotonic())

        # Every child says `done` once each of its streams has as many events as there were acks (an update
        # that failed yet committed may count in place of one still on its way: then `missing` tells);
        # give up DRAIN_SECONDS after the last ack.
        if len(acks) < updates:
            for child in children:
                child.send(f"expect {len(acks)}")
        drained = True
        if acks:
            try:
                await _await_all(children, "done", last_ack + DRAIN_SECONDS - time.monotonic())
            except ChildTimeout:
                drained = False
        drain_seconds = time.monotonic() - last_ack
        for child in children:
            child.send("stop")
        results = await _results(children, 300)
        await asyncio.gather(*(child.finish(30) for child in children))
    finally:
        await channel.close(grace=None)
        await asyncio.gather(*(child.kill() for child in children))

    ack_latency: list[float] = []
    send_latency: list[float] = []
    before_ack = delivered = unexpected = 0
    for result in results:
        for key, times in result["times"].items():
            number = int(key)
            ack = acked[number] if 0 <= number < updates else None
            if ack is None:
                unexpected += len(times)
                continue
            delivered += len(times)
            for at in times:
                lag = at - ack
                if lag < 0:
                    before_ack += 1
                    lag = 0.0
                ack_latency.append(lag)
                send_latency.append(at - sent[number])
    ack_latency.sort()
    send_latency.sort()
    last_receive = max((max(times) for result in results for times in result["times"].values()), default=0.0)
    first_send = min(sent, default=0.0)
    expected = watchers * len(acks)
    ack_times = sorted(at - sent[number] for number, at in enumerate(acked) if at is not None)
    counts = [count for result in results for count in result["counts"]]
    cpu = [round(result["cpu_seconds"], 2) for result in results]
    return {
        "watchers": watchers,
        "processes": len(children),
        "rate": rate,
        "updates_sent": updates,
        "updates_acked": len(acks),
        "all_acked": len(acks) == updates,
        "update_errors": failures[:5],
        "expected_deliveries": expected,
        "delivered": delivered,
        "missing": expected - delivered,
        "duplicates": sum(result["duplicates"] for result in results),
        "out_of_order": sum(result["out_of_order"] for result in results),
        "unexpected": unexpected,
        "stream_errors": sum(result["stream_errors"] for result in results),
        "stream_error_samples": sorted({s for result in results for s in result["error_samples"]})[:5],
        "streams_complete": sum(1 for count in counts if count >= len(acks)),
        "min_stream_count": min(counts, default=0),
        "latency_ms": {
            "p50": _ms(percentile(ack_latency, 0.50)),
            "p90": _ms(percentile(ack_latency, 0.90)),
            "p99": _ms(percentile(ack_latency, 0.99)),
            "max": _ms(ack_latency[-1] if ack_latency else 0.0),
        },
        "received_before_ack": before_ack,
        "send_latency_ms": {
            "p50": _ms(percentile(send_latency, 0.50)),
            "p99": _ms(percentile(send_latency, 0.99)),
        },
        "ack_ms": {"p50": _ms(percentile(ack_times, 0.50)), "p99": _ms(percentile(ack_times, 0.99))},
        "send_seconds": round(send_seconds, 3),
        # Achieved fan-out: deliveries per second from the first send to the last receive.
        "deliveries_per_second": round(delivered / (last_receive - first_send), 1)
        if delivered and last_receive > first_send
        else 0.0,
        "worst_send_lag_ms": _ms(worst_lag),
        "drained": drained,
        "drain_seconds": round(drain_seconds, 3),
        "ready_seconds": round(ready_seconds, 3),
        "client_cpu_seconds": cpu,
    }


async def measure_idle_rss(
    target: str,
    token: str,
    server_pid: int,
    calls: list[tuple[str, str]],
    *,
    streams: int = 10000,
    processes: int = 2,
) -> dict:
    """Server memory held by `streams` idle WatchCall streams, round-robin over `calls` (see top)."""
    if not calls:
        raise ValueError("measure_idle_rss needs at least one call")
    before = proc_status(server_pid)["VmRSS"]
    cpu_before = _cpu_seconds(server_pid)
    open_timeout = _open_timeout(streams)
    children = await _start_children(
        "idle",
        target,
        token,
        calls,
        streams,
        processes,
        ["--open-timeout", str(open_timeout)],
        open_timeout + 300,
    )
    try:
        opening = time.monotonic()
        await _await_all(children, "ready", open_timeout + 10)
        open_seconds = time.monotonic() - opening
        open_cpu = _cpu_seconds(server_pid) - cpu_before
        await asyncio.sleep(3)
        during = proc_status(server_pid)
        for child in children:
            child.send("stop")
        results = await _results(children, 120)
        await asyncio.gather(*(child.finish(30) for child in children))
    finally:
        await asyncio.gather(*(child.kill() for child in children))
    return {
        "streams": streams,
        "rss_before_mb": round(before / 1024, 1),
        "rss_with_streams_mb": round(during["VmRSS"] / 1024, 1),
        "hwm_mb": round(during["VmHWM"] / 1024, 1),
        "per_stream_kb": round((during["VmRSS"] - before) / streams, 2) if streams else 0.0,
        "stream_errors": sum(result["stream_errors"] for result in results),
        "open_seconds": round(open_seconds, 3),
        "server_cpu_open_seconds": round(open_cpu, 2),
        "client_cpu_seconds": [round(result["cpu_seconds"], 2) for result in results],
    }


# -- command line -----------------------------------------------------------------------------------


async def _get_or_create(target: str, token: str, calls: list[tuple[str, str]]) -> None:
    async with _channel(target) as channel:
        stub = call_service_pb2_grpc.CallServiceStub(channel)
        for call_type, call_id in calls:
            request = call_service_pb2.GetOrCreateCallRequest(type=call_type, id=call_id)
            await stub.GetOrCreateCall(request, metadata=_metadata(token), timeout=10)


async def _demo(args: argparse.Namespace) -> None:
    fanout_call = ("default", "fanout-demo")
    idle_calls = [("default", f"fanout-idle-{index}") for index in range(10)]
    await _get_or_create(args.target, args.token, [fanout_call, *idle_calls])
    fanout = await measure_fanout(
        args.target,
        args.token,
        *fanout_call,
        watchers=args.watchers,
        rate=args.rate,
        seconds=args.seconds,
        processes=args.processes,
    )
    print(json.dumps({"fanout": fanout}, indent=2), flush=True)
    idle = await measure_idle_rss(
        args.target, args.token, args.pid, idle_calls, streams=args.streams, processes=args.processes
    )
    print(json.dumps({"idle_rss": idle}, indent=2), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fanout", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("watch", "child: watch one call, report receive times"),
        ("idle", "child: idle streams"),
    ):
        child = commands.add_parser(name, help=text)
        child.add_argument("--target", required=True)
        child.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"default: ${TOKEN_ENV}")
        child.add_argument("--call", action="append", required=True, help="TYPE:ID (repeat: round-robin)")
        child.add_argument("--streams", type=int, required=True)
        child.add_argument("--first-index", type=int, default=0, help="round-robin offset over --call")
        child.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this")
        child.add_argument("--open-timeout", type=float, default=120.0)
        if name == "watch":
            child.add_argument("--expected", type=int, default=0, help="events per stream before `done`")
    demo = commands.add_parser("demo", help="small fan-out and idle-memory runs against a running server")
    demo.add_argument("--target", required=True)
    demo.add_argument("--token", required=True)
    demo.add_argument("--pid", type=int, required=True, help="server process id (for /proc/PID/status)")
    demo.add_argument("--watchers", type=int, default=50)
    demo.add_argument("--rate", type=float, default=20.0)
    demo.add_argument("--seconds", type=float, default=3.0)
    demo.add_argument("--streams", type=int, default=500)
    demo.add_argument("--processes", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.token:
        parser.error(f"--token (or ${TOKEN_ENV}) is required")
    if args.command == "demo":
        asyncio.run(_demo(args))
        return 0
    return asyncio.run(_child(args))


if __name__ == "__main__":
    sys.exit(main())
