"""Webhook delivery (issue 14): events/s delivered to a local receiver, and commit → delivery latency.

Per backend, on a fresh database holding only what this part needs (`calls` calls with one member, not
the 100,000-call seed): a Callplane server (`callplane serve --webhook-allow-private`, every other webhook
setting at its default, e.g. 16 attempts in flight per endpoint) pinned to CPU 0; two child processes
pinned to CPU 1: the receiver (`python -m tests.bench.webhooks receive`: aiohttp.web answering 204 at
once and only noting `(time.monotonic(), time.time(), headers, body)` per request; nothing is parsed or
verified while it runs) and the load generator (`... generate`: grpc.aio over 4 connections, raw-bytes
SendCallEvent bodies, one `custom` event per request, round-robin over the calls). PostgreSQL itself is
not pinned. Phases:

1. **No endpoint**: the generator at full speed (`in_flight` requests in flight) for `seconds`: the write
   rate without webhooks.
2. One endpoint (`http://127.0.0.1:PORT/hook`, every event) created, and one event per call delivered
   (a warm-up, not measured).
3. **Paced**: for each of `rates`, that many SendCallEvents/s on an open-loop schedule (each its own
   task) for `paced_seconds`: the latency of delivery when it keeps up.
4. **Full speed**: as 1, with the endpoint: the writes and the deliveries share the server's core.
5. **Replay**: RedeliverWebhook from the position before phase 4: its events sent again from the log
   while nothing is written, the delivery path alone (checked like a phase; the same `webhook-id`s).

After each phase with the endpoint the bench waits until the receiver holds every event appended (giving
up once nothing new arrived for `drain_seconds`), then checks what it measured: every reply OK (the
generator's count and the server's own, /metrics); the `events` rows appended in the phase (counted in the
database) = the OK replies = the distinct `webhook-id`s received, each of them `evt_<position>` of the
event in its body and every acknowledged (call, seq) among them; every request's Standard Webhooks
signature verified with `standardwebhooks` and the endpoint's secret (all of them, after the phase); per
call, first receipts in increasing seq (the ordering guarantee); repeated receipts (same `webhook-id`)
counted; and the endpoint's `delivered_position` (GetWebhook) reaching the phase's last event. Any
failure stops the bench.

Figures: **throughput** = distinct events received ÷ (first acknowledgement → last receipt). **Latency**
per event, at its first receipt: from the generator's OK reply (`ack → delivery`: the write committed
before its reply, so this is at most the commit → delivery time; clamped at 0, and counted, when the
delivery came first), and from the event's `createdAt` (the server's wall clock inside the write's
transaction, just before its commit) to the receipt on the wall clock (`createdAt → delivery`, the same
machine's clock). Percentiles are nearest-rank over every event of the phase. Also: the write rate
(OK replies ÷ first send → last ack), the backlog (events acknowledged but not yet received) when the
writes ended, the drain time after it, and the CPU used by the server and by each child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from callplane.v1 import (
    call_data_service_pb2,
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from callplane_server import runtime
from tests.bench.fanout import TOKEN_ENV, BenchError, _Child, _cpu_seconds, _say, _stdin_reader
from tests.bench.stats import percentile

SEND_CALL_EVENT = "/callplane.v1.CallDataService/SendCallEvent"
CALL_TYPE = "default"
USER = "wh-bench-user"
#: Connections of the generator (its requests in flight spread over them).
CHANNELS = 4
#: Deadline of one SendCallEvent: generous (a cancelled write is worse than a slow one).
TIMEOUT = 120.0
#: Seconds a child gets for one command (a phase is at most this long, plus its own length).
COMMAND_SLACK = 180.0


@dataclass(frozen=True)
class WebhookSettings:
    calls: int = 50
    in_flight: int = 64
    seconds: float = 10.0  # full-speed phases (with and without the endpoint)
    rates: tuple[float, ...] = (50.0, 200.0)  # paced phases: SendCallEvents per second
    paced_seconds: float = 10.0
    drain_seconds: float = 60.0  # give up waiting for deliveries after this long without progress
    #: py-spy the server during the paced and full-speed phases, into this folder (None: not profiled).
    profile_dir: str | None = None

    @classmethod
    def quick_settings(cls) -> WebhookSettings:
        return cls(seconds=3.0, paced_seconds=3.0)


def call_id(index: int) -> str:
    return f"wh-{index:03d}"


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _log(backend: str, text: str) -> None:
    print(f"[{backend}] webhooks: {text}", flush=True)


# -- the receiver (child) -----------------------------------------------------------------------------


async def _receive(args: argparse.Namespace) -> int:
    from aiohttp import web

    #: (monotonic, wall clock, webhook-id, webhook-timestamp, webhook-signature, body) per request.
    received: list[tuple[float, float, str, str, str, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        received.append(
            (
                time.monotonic(),
                time.time(),
                headers.get("webhook-id", ""),
                headers.get("webhook-timestamp", ""),
                headers.get("webhook-signature", ""),
                body,
            )
        )
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    stdin = await _stdin_reader()
    _say("ready")
    try:
        while True:
            line = await stdin.readline()
            if not line:
                break
            command = json.loads(line)
            if command["op"] == "count":
                reply: dict[str, Any] = {
                    "received": len(received),
                    "unique": len({record[2] for record in received}),
                    "cpu_seconds": time.process_time(),
                }
            elif command["op"] == "take":
                taken, received = received, []
                reply = _verified(taken, command["secret"])
            else:
                _say(json.dumps({"closed": True}))
                break
            _say(json.dumps(reply, separators=(",", ":")))
    finally:
        await runner.cleanup()
    return 0


def _verified(taken: list[tuple[float, float, str, str, str, bytes]], secret: str) -> dict[str, Any]:
    """Every request's signature checked with standardwebhooks, and the fields the parent needs."""
    from google.protobuf import timestamp_pb2
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    webhook = Webhook(secret)
    records = []
    bad: list[str] = []
    for mono, wall, message_id, stamp, signature, body in taken:
        headers = {"webhook-id": message_id, "webhook-timestamp": stamp, "webhook-signature": signature}
        try:
            event = webhook.verify(body, headers)
        except WebhookVerificationError as error:
            bad.append(f"{message_id}: {error}")
            continue
        created = timestamp_pb2.Timestamp()
        created.FromJsonString(event["createdAt"])
        records.append(
            [
                message_id,
                mono,
                wall,
                int(event["position"]),
                event["callCid"],
                int(event["seq"]),
                created.ToNanoseconds() / 1e9,
                event["type"],
            ]
        )
    return {"records": records, "verified": len(records), "bad_signatures": len(bad), "bad": bad[:5]}


# -- the load generator (child) -----------------------------------------------------------------------


async def _generate(args: argparse.Namespace) -> int:
    token = os.environ[TOKEN_ENV]
    metadata = _metadata(token)
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    # Identity serializers: the same body per call (each request still appends an event).
    senders: list[Any] = [channel.unary_unary(SEND_CALL_EVENT) for channel in channels]
    bodies = [
        call_data_service_pb2.SendCallEventRequest(
            type=CALL_TYPE, id=call_id(index), user_id=USER, custom=_struct({"kind": "bench", "n": index})
        ).SerializeToString()
        for index in range(args.calls)
    ]
    stdin = await _stdin_reader()
    _say("ready")
    try:
        while True:
            line = await stdin.readline()
            if not line:
                break
            command = json.loads(line)
            if command["op"] != "run":
                _say(json.dumps({"closed": True}))
                break
            reply = await _run_load(command, senders, bodies, metadata)
            _say(json.dumps(reply, separators=(",", ":")))
    finally:
        for channel in channels:
            await channel.close()
    return 0


def _struct(values: dict[str, Any]) -> Any:
    from google.protobuf import struct_pb2

    custom = struct_pb2.Struct()
    custom.update(values)
    return custom


async def _run_load(
    command: dict[str, Any], senders: list[Any], bodies: list[bytes], metadata: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """One phase: `full` (`in_flight` workers, each sending the next request as soon as its last one was
    answered) or `paced` (`rate` per second, each request its own task at start + i / rate). Returns
    `[call index, seq, sent, acked]` (monotonic) per OK reply."""
    seconds = float(command["seconds"])
    records: list[list[float]] = []
    non_ok: dict[str, int] = {}
    first_error = ""
    numbers = itertools.count()

    async def send(number: int) -> bool:
        nonlocal first_error
        index = number % len(bodies)
        sent = time.monotonic()
        try:
            reply = await senders[number % len(senders)](bodies[index], metadata=metadata, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as error:
            non_ok[error.code().name] = non_ok.get(error.code().name, 0) + 1
            first_error = first_error or f"{error.code().name}: {error.details()}"
            return False
        acked = time.monotonic()
        seq = call_data_service_pb2.SendCallEventResponse.FromString(reply).seq
        records.append([index, seq, sent, acked])
        return True

    cpu_from = time.process_time()
    start = time.monotonic() + 0.1
    stop = start + seconds
    worst_lag = 0.0
    if command["mode"] == "full":

        async def worker() -> None:
            await asyncio.sleep(max(start - time.monotonic(), 0.0))
            while time.monotonic() < stop:
                if not await send(next(numbers)):
                    return  # the run fails anyway: do not hammer a server that refuses

        await asyncio.gather(*(worker() for _ in range(int(command["in_flight"]))))
    else:
        rate = float(command["rate"])
        tasks = []
        for number in range(int(rate * seconds)):
            due = start + number / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, time.monotonic() - due)
            tasks.append(asyncio.create_task(send(number)))
        await asyncio.gather(*tasks)
    return {
        "records": records,
        "non_ok": non_ok,
        "first_error": first_error,
        "worst_send_lag_ms": _ms(worst_lag),
        "cpu_seconds": time.process_time() - cpu_from,
    }


# -- the parent ---------------------------------------------------------------------------------------


class _Positions:
    """The `events` table of the bench's database: its last position, and what a range of it holds."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url

    async def last(self) -> int:
        rows = await self._query("SELECT coalesce(max(position), 0) FROM events", ())
        return int(rows[0][0])

    async def types_between(self, after: int, up_to: int) -> dict[str, int]:
        """Events by type with after < position <= up_to."""
        if self._url.startswith("sqlite"):
            sql = "SELECT type, count(*) FROM events WHERE position > ? AND position <= ? GROUP BY type"
        else:
            sql = "SELECT type, count(*) FROM events WHERE position > $1 AND position <= $2 GROUP BY type"
        return {str(kind): int(count) for kind, count in await self._query(sql, (after, up_to))}

    async def _query(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._url.startswith("sqlite"):
            import sqlite3

            path = self._url.split(":///", 1)[1]

            def run() -> list[tuple[Any, ...]]:
                with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:
                    return list(connection.execute(sql, parameters).fetchall())

            return await asyncio.to_thread(run)
        import asyncpg
        from sqlalchemy.engine import make_url

        dsn = make_url(self._url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql, *parameters)]
        finally:
            await connection.close()


async def _ask(child: _Child, command: dict[str, Any], within: float) -> dict[str, Any]:
    child.send(json.dumps(command, separators=(",", ":")))
    reply: dict[str, Any] = json.loads(await child.expect(None, within))
    return reply


async def _prepare(target: str, token: str, calls: int) -> None:
    """The user and the calls the events go to (their own events come before any endpoint exists)."""
    metadata = _metadata(token)
    async with grpc.aio.insecure_channel(target) as channel:
        await user_pb2_grpc.UserServiceStub(channel).UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=USER, name="Webhook bench")]),
            metadata=metadata,
        )
        stub = call_service_pb2_grpc.CallServiceStub(channel)
        for index in range(calls):
            await stub.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(
                    type=CALL_TYPE,
                    id=call_id(index),
                    data=call_service_pb2.CallData(
                        created_by_id=USER, members=[call_pb2.MemberRequest(user_id=USER, role="host")]
                    ),
                ),
                metadata=metadata,
            )


@dataclass
class _Rig:
    """One backend's server, children and database, and the checks every phase runs."""

    backend: str
    target: str
    token: str
    server_pid: int
    metrics_port: int
    positions: _Positions
    generator: _Child
    receiver: _Child
    settings: WebhookSettings
    webhook_id: str = ""
    secret: str = ""
    #: The last delivery phase's OK replies, and the positions before and after it.
    last_phase: tuple[list[list[float]], int, int] = ([], 0, 0)

    def _ok_counts(self) -> tuple[float, dict[str, float]]:
        from tests.bench.servers import handled_counts

        ok = 0.0
        other: dict[str, float] = {}
        for (method, code), value in handled_counts(self.metrics_port).items():
            if method != SEND_CALL_EVENT:
                continue
            if code == "OK":
                ok += value
            else:
                other[code] = other.get(code, 0.0) + value
        return ok, other

    async def load(
        self, mode: str, seconds: float, rate: float = 0.0
    ) -> tuple[dict[str, Any], int, int, dict[str, Any]]:
        """Runs the generator once; checks its replies (its count and the server's) and the events the
        phase appended. Returns the generator's reply, the positions before and after, and the checks."""
        before = await self.positions.last()
        ok_before, other_before = self._ok_counts()
        command = {
            "op": "run",
            "mode": mode,
            "seconds": seconds,
            "in_flight": self.settings.in_flight,
            "rate": rate,
        }
        result = await _ask(self.generator, command, seconds + COMMAND_SLACK)
        ok_after, other_after = self._ok_counts()
        after = await self.positions.last()
        acks = len(result["records"])
        non_ok = {
            code: count - other_before.get(code, 0.0)
            for code, count in other_after.items()
            if count - other_before.get(code, 0.0)
        }
        if result["non_ok"] or non_ok or ok_after - ok_before != acks:
            raise BenchError(
                f"webhooks {mode} on {self.backend}: not every SendCallEvent was OK (generator: {acks} OK, "
                f"non-OK {result['non_ok'] or 'none'} {result['first_error']}; server: "
                f"{ok_after - ok_before:.0f} OK, non-OK {non_ok or 'none'})"
            )
        appended = await self.positions.types_between(before, after)
        if appended != {"custom": acks}:
            raise BenchError(
                f"webhooks {mode} on {self.backend}: the phase appended {appended} events, but {acks} "
                "SendCallEvents were answered OK (one `custom` event each)"
            )
        checks = {"replies_ok": acks, "server_ok": int(ok_after - ok_before), "events_appended": acks}
        return result, before, after, checks

    async def drain(self, expected: int) -> bool:
        """Waits until the receiver holds `expected` distinct events since its last `take` (False: nothing
        new arrived for drain_seconds before that)."""
        last = -1
        progress = time.monotonic()
        while True:
            count = await _ask(self.receiver, {"op": "count"}, 60)
            if count["unique"] >= expected:
                return True
            if count["unique"] != last:
                last, progress = count["unique"], time.monotonic()
            elif time.monotonic() - progress > self.settings.drain_seconds:
                return False
            await asyncio.sleep(0.05)

    async def cursor(self, up_to: int, within: float = 10.0) -> webhook_service_pb2.Webhook:
        """The endpoint once its `delivered_position` reached `up_to` (BenchError if not within)."""
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            while True:
                reply = await stub.GetWebhook(
                    webhook_service_pb2.GetWebhookRequest(id=self.webhook_id), metadata=_metadata(self.token)
                )
                webhook = reply.webhook
                if webhook.delivered_position >= up_to:
                    return webhook
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"webhooks on {self.backend}: the endpoint's delivered_position is "
                        f"{webhook.delivered_position}, the phase's last event {up_to} ({within:g} s after "
                        "the receiver had every event)"
                    )
                await asyncio.sleep(0.1)

    async def _profile(self, name: str) -> asyncio.subprocess.Process | None:
        if not self.settings.profile_dir or name == "warm-up":
            return None
        output = Path(self.settings.profile_dir) / f"profile-webhooks-{self.backend}-{name}.speedscope.json"
        return await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(self.server_pid),
            "--rate",
            "200",
            "--format",
            "speedscope",
            "-o",
            str(output),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def _stop_profile(self, profiler: asyncio.subprocess.Process | None) -> None:
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes its output and exits
            await asyncio.wait_for(profiler.wait(), 60)

    async def delivery_phase(self, name: str, mode: str, seconds: float, rate: float = 0.0) -> dict[str, Any]:
        """A phase with the endpoint: load, drain, take the receipts, check, and the figures."""
        cpu_before = _cpu_seconds(self.server_pid)
        receiver_cpu = (await _ask(self.receiver, {"op": "count"}, 60))["cpu_seconds"]
        profiler = await self._profile(name)
        began = time.monotonic()
        try:
            result, before, after, checks = await self.load(mode, seconds, rate)
            writes_ended = time.monotonic()
            acks = len(result["records"])
            drained = await self.drain(acks)
            ended = time.monotonic()
        finally:
            await self._stop_profile(profiler)
        server_cpu = _cpu_seconds(self.server_pid) - cpu_before
        receiver_cpu = (await _ask(self.receiver, {"op": "count"}, 60))["cpu_seconds"] - receiver_cpu
        taken = await _ask(self.receiver, {"op": "take", "secret": self.secret}, 300)
        figures = _analyse(self.backend, name, result["records"], taken, before, after, drained)
        self.last_phase = (result["records"], before, after)
        webhook = await self.cursor(after)
        if webhook.state != webhook_service_pb2.WEBHOOK_STATE_ACTIVE or webhook.last_error:
            raise BenchError(
                f"webhooks {name} on {self.backend}: endpoint state "
                f"{webhook_service_pb2.WebhookState.Name(webhook.state)}, last error {webhook.last_error!r}"
            )
        checks["delivered_position"] = webhook.delivered_position
        wall = ended - began
        return {
            "mode": mode,
            "seconds": seconds,
            **({"rate": rate} if mode == "paced" else {"in_flight": self.settings.in_flight}),
            **figures,
            "checks": checks,
            "worst_send_lag_ms": result["worst_send_lag_ms"],
            "server_cpu_percent": round(100 * server_cpu / wall, 1),
            "generator_cpu_percent": round(100 * result["cpu_seconds"] / (writes_ended - began), 1),
            "receiver_cpu_percent": round(100 * receiver_cpu / wall, 1),
        }


async def _replay(rig: _Rig) -> dict[str, Any]:
    """The last phase's events sent again from the log (RedeliverWebhook after the position before it)
    with no writes going on: the delivery path alone. Checked like a phase; throughput = distinct events
    received ÷ (the RedeliverWebhook request → the last receipt)."""
    acked, before, after = rig.last_phase
    cpu_before = _cpu_seconds(rig.server_pid)
    profiler = await rig._profile("replay")
    began = time.monotonic()
    try:
        async with grpc.aio.insecure_channel(rig.target) as channel:
            await webhook_service_pb2_grpc.WebhookServiceStub(channel).RedeliverWebhook(
                webhook_service_pb2.RedeliverWebhookRequest(id=rig.webhook_id, after_position=before),
                metadata=_metadata(rig.token),
            )
        drained = await rig.drain(len(acked))
        ended = time.monotonic()
    finally:
        await rig._stop_profile(profiler)
    server_cpu = _cpu_seconds(rig.server_pid) - cpu_before
    taken = await _ask(rig.receiver, {"op": "take", "secret": rig.secret}, 300)
    first, repeats = _checked(
        f"webhooks replay on {rig.backend}", _ack_of(acked), taken, before, after, drained
    )
    await rig.cursor(after)
    last_receipt = max(record[1] for record in first.values())
    return {
        "events_received": len(first),
        "repeated_receipts": repeats,
        "signatures_verified": taken["verified"],
        "delivered_per_second": round(len(first) / max(last_receipt - began, 1e-9), 1),
        "seconds": round(last_receipt - began, 3),
        "server_cpu_percent": round(100 * server_cpu / (ended - began), 1),
    }


def _ack_of(acked: list[list[float]]) -> dict[tuple[str, int], tuple[float, float]]:
    """(call cid, seq) → (sent, acknowledged) of each OK SendCallEvent."""
    return {(f"{CALL_TYPE}:{call_id(int(index))}", int(seq)): (sent, ack) for index, seq, sent, ack in acked}


def _checked(
    where: str,
    ack_of: dict[tuple[str, int], tuple[float, float]],
    taken: dict[str, Any],
    before: int,
    after: int,
    drained: bool,
) -> tuple[dict[str, list[Any]], int]:
    """The first receipt of each event, in receive order, and the number of repeated receipts; BenchError
    unless every request was signed right, carried `evt_<position>` of an event acknowledged in the
    phase, every such event arrived, and each call's events arrived in order."""
    if taken["bad_signatures"]:
        raise BenchError(f"{where}: {taken['bad_signatures']} requests failed verification: {taken['bad']}")
    first: dict[str, list[Any]] = {}
    repeats = 0
    for record in taken["records"]:
        message_id, _, _, position, cid, seq, _, kind = record
        if message_id != f"evt_{position}":
            raise BenchError(f"{where}: webhook-id {message_id} on the event at position {position}")
        if not before < position <= after or kind != "custom" or (cid, seq) not in ack_of:
            raise BenchError(
                f"{where}: received {kind} {cid} seq {seq} at position {position}, not an event this phase "
                f"acknowledged (positions {before + 1}..{after})"
            )
        if message_id in first:
            repeats += 1
        else:
            first[message_id] = record
    missing = len(ack_of) - len(first)
    if missing or not drained:
        raise BenchError(
            f"{where}: {missing} of {len(ack_of)} acknowledged events never reached the receiver (it got "
            f"{len(first)} distinct ones; waited until nothing new came for a while)"
        )
    out_of_order = 0
    last_seq: dict[str, int] = {}
    for record in first.values():  # receive order (dicts keep insertion order)
        cid, seq = record[4], record[5]
        if seq <= last_seq.get(cid, 0):
            out_of_order += 1
        last_seq[cid] = seq
    if out_of_order:
        raise BenchError(f"{where}: {out_of_order} events received before an earlier event of their call")
    return first, repeats


def _analyse(
    backend: str,
    name: str,
    acked: list[list[float]],
    taken: dict[str, Any],
    before: int,
    after: int,
    drained: bool,
) -> dict[str, Any]:
    """The phase's checks (BenchError when one fails) and figures, from the generator's OK replies and
    the receiver's verified requests."""
    ack_of = _ack_of(acked)
    first, repeats = _checked(f"webhooks {name} on {backend}", ack_of, taken, before, after, drained)
    from_ack: list[float] = []
    from_created: list[float] = []
    from_sent: list[float] = []
    before_ack = 0
    for _, mono, wall, _, cid, seq, created, _ in first.values():
        sent, ack = ack_of[(cid, seq)]
        lag = mono - ack
        if lag < 0:
            before_ack += 1
            lag = 0.0
        from_ack.append(lag)
        from_created.append(wall - created)
        from_sent.append(mono - sent)
    for values in (from_ack, from_created, from_sent):
        values.sort()
    first_ack = min(ack for _, ack in ack_of.values())
    first_sent = min(sent for sent, _ in ack_of.values())
    last_ack = max(ack for _, ack in ack_of.values())
    receipts = sorted(record[1] for record in first.values())
    last_receipt = receipts[-1]
    backlog = len(receipts) - sum(1 for at in receipts if at <= last_ack)

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "p50": _ms(percentile(values, 0.50)),
            "p90": _ms(percentile(values, 0.90)),
            "p99": _ms(percentile(values, 0.99)),
            "max": _ms(values[-1]),
        }

    return {
        "events_acknowledged": len(ack_of),
        "events_received": len(first),
        "repeated_receipts": repeats,
        "signatures_verified": taken["verified"],
        "out_of_order": 0,  # checked
        "writes_per_second": round(len(ack_of) / max(last_ack - first_sent, 1e-9), 1),
        "delivered_per_second": round(len(first) / max(last_receipt - first_ack, 1e-9), 1),
        "backlog_at_writes_end": backlog,
        "drain_seconds": round(max(last_receipt - last_ack, 0.0), 3),
        # The backlog's own rate once the writes had ended (0: none left).
        "drained_per_second": round(backlog / (last_receipt - last_ack), 1) if backlog else 0.0,
        "ack_to_delivery_ms": spread(from_ack),
        "created_to_delivery_ms": spread(from_created),
        "sent_to_delivery_ms": spread(from_sent),
        "received_before_ack": before_ack,
    }


async def _create_endpoint(rig: _Rig, port: int) -> None:
    async with grpc.aio.insecure_channel(rig.target) as channel:
        reply = await webhook_service_pb2_grpc.WebhookServiceStub(channel).CreateWebhook(
            webhook_service_pb2.CreateWebhookRequest(
                url=f"http://127.0.0.1:{port}/hook", description="make bench"
            ),
            metadata=_metadata(rig.token),
        )
    rig.webhook_id, rig.secret = reply.webhook.id, reply.secret


async def measure_backend(
    backend: str,
    postgres_url: str,
    settings: WebhookSettings,
    server_cpu: str | None,
    load_cpu: str | None,
) -> dict[str, Any]:
    """The webhook scenario on one backend (see the module's docstring), on a fresh database."""
    from tests.bench.servers import callplane, free_port, pin, pinned, server_token, wait_serving
    from tests.support import new_database

    token = server_token()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"callplane-webhooks-{backend}-") as tmp:
        folder = Path(tmp)
        async with new_database(backend, folder, postgres_url, prefix="callplane_webhooks") as database_url:
            metrics_port = free_port()
            with callplane(
                database_url,
                folder,
                metrics_port,
                log_name="webhooks.log",
                extra=("--webhook-allow-private",),
            ) as server:
                await wait_serving(server)
                await _prepare(server.target, token, settings.calls)
                if server_cpu:
                    pin(server.pid, server_cpu)
                port = free_port()
                children: list[_Child] = []
                try:
                    receiver = await _Child.start(
                        "webhook receiver",
                        ["receive", "--port", str(port)],
                        token,
                        module="tests.bench.webhooks",
                        prefix=pinned(load_cpu),
                    )
                    children.append(receiver)
                    generator = await _Child.start(
                        "webhook load generator",
                        ["generate", "--target", server.target, "--calls", str(settings.calls)],
                        token,
                        module="tests.bench.webhooks",
                        prefix=pinned(load_cpu),
                    )
                    children.append(generator)
                    await asyncio.gather(receiver.expect("ready", 60), generator.expect("ready", 60))
                    rig = _Rig(
                        backend,
                        server.target,
                        token,
                        server.pid,
                        metrics_port,
                        _Positions(database_url),
                        generator,
                        receiver,
                        settings,
                    )
                    result = await _scenario(rig, port)
                    for child in children:
                        child.send(json.dumps({"op": "close"}))
                    await asyncio.gather(*(child.finish(30) for child in children))
                finally:
                    await asyncio.gather(*(child.kill() for child in children))
                    if server_cpu:
                        pin(server.pid, f"0-{(os.cpu_count() or 1) - 1}")
    # Runnable processes, averaged over the last minute: well above 2 (cores) means others competed.
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


async def _scenario(rig: _Rig, port: int) -> dict[str, Any]:
    settings = rig.settings
    backend = rig.backend
    # 1. Without an endpoint: the write rate the same generator reaches.
    cpu_before = _cpu_seconds(rig.server_pid)
    began = time.monotonic()
    result, _, _, checks = await rig.load("full", settings.seconds)
    records = result["records"]
    baseline = {
        "seconds": settings.seconds,
        "in_flight": settings.in_flight,
        "writes_per_second": round(
            len(records) / max(max(r[3] for r in records) - min(r[2] for r in records), 1e-9), 1
        ),
        "checks": checks,
        "server_cpu_percent": round(
            100 * (_cpu_seconds(rig.server_pid) - cpu_before) / (time.monotonic() - began), 1
        ),
        "generator_cpu_percent": round(100 * result["cpu_seconds"] / (time.monotonic() - began), 1),
    }
    _log(backend, f"no endpoint, full speed: {baseline['writes_per_second']:,.0f} SendCallEvent/s")
    # 2. The endpoint, and one event per call delivered (connections opened, the worker running).
    await _create_endpoint(rig, port)
    warm = await rig.delivery_phase("warm-up", "paced", 1.0, float(settings.calls))
    _log(backend, f"endpoint {rig.webhook_id}: warm-up of {warm['events_received']} events delivered")
    paced = []
    runs = [(f"paced-{rate:g}", "paced", settings.paced_seconds, rate) for rate in settings.rates]
    for name, mode, seconds, rate in [*runs, ("full", "full", settings.seconds, 0.0)]:
        phase = await rig.delivery_phase(name, mode, seconds, rate)
        if mode == "paced":
            paced.append(phase)
        else:
            full = phase
        _log(
            backend,
            f"{name}: {phase['writes_per_second']:,.0f} writes/s, {phase['delivered_per_second']:,.0f} "
            f"delivered/s, ack → delivery p50 {phase['ack_to_delivery_ms']['p50']:.1f} / p99 "
            f"{phase['ack_to_delivery_ms']['p99']:.1f} ms, createdAt → delivery p99 "
            f"{phase['created_to_delivery_ms']['p99']:.1f} ms; {phase['events_received']:,} events, "
            f"{phase['repeated_receipts']} repeated, {phase['signatures_verified']:,} signatures verified; "
            f"backlog at the writes' end {phase['backlog_at_writes_end']:,}, drained in "
            f"{phase['drain_seconds']:.1f} s; server CPU {phase['server_cpu_percent']:.0f} %",
        )
    replay = await _replay(rig)
    _log(
        backend,
        f"replay of the full-speed phase's {replay['events_received']:,} events (no writes): "
        f"{replay['delivered_per_second']:,.0f} delivered/s, server CPU {replay['server_cpu_percent']:.0f} %",
    )
    return {"no_endpoint": baseline, "paced": paced, "full": full, "replay": replay}


def settings_record(settings: WebhookSettings) -> dict[str, Any]:
    from callplane_server.webhooks.delivery import DeliverySettings

    defaults = DeliverySettings()
    return {**asdict(settings), "endpoint_concurrency": defaults.concurrency, "window": defaults.window}


# -- command line -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.webhooks", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    receive = commands.add_parser("receive", help="child: the webhook receiver")
    receive.add_argument("--port", type=int, required=True)
    generate = commands.add_parser("generate", help="child: SendCallEvent load")
    generate.add_argument("--target", required=True)
    generate.add_argument("--calls", type=int, required=True)
    demo = commands.add_parser("demo", help="the scenario on its own, short (prints the JSON)")
    demo.add_argument("--backends", default="sqlite,postgres")
    demo.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "CALLPLANE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    demo.add_argument("--seconds", type=float, default=3.0)
    demo.add_argument("--rates", default="50,200", help="paced phases: events/s, comma-separated")
    demo.add_argument("--no-pin", action="store_true")
    demo.add_argument("--profile", type=Path, help="py-spy the server's measured phases into this folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "receive":
        return runtime.run(_receive(args))
    if args.command == "generate":
        return runtime.run(_generate(args))
    settings = WebhookSettings(
        seconds=args.seconds,
        paced_seconds=args.seconds,
        rates=tuple(float(rate) for rate in args.rates.split(",")),
        profile_dir=str(args.profile) if args.profile else None,
    )
    cpus = (None, None) if args.no_pin or (os.cpu_count() or 1) < 2 else ("0", "1")
    for backend in args.backends.split(","):
        result = runtime.run(measure_backend(backend, args.postgres_url, settings, *cpus))
        print(json.dumps({backend: result}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
