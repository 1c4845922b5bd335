"""The server's metrics for what is not an RPC, scraped over HTTP from a real server on both backends:
each changes as a scenario says (a present participant and the stream holding it, a pending timer and
its firing, a lagging subscriber), and the rest are there with sane values."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from callplane.v1 import (
    call_service_pb2,
    call_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from tests.support import RunningServer, eventually, running_server, struct

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT = 15.0
DASHBOARD = Path(__file__).resolve().parents[1] / "server" / "dashboards" / "callplane.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def metered(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    # A tiny per-subscriber queue, so a reader that stops reading overflows it soon.
    async with running_server(
        backend, tmp_path_factory.mktemp(backend), metrics_listen="127.0.0.1:0", event_queue_size=4
    ) as running:
        await user_pb2_grpc.UserServiceStub(running.channel).UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id) for user_id in ("ann", "bo")])
        )
        yield running


async def scrape(server: RunningServer) -> Samples:
    """Every sample of /metrics, by name and labels."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def exported_names(server: RunningServer) -> set[str]:
    """Every name /metrics declares, also of families with no sample yet (a labelled gauge nobody set)."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_present_participant_and_the_stream_holding_it(metered: RunningServer) -> None:
    sessions = session_service_pb2_grpc.SessionServiceStub(metered.channel)
    events = event_service_pb2_grpc.EventServiceStub(metered.channel)
    before = await scrape(metered)
    await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(
            type="default", id="present", user_id="ann", participant_session_id="ann-1", create=True
        )
    )
    joined = await scrape(metered)
    assert (
        value(joined, "callplane_participants_present") == value(before, "callplane_participants_present") + 1
    )
    stream = events.WatchCall(
        event_service_pb2.WatchCallRequest(type="default", id="present", participant_session_id="ann-1")
    )
    try:
        await stream.read()  # the stream is up: it holds the presence now

        async def held() -> bool:
            samples = await scrape(metered)
            return (
                value(samples, "callplane_presence_streams_held") == 1
                and value(
                    samples,
                    "callplane_streams_open",
                    grpc_service="callplane.v1.EventService",
                    grpc_method="WatchCall",
                )
                == 1
            )

        await eventually(held, WAIT)
    finally:
        stream.cancel()
    await sessions.LeaveCall(
        session_service_pb2.LeaveCallRequest(type="default", id="present", participant_session_id="ann-1")
    )

    async def released() -> bool:
        samples = await scrape(metered)
        return (
            value(samples, "callplane_presence_streams_held") == 0
            and value(
                samples,
                "callplane_streams_open",
                grpc_service="callplane.v1.EventService",
                grpc_method="WatchCall",
            )
            == 0
            and value(samples, "callplane_participants_present")
            == value(before, "callplane_participants_present")
        )

    await eventually(released, WAIT)


async def test_a_pending_timer_then_fired(metered: RunningServer) -> None:
    sessions = session_service_pb2_grpc.SessionServiceStub(metered.channel)
    await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(
            type="default", id="timer", user_id="bo", participant_session_id="bo-1", create=True
        )
    )
    # The last one leaves: the session ends after its inactivity timeout (a timer), unless someone joins.
    await sessions.LeaveCall(
        session_service_pb2.LeaveCallRequest(type="default", id="timer", participant_session_id="bo-1")
    )
    before = await scrape(metered)
    assert value(before, "callplane_timers_due") == 0
    metered.clock.advance(timedelta(minutes=20))
    due = await scrape(metered)
    assert value(due, "callplane_timers_due") >= 1
    assert value(due, "callplane_timers_oldest_due_seconds") >= 60
    assert metered.server.timers is not None
    while await metered.server.timers.run_due():
        pass
    fired = await scrape(metered)
    assert value(fired, "callplane_timers_due") == 0
    assert value(fired, "callplane_timers_oldest_due_seconds") == 0
    assert value(fired, "callplane_timer_lateness_seconds_count") > value(
        before, "callplane_timer_lateness_seconds_count"
    )
    # Fired 20 minutes late by the injected clock: counted above every bucket but +Inf.
    assert value(fired, "callplane_timer_lateness_seconds_bucket", le="300.0") == value(
        before, "callplane_timer_lateness_seconds_bucket", le="300.0"
    )
    kinds = {labels for (name, labels) in fired if name == "callplane_timers_fired_total"}
    assert sum(value(fired, "callplane_timers_fired_total", **dict(k)) for k in kinds) >= 1


async def test_a_subscriber_that_stops_reading_lags_then_catches_up(metered: RunningServer) -> None:
    calls = call_service_pb2_grpc.CallServiceStub(metered.channel)
    events = event_service_pb2_grpc.EventServiceStub(metered.channel)
    await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id="lag"))
    stream = events.WatchCall(event_service_pb2.WatchCallRequest(type="default", id="lag"))
    try:
        await stream.read()  # the start: from now
        assert value(await scrape(metered), "callplane_event_subscribers_lagging") == 0
        padding = "x" * 4000
        # Enough to fill the transport's buffers and the 4-deep queue while nobody reads.
        written = 0

        async def lagging() -> bool:
            nonlocal written
            for _ in range(20):
                written += 1
                await calls.UpdateCall(
                    call_service_pb2.UpdateCallRequest(
                        type="default", id="lag", set_custom=struct({"n": written, "pad": padding})
                    )
                )
            return value(await scrape(metered), "callplane_event_subscribers_lagging") >= 1

        await eventually(lagging, 60)
        subscribers = await scrape(metered)
        assert value(subscribers, "callplane_event_subscribers", follows="call") >= 1
        # Reading everything: caught up, not lagging any more, and nothing was missed.
        seqs: list[int] = []
        async with asyncio.timeout(WAIT):
            while len(seqs) < written:
                message = await stream.read()
                if message.WhichOneof("message") == "event":
                    seqs.append(message.event.seq)
        assert seqs == list(range(2, written + 2))

        async def caught_up() -> bool:
            return value(await scrape(metered), "callplane_event_subscribers_lagging") == 0

        await eventually(caught_up, WAIT)
    finally:
        stream.cancel()


async def test_the_rest_are_there(metered: RunningServer) -> None:
    calls = call_service_pb2_grpc.CallServiceStub(metered.channel)
    await asyncio.gather(
        *(
            calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=f"r{i}"))
            for i in range(8)
        )
    )
    samples = await scrape(metered)
    assert value(samples, "callplane_event_position") >= 8
    assert value(samples, "callplane_event_tailer_lag_events") >= 0
    assert value(samples, "callplane_event_dispatched_position") <= value(samples, "callplane_event_position")
    pools = {dict(labels)["role"] for (name, labels) in samples if name == "callplane_db_pool_connections"}
    assert "write" in pools
    if metered.backend == "sqlite":
        assert value(samples, "callplane_group_commit_writes_count") >= 1
        assert value(samples, "callplane_group_commit_writes_sum") >= value(
            samples, "callplane_group_commit_writes_count"
        )


async def test_webhook_metrics(backend: str, tmp_path: Path) -> None:
    from callplane.v1 import webhook_service_pb2, webhook_service_pb2_grpc
    from tests.webhook_receiver import Receiver

    async with (
        running_server(
            backend, tmp_path, metrics_listen="127.0.0.1:0", run_webhooks=True, webhook_allow_private=True
        ) as server,
        Receiver() as receiver,
    ):
        hooks = webhook_service_pb2_grpc.WebhookServiceStub(server.channel)
        created = await hooks.CreateWebhook(webhook_service_pb2.CreateWebhookRequest(url=receiver.url))
        calls = call_service_pb2_grpc.CallServiceStub(server.channel)
        await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id="hooked"))
        await receiver.next()

        async def counted() -> bool:
            samples = await scrape(server)
            return (
                value(samples, "callplane_webhook_attempts_total", result="succeeded") >= 1
                and value(samples, "callplane_webhook_backlog_events", webhook_id=created.webhook.id) == 0
                and (("callplane_webhook_in_flight", (("webhook_id", created.webhook.id),)) in samples)
            )

        await eventually(counted, WAIT)
        # The dashboard shipped in the repository asks only for what a server exports.
        exported = await exported_names(server)
        dashboard = json.loads(DASHBOARD.read_text())
        wanted = {
            name
            for panel in dashboard["panels"]
            for target in panel["targets"]
            for name in re.findall(r"\b(?:callplane|grpc_server)_[a-z_]+", target["expr"])
        }
        if backend != "sqlite":  # PostgreSQL writes are not grouped: that panel stays empty there
            wanted = {name for name in wanted if not name.startswith("callplane_group_commit_")}
        assert wanted and wanted <= exported, sorted(wanted - exported)
