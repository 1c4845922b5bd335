"""Webhooks against a real local HTTP receiver (aiohttp's test server): Standard Webhooks signatures,
filters, per-call order under concurrent writers, outages, retries with backoff on the injected clock,
FAILING and resume, secret rotation, redirects, the delivery log and redelivery, SSRF refusal and who
may manage endpoints. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from google.protobuf import duration_pb2, json_format
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from standardwebhooks import Webhook, WebhookVerificationError

from callplane.v1 import (
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    event_pb2,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from callplane_server.store.database import normalize_url
from tests.errors import expect_error
from tests.support import RunningServer, channel, eventually, running_server, struct, user_token
from tests.webhook_receiver import Delivery, Receiver

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT = 15.0
SHORT_TIMEOUT = 0.5
W = webhook_service_pb2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hooks_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    async with running_server(
        backend,
        tmp_path_factory.mktemp(backend),
        run_webhooks=True,
        webhook_allow_private=True,
        # An attempt that times out is retried after a backoff on the injected clock, which a test that
        # expects every event delivered never moves on: the limit stays well above a loaded machine's
        # stalls. The tests about timeouts shorten it for themselves (`short_attempts`).
        webhook_timeout_seconds=10.0,
        webhook_concurrency=8,
    ) as running:
        yield running


@dataclass
class Scene:
    """One test's own call type (its webhooks filter on it) and clients."""

    server: RunningServer
    receiver: Receiver
    call_type: str
    hooks: webhook_service_pb2_grpc.WebhookServiceStub
    calls: call_service_pb2_grpc.CallServiceStub
    receivers: contextlib.AsyncExitStack

    async def another(self) -> Receiver:
        """A second receiver for this test (another endpoint)."""
        return await self.receivers.enter_async_context(Receiver())

    async def create(self, **fields: Any) -> webhook_service_pb2.CreateWebhookResponse:
        fields.setdefault("url", self.receiver.url)
        fields.setdefault("call_types", [self.call_type])
        return await self.hooks.CreateWebhook(W.CreateWebhookRequest(**fields))

    async def call_event(self, call_id: str, value: int = 0) -> None:
        """call.created the first time, call.updated after."""
        await self.calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(type=self.call_type, id=call_id)
        )
        if value:
            await self.calls.UpdateCall(
                call_service_pb2.UpdateCallRequest(
                    type=self.call_type, id=call_id, set_custom=struct({"n": value})
                )
            )

    async def received(self, count: int, receiver: Receiver | None = None) -> list[Delivery]:
        got = (receiver or self.receiver).received

        async def enough() -> bool:
            return len(got) >= count

        await eventually(enough, WAIT)
        return got

    def wake(self, advance: timedelta = timedelta(0)) -> None:
        """Moves the injected clock on and has every delivery worker look again (no sleeping)."""
        self.server.clock.advance(advance)
        assert self.server.server.webhooks is not None
        self.server.server.webhooks.wake()

    async def settled(self, webhook_id: str) -> None:
        """Every request the receiver got for this test is in the delivery log (its answer handled and
        its retry scheduled), so moving the clock now cannot race the scheduling."""

        async def recorded() -> bool:
            attempts = sum(d.attempts for d in await self.deliveries(webhook_id))
            return attempts >= len(self.receiver.received)

        await eventually(recorded, WAIT)

    async def webhook(self, webhook_id: str) -> webhook_service_pb2.Webhook:
        return (await self.hooks.GetWebhook(W.GetWebhookRequest(id=webhook_id))).webhook

    async def deliveries(self, webhook_id: str, **filters: Any) -> list[webhook_service_pb2.WebhookDelivery]:
        reply = await self.hooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(webhook_id=webhook_id, limit=100, **filters)
        )
        return list(reply.deliveries)


@pytest_asyncio.fixture(loop_scope="module")
async def scene(hooks_server: RunningServer) -> AsyncIterator[Scene]:
    call_type = f"wh{uuid.uuid4().hex[:12]}"
    await call_type_service_pb2_grpc.CallTypeServiceStub(hooks_server.channel).CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=call_type)
    )
    async with contextlib.AsyncExitStack() as receivers:
        yield Scene(
            hooks_server,
            await receivers.enter_async_context(Receiver()),
            call_type,
            webhook_service_pb2_grpc.WebhookServiceStub(hooks_server.channel),
            call_service_pb2_grpc.CallServiceStub(hooks_server.channel),
            receivers,
        )


@pytest.fixture
def short_attempts(hooks_server: RunningServer) -> Iterator[None]:
    """Attempts give up after 0.5 s during this test."""
    dispatcher = hooks_server.server.webhooks
    assert dispatcher is not None
    settings = dispatcher.settings
    dispatcher.settings = replace(settings, timeout=SHORT_TIMEOUT)
    yield
    dispatcher.settings = settings


def per_call_seqs(received: list[Delivery]) -> dict[str, list[int]]:
    """First receipt of each webhook-id, in arrival order, as seqs per call."""
    seen: set[str] = set()
    seqs: dict[str, list[int]] = {}
    for item in received:
        if item.id in seen:
            continue
        seen.add(item.id)
        seqs.setdefault(item.event()["callCid"], []).append(int(item.event()["seq"]))
    return seqs


def assert_duplicates_identical(received: list[Delivery]) -> None:
    """A repeated event comes with the same webhook-id and body; one event never has two ids."""
    first: dict[str, str] = {}
    ids: dict[tuple[str, str], str] = {}
    for item in received:
        assert first.setdefault(item.id, item.body) == item.body, item.id
        event = (item.event()["callCid"], item.event()["seq"])
        assert ids.setdefault(event, item.id) == item.id, event


# -- wire format --------------------------------------------------------------------------------------


async def test_signed_standard_webhook_with_the_events_proto3_json(scene: Scene) -> None:
    created = await scene.create(description="wire format")
    assert created.secret.startswith("whsec_")
    await scene.call_event("wire", 1)
    got = await scene.received(2)
    for item in got:
        verified = Webhook(created.secret).verify(item.body, item.headers)
        assert verified == item.event()
        assert item.headers["content-type"] == "application/json"
        event = json_format.Parse(item.body, event_pb2.Event())
        assert item.id == f"evt_{event.position}"
        assert event.call_cid == f"{scene.call_type}:wire"
    assert [item.event()["type"] for item in got] == ["call.created", "call.updated"]
    assert got[1].event()["callUpdated"]["call"]["custom"] == {"n": 1.0}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(got[0].body, got[0].headers)

    # The delivery log says the same (recorded right after the answers).
    async def logged() -> bool:
        found = await scene.deliveries(created.webhook.id)
        return [d.status for d in found] == [W.WEBHOOK_DELIVERY_STATUS_SUCCEEDED] * 2

    await eventually(logged, WAIT)
    deliveries = await scene.deliveries(created.webhook.id)
    assert [d.status for d in deliveries] == [W.WEBHOOK_DELIVERY_STATUS_SUCCEEDED] * 2
    assert deliveries[0].last_status_code == 200 and deliveries[0].attempts == 1
    assert deliveries[0].message_id == got[1].id


async def test_filters_by_event_type_prefix_and_call_type(scene: Scene, hooks_server: RunningServer) -> None:
    other_type = f"wo{uuid.uuid4().hex[:12]}"
    await call_type_service_pb2_grpc.CallTypeServiceStub(hooks_server.channel).CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=other_type)
    )
    prefixed = await scene.create(event_types=["call.upd*"])
    creations = await scene.another()
    exact = await scene.create(url=creations.url, event_types=["call.created"])
    await scene.call_event("f1", 1)
    await scene.calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type=other_type, id="f1"))
    await scene.call_event("f2", 2)
    created = await scene.received(2, creations)
    updated = await scene.received(2)
    assert {item.event()["type"] for item in updated} == {"call.updated"}
    assert {item.event()["type"] for item in created} == {"call.created"}
    assert {item.event()["callCid"].split(":")[0] for item in [*created, *updated]} == {scene.call_type}
    # Everything after the filtered-out events was scanned: both cursors reach the last position.
    last = max(int(item.event()["position"]) for item in [*created, *updated])

    async def caught_up() -> bool:
        positions = [(await scene.webhook(w.webhook.id)).delivered_position for w in (prefixed, exact)]
        return min(positions) >= last

    await eventually(caught_up, WAIT)


# -- ordering and outages ------------------------------------------------------------------------------


async def test_events_of_a_call_arrive_in_order_under_concurrent_writers(scene: Scene) -> None:
    async def slow(_delivery: Delivery) -> web.StreamResponse:
        await asyncio.sleep(0.002)
        return web.Response(status=200)

    scene.receiver.answer = slow
    await scene.create()
    calls, updates = 6, 12

    async def writer(index: int) -> None:
        for value in range(updates + 1):
            await scene.call_event(f"o{index}", value)

    await asyncio.gather(*(writer(index) for index in range(calls)))
    got = await scene.received(calls * (updates + 1))
    seqs = per_call_seqs(got)
    assert len(seqs) == calls
    for cid, order in seqs.items():
        assert order == list(range(1, updates + 2)), (cid, order)


async def test_receiver_down_then_back_delivers_everything_in_order(scene: Scene) -> None:
    down = True

    async def outage(_delivery: Delivery) -> web.StreamResponse:
        return web.Response(status=503 if down else 204, text="maintenance" if down else "")

    scene.receiver.answer = outage
    created = await scene.create()
    for value in range(4):
        await scene.call_event("down-a", value)
        await scene.call_event("down-b", value)
    await scene.received(2)  # the heads of both calls were tried (and refused)
    hook = await scene.webhook(created.webhook.id)

    async def noted() -> bool:
        return "HTTP 503: maintenance" in (await scene.webhook(created.webhook.id)).last_error

    await eventually(noted, WAIT)
    assert hook.delivered_position < int(scene.receiver.received[0].event()["position"])
    # A few more rounds of refusals while down, each after its backoff.
    for _ in range(3):
        await scene.settled(created.webhook.id)
        before = len(scene.receiver.received)
        scene.wake(timedelta(hours=1))
        await scene.received(before + 2)
    await scene.settled(created.webhook.id)
    down = False
    scene.wake(timedelta(hours=1))
    got = await scene.received(8 + 2 * 4)

    async def all_delivered() -> bool:
        return len({item.id for item in scene.receiver.received if not down}) >= 8

    await eventually(all_delivered, WAIT)
    got = scene.receiver.received
    assert_duplicates_identical(got)
    seqs = per_call_seqs(got)
    assert seqs == {f"{scene.call_type}:down-a": [1, 2, 3, 4], f"{scene.call_type}:down-b": [1, 2, 3, 4]}
    # Only the heads were ever repeated: the later events of each call waited for them.
    repeated = {item.id for item in got if sum(g.id == item.id for g in got) > 1}
    assert repeated == {got[0].id, got[1].id}


async def test_retries_back_off_on_the_injected_clock(scene: Scene) -> None:
    answers = iter([500, 502, 429])

    async def flaky(_delivery: Delivery) -> web.StreamResponse:
        return web.Response(status=next(answers, 204))

    scene.receiver.answer = flaky
    created = await scene.create()
    await scene.call_event("retry")
    gaps: list[timedelta] = []
    for attempt in range(1, 4):

        async def recorded(attempts: int = attempt) -> bool:
            found = await scene.deliveries(created.webhook.id)
            return bool(found) and found[0].attempts == attempts and found[0].HasField("next_attempt_at")

        await eventually(recorded, WAIT)
        delivery = (await scene.deliveries(created.webhook.id))[0]
        assert delivery.status == W.WEBHOOK_DELIVERY_STATUS_PENDING
        assert delivery.last_error.startswith("HTTP ")
        gap = delivery.next_attempt_at.ToDatetime() - delivery.last_attempt_at.ToDatetime()
        gaps.append(gap)
        # Not retried before it is due.
        scene.wake()
        await asyncio.sleep(0)
        assert len(scene.receiver.received) == attempt
        scene.wake(gap + timedelta(seconds=1))
        await scene.received(attempt + 1)
    # Exponential with jitter: each wait is within [base·2^(n-1)/2, base·2^(n-1)].
    for index, gap in enumerate(gaps):
        ceiling = timedelta(seconds=2**index)
        assert ceiling / 2 <= gap <= ceiling, gaps

    async def succeeded() -> bool:
        return (await scene.deliveries(created.webhook.id))[0].status == W.WEBHOOK_DELIVERY_STATUS_SUCCEEDED

    await eventually(succeeded, WAIT)
    assert len({item.id for item in scene.receiver.received}) == 1


@pytest.mark.usefixtures("short_attempts")
async def test_a_timeout_is_retried(scene: Scene) -> None:
    hang = True

    async def slow(_delivery: Delivery) -> web.StreamResponse:
        if hang:
            await asyncio.sleep(3)  # longer than the server's 0.5 s attempt timeout
        return web.Response(status=204)

    scene.receiver.answer = slow
    created = await scene.create()
    await scene.call_event("timeout")

    async def timed_out() -> bool:
        found = await scene.deliveries(created.webhook.id)
        return bool(found) and found[0].last_error == "timed out after 0.5 s"

    await eventually(timed_out, WAIT)
    delivery = (await scene.deliveries(created.webhook.id))[0]
    assert delivery.last_status_code == 0 and delivery.status == W.WEBHOOK_DELIVERY_STATUS_PENDING
    hang = False
    scene.wake(timedelta(minutes=5))

    async def succeeded() -> bool:
        return (await scene.deliveries(created.webhook.id))[0].status == W.WEBHOOK_DELIVERY_STATUS_SUCCEEDED

    await eventually(succeeded, WAIT)


async def test_redirects_are_not_followed(scene: Scene) -> None:
    target = await scene.another()

    async def moved(_delivery: Delivery) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": target.url})

    scene.receiver.answer = moved
    created = await scene.create()
    await scene.call_event("redirect")

    async def refused() -> bool:
        found = await scene.deliveries(created.webhook.id)
        return bool(found) and found[0].last_status_code == 307

    await eventually(refused, WAIT)
    assert target.received == []
    assert (await scene.deliveries(created.webhook.id))[0].status == W.WEBHOOK_DELIVERY_STATUS_PENDING


async def test_failing_after_the_retry_period_then_resume(scene: Scene) -> None:
    broken = True

    async def answer(_delivery: Delivery) -> web.StreamResponse:
        return web.Response(status=500 if broken else 204)

    scene.receiver.answer = answer
    created = await scene.create()
    await scene.call_event("failing", 1)
    await scene.received(1)

    # Past the 24 h retry period (each round waits out the backoff of the one before).
    async def failing() -> bool:
        return (await scene.webhook(created.webhook.id)).state == W.WEBHOOK_STATE_FAILING

    for _ in range(30):
        await scene.settled(created.webhook.id)
        before = len(scene.receiver.received)
        scene.wake(timedelta(hours=2))

        async def retried_or_failing(before: int = before) -> bool:
            return len(scene.receiver.received) > before or await failing()

        await eventually(retried_or_failing, WAIT)
        if await failing():
            break
    else:
        raise AssertionError("never FAILING")
    hook = await scene.webhook(created.webhook.id)
    assert hook.HasField("failing_since") and "HTTP 500" in hook.last_error
    failed = await scene.deliveries(created.webhook.id, status=W.WEBHOOK_DELIVERY_STATUS_FAILED)
    assert [d.seq for d in failed] == [1]
    # Nothing more is sent while FAILING, however long.
    sent = len(scene.receiver.received)
    scene.wake(timedelta(hours=5))
    await asyncio.sleep(0.2)
    assert len(scene.receiver.received) == sent
    await expect_error(
        scene.hooks.ResumeWebhook(W.ResumeWebhookRequest(id=scene.call_type)),
        grpc.StatusCode.NOT_FOUND,
        "WEBHOOK_NOT_FOUND",
    )
    broken = False
    resumed = await scene.hooks.ResumeWebhook(W.ResumeWebhookRequest(id=created.webhook.id))
    assert resumed.webhook.state == W.WEBHOOK_STATE_ACTIVE
    got = await scene.received(sent + 2)
    assert per_call_seqs(got) == {f"{scene.call_type}:failing": [1, 2]}
    await expect_error(
        scene.hooks.ResumeWebhook(W.ResumeWebhookRequest(id=created.webhook.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WEBHOOK_NOT_FAILING",
    )


async def test_rotated_secret_signs_alongside_the_new_one_for_the_overlap(scene: Scene) -> None:
    created = await scene.create()
    old = created.secret
    rotated = await scene.hooks.RotateWebhookSecret(
        W.RotateWebhookSecretRequest(id=created.webhook.id, overlap=duration_pb2.Duration(seconds=3600))
    )
    new = rotated.secret
    assert new != old and rotated.webhook.HasField("previous_secret_expires_at")
    await scene.call_event("rotate")
    first = (await scene.received(1))[0]
    assert len(first.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(first.body, first.headers)
    Webhook(new).verify(first.body, first.headers)
    # After the overlap only the new secret signs.
    scene.wake(timedelta(hours=2))

    async def one_signature() -> bool:
        await scene.call_event("rotate", len(scene.receiver.received))
        last = scene.receiver.received[-1]
        return len(last.headers["webhook-signature"].split(" ")) == 1

    await eventually(one_signature, WAIT)
    last = scene.receiver.received[-1]
    Webhook(new).verify(last.body, last.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(last.body, last.headers)
    await expect_error(
        scene.hooks.RotateWebhookSecret(
            W.RotateWebhookSecretRequest(id=created.webhook.id, overlap=duration_pb2.Duration(seconds=-1))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["overlap"],
    )


# -- the delivery log and redelivery -----------------------------------------------------------------


async def test_delivery_log_filters_and_pages(scene: Scene) -> None:
    created = await scene.create()
    for value in range(3):
        await scene.call_event("log-a", value)
        await scene.call_event("log-b", value)
    await scene.received(6)

    async def logged() -> bool:
        return len(await scene.deliveries(created.webhook.id)) == 6

    await eventually(logged, WAIT)
    pages: list[int] = []
    token = ""
    while True:
        reply = await scene.hooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(webhook_id=created.webhook.id, limit=4, next=token)
        )
        pages.extend(d.position for d in reply.deliveries)
        token = reply.next
        if not token:
            break
    assert pages == sorted(pages, reverse=True) and len(pages) == 6
    only_a = await scene.deliveries(created.webhook.id, call_cid=f"{scene.call_type}:log-a")
    assert [d.seq for d in only_a] == [3, 2, 1]
    updates = await scene.deliveries(created.webhook.id, event_type="call.updated")
    assert {d.event_type for d in updates} == {"call.updated"} and len(updates) == 4
    await expect_error(
        scene.hooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(webhook_id=created.webhook.id, limit=101)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["limit"],
    )
    await expect_error(
        scene.hooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(webhook_id=created.webhook.id, next="@@")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["next"],
    )


async def test_redeliver_after_a_position_and_given_positions(scene: Scene) -> None:
    created = await scene.create()
    for value in range(3):
        await scene.call_event("again", value)
    got = await scene.received(3)
    positions = [int(item.event()["position"]) for item in got]

    async def caught_up() -> bool:
        return (await scene.webhook(created.webhook.id)).delivered_position >= positions[-1]

    await eventually(caught_up, WAIT)
    reply = await scene.hooks.RedeliverWebhook(
        W.RedeliverWebhookRequest(id=created.webhook.id, after_position=positions[0])
    )
    assert reply.webhook.delivered_position == positions[0]
    again = await scene.received(5)
    assert [item.id for item in again[3:]] == [got[1].id, got[2].id]
    assert_duplicates_identical(again)
    queued = await scene.hooks.RedeliverWebhook(
        W.RedeliverWebhookRequest(
            id=created.webhook.id, positions=W.WebhookPositions(positions=[positions[0]])
        )
    )
    assert queued.queued == 1
    again = await scene.received(6)
    assert again[5].id == got[0].id and again[5].body == got[0].body
    await expect_error(
        scene.hooks.RedeliverWebhook(
            W.RedeliverWebhookRequest(id=created.webhook.id, positions=W.WebhookPositions(positions=[1]))
        ),
        grpc.StatusCode.NOT_FOUND,
        "WEBHOOK_DELIVERY_NOT_FOUND",
    )
    await expect_error(
        scene.hooks.RedeliverWebhook(
            W.RedeliverWebhookRequest(id=created.webhook.id, after_position=positions[-1] + 10**6)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "POSITION_IN_FUTURE",
    )


# -- managing endpoints ----------------------------------------------------------------------------


async def test_update_disable_and_delete(scene: Scene) -> None:
    created = await scene.create(description="first")
    updated = await scene.hooks.UpdateWebhook(
        W.UpdateWebhookRequest(
            id=created.webhook.id,
            description="second",
            event_types=W.WebhookFilterValues(values=["custom"]),
            enabled=False,
        )
    )
    hook = updated.webhook
    assert (hook.description, list(hook.event_types), hook.enabled) == ("second", ["custom"], False)
    assert hook.state == W.WEBHOOK_STATE_DISABLED and list(hook.call_types) == [scene.call_type]
    await scene.call_event("disabled")
    listed = (await scene.hooks.ListWebhooks(W.ListWebhooksRequest())).webhooks
    assert created.webhook.id in [w.id for w in listed]
    await scene.hooks.DeleteWebhook(W.DeleteWebhookRequest(id=created.webhook.id))
    await expect_error(
        scene.hooks.GetWebhook(W.GetWebhookRequest(id=created.webhook.id)),
        grpc.StatusCode.NOT_FOUND,
        "WEBHOOK_NOT_FOUND",
    )
    assert scene.receiver.received == []
    await expect_error(
        scene.hooks.UpdateWebhook(
            W.UpdateWebhookRequest(
                id=created.webhook.id, event_types=W.WebhookFilterValues(values=["Bad Type"])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["event_types.values[0]"],
    )


async def test_bad_endpoints_are_refused_with_field_violations(scene: Scene) -> None:
    for url, problem in (
        ("ftp://example.com/x", "http or https"),
        ("not a url", "http or https"),
        ("https://user:pw@example.com/", "credentials"),
        ("https:///path", "host"),
        ("https://example.com/" + "x" * 2100, "2048"),
    ):
        details = await expect_error(
            scene.hooks.CreateWebhook(W.CreateWebhookRequest(url=url)),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["url"],
        )
        assert problem in details.message, details.message
    await expect_error(
        scene.hooks.CreateWebhook(
            W.CreateWebhookRequest(url=scene.receiver.url, event_types=["call.*", "*x"], call_types=["A"])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["event_types[1]", "call_types[0]"],
    )


async def test_secrets_are_shown_once_and_sealed_at_rest(scene: Scene, hooks_server: RunningServer) -> None:
    created = await scene.create()
    raw = created.SerializeToString()
    assert created.secret.encode() in raw
    for reply in (
        await scene.hooks.GetWebhook(W.GetWebhookRequest(id=created.webhook.id)),
        await scene.hooks.ListWebhooks(W.ListWebhooksRequest()),
        await scene.hooks.UpdateWebhook(W.UpdateWebhookRequest(id=created.webhook.id, description="x")),
    ):
        assert b"whsec_" not in reply.SerializeToString()
    # A dump of the database does not hold it in any form a reader could use.
    engine = create_async_engine(normalize_url(hooks_server.server.config.resolved_database_url))
    try:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    text("SELECT secret FROM webhooks WHERE id = :id"), {"id": created.webhook.id}
                )
            ).one()
    finally:
        await engine.dispose()
    sealed = bytes(row.secret)
    secret_bytes = created.secret.removeprefix("whsec_")
    assert secret_bytes.encode() not in sealed and created.secret.encode() not in sealed
    import base64

    assert base64.b64decode(secret_bytes) not in sealed


async def test_only_server_tokens_and_admins_manage_webhooks(
    scene: Scene, hooks_server: RunningServer
) -> None:
    created = await scene.create()
    user = channel(hooks_server.target, user_token("plain-user"))
    try:
        stub = webhook_service_pb2_grpc.WebhookServiceStub(user)
        for call in (
            stub.CreateWebhook(W.CreateWebhookRequest(url=scene.receiver.url)),
            stub.GetWebhook(W.GetWebhookRequest(id=created.webhook.id)),
            stub.ListWebhooks(W.ListWebhooksRequest()),
            stub.UpdateWebhook(W.UpdateWebhookRequest(id=created.webhook.id, description="mine")),
            stub.DeleteWebhook(W.DeleteWebhookRequest(id=created.webhook.id)),
            stub.RotateWebhookSecret(W.RotateWebhookSecretRequest(id=created.webhook.id)),
            stub.ResumeWebhook(W.ResumeWebhookRequest(id=created.webhook.id)),
            stub.ListWebhookDeliveries(W.ListWebhookDeliveriesRequest(webhook_id=created.webhook.id)),
            stub.RedeliverWebhook(W.RedeliverWebhookRequest(id=created.webhook.id, after_position=0)),
        ):
            await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    finally:
        await user.close()
    hook = await scene.webhook(created.webhook.id)
    assert hook.description == "" and hook.delivered_position == created.webhook.delivered_position


# -- SSRF ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://api.localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
    ],
)
async def test_private_targets_are_refused_without_the_flag(url: str, backend: str, tmp_path: Path) -> None:
    async with running_server(backend, tmp_path, run_webhooks=True) as strict:
        stub = webhook_service_pb2_grpc.WebhookServiceStub(strict.channel)
        details = await expect_error(
            stub.CreateWebhook(W.CreateWebhookRequest(url=url)),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["url"],
        )
        assert "--webhook-allow-private" in details.message
        assert (await stub.ListWebhooks(W.ListWebhooksRequest())).webhooks == []


async def test_a_stored_private_target_is_refused_at_connection_time(backend: str, tmp_path: Path) -> None:
    """A target that turns private after its check (here: changed behind the API's back, as DNS
    rebinding would) is refused when connecting, by name and by address."""
    async with running_server(backend, tmp_path, run_webhooks=True) as strict, Receiver() as target:
        stub = webhook_service_pb2_grpc.WebhookServiceStub(strict.channel)
        created = await stub.CreateWebhook(W.CreateWebhookRequest(url="https://93.184.216.34/hooks"))
        port = target.url.split(":")[2].split("/")[0]
        calls = call_service_pb2_grpc.CallServiceStub(strict.channel)
        assert strict.server.store is not None and strict.server.webhooks is not None
        database = strict.server.store.database
        change = text("UPDATE webhooks SET url = :url, version = version + 1 WHERE id = :id")
        for index, (url, refusal) in enumerate(
            (
                (f"http://localhost:{port}{target.path}", "refused: localhost is a loopback name"),
                (f"http://127.0.0.1:{port}{target.path}", "refused: 127.0.0.1 is not a public address"),
            )
        ):
            await database.run(
                lambda session, url=url: session.execute(change, {"url": url, "id": created.webhook.id}),
                write=True,
            )
            strict.server.webhooks.refresh()
            # A call of its own: the first one's head waits out its backoff on the injected clock.
            await calls.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(type="default", id=f"rebind{index}")
            )

            async def refused(refusal: str = refusal) -> bool:
                found = await stub.ListWebhookDeliveries(
                    W.ListWebhookDeliveriesRequest(webhook_id=created.webhook.id)
                )
                return any(refusal in d.last_error for d in found.deliveries)

            await eventually(refused, WAIT)
        assert target.received == []


@pytest.mark.usefixtures("short_attempts")
async def test_a_dead_endpoint_does_not_hold_up_a_healthy_one(scene: Scene) -> None:
    async def hang(_delivery: Delivery) -> web.StreamResponse:
        await asyncio.sleep(3)  # past the 0.5 s attempt timeout, every time
        return web.Response(status=204)

    dead_receiver = await scene.another()
    dead_receiver.answer = hang
    dead = await scene.create(url=dead_receiver.url)
    await scene.create()
    calls, updates = 4, 10
    for value in range(updates):
        for index in range(calls):
            await scene.call_event(f"iso{index}", value)
    await scene.received(calls * updates)
    # The dead one only ever had the head of each call in flight, and holds no more than its window.
    assert {item.event()["seq"] for item in dead_receiver.received} == {"1"}
    assert scene.server.server.webhooks is not None
    worker = scene.server.server.webhooks.workers[dead.webhook.id]
    assert len(worker._window) <= scene.server.server.webhooks.settings.window
