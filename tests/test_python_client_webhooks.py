"""The Python client's webhook methods, end to end: a real server delivering (run_webhooks, loopback
targets allowed) to a real aiohttp receiver, each delivery's signature checked with `standardwebhooks`
the way a receiver would."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import pytest
import pytest_asyncio
from standardwebhooks import Webhook, WebhookVerificationError

from callplane import (
    CallplaneClient,
    CallplaneError,
    WebhookDeliveryInfo,
    WebhookInfo,
    WebhookRedelivery,
    WebhookSecret,
)
from callplane.client.convert import to_delivery_status, to_duration
from callplane.v1 import webhook_service_pb2
from tests.support import SERVER_TOKEN, RunningServer, running_server, user_token
from tests.webhook_receiver import DELIVERY_TIMEOUT_S, Delivery, Receiver

#: Short, so the FAILING test moves the clock past it without touching event retention (24 h).
RETRY_PERIOD_S = 60.0
T = TypeVar("T")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    async with running_server(
        backend,
        tmp_path_factory.mktemp(backend),
        run_webhooks=True,
        webhook_allow_private=True,
        webhook_retry_period_seconds=RETRY_PERIOD_S,
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(server: RunningServer) -> AsyncIterator[CallplaneClient]:
    async with CallplaneClient(server.target, token=SERVER_TOKEN) as c:
        await c.upsert_users([{"id": "alice", "name": "Alice"}])
        yield c


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Ask `probe` until `done` accepts its answer: the delivery log is written after the receiver
    answered, so a test that read it at once could see the attempt still in flight."""
    deadline = asyncio.get_running_loop().time() + DELIVERY_TIMEOUT_S
    while True:
        value = await probe()
        if done(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still not done after {DELIVERY_TIMEOUT_S} s: {value!r}")
        await asyncio.sleep(0.02)


def verify(secret: str, delivery: Delivery) -> dict[str, Any]:
    """What a receiver does: the spec's library checks the signature over the exact body and headers."""
    event: dict[str, Any] = Webhook(secret).verify(delivery.body, delivery.headers)
    return event


def new_call_id() -> str:
    return f"wh-{uuid.uuid4().hex[:10]}"


async def make_call(client: CallplaneClient, call_id: str | None = None) -> str:
    call = client.call("default", call_id or new_call_id())
    await call.get_or_create(created_by_id="alice")
    return call.cid


def of_call(cid: str) -> Callable[[Delivery], bool]:
    return lambda delivery: delivery.event()["callCid"] == cid


# --------------------------------------------------------------------------------------------------
# No server: conversions
# --------------------------------------------------------------------------------------------------


def test_delivery_status_names() -> None:
    assert to_delivery_status(None) == webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_UNSPECIFIED
    assert to_delivery_status("pending") == webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_PENDING
    assert to_delivery_status("SUCCEEDED") == webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_SUCCEEDED
    assert (
        to_delivery_status("WEBHOOK_DELIVERY_STATUS_FAILED")
        == webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_FAILED
    )
    with pytest.raises(ValueError, match="pending"):
        to_delivery_status("delivered")


def test_durations() -> None:
    assert to_duration(None) is None
    assert to_duration(timedelta(hours=2)).ToTimedelta() == timedelta(hours=2)  # type: ignore[union-attr]
    assert to_duration(1.5).ToTimedelta() == timedelta(seconds=1.5)  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        to_duration("1h")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Against the server
# --------------------------------------------------------------------------------------------------


async def test_create_receive_and_verify(client: CallplaneClient) -> None:
    async with Receiver() as receiver:
        created = await client.create_webhook(
            receiver.url, event_types=["call.*"], call_types=["default"], description="created by the client"
        )
        assert isinstance(created, WebhookSecret)
        assert created.secret.startswith("whsec_")
        assert created.secret not in repr(created)  # not printed by accident
        hook = created.webhook
        assert hook.id.startswith("wh_")
        assert (hook.url, hook.event_types, hook.call_types) == (receiver.url, ["call.*"], ["default"])
        assert (hook.description, hook.enabled, hook.state, hook.failing) == (
            "created by the client",
            True,
            "ACTIVE",
            False,
        )
        assert hook.created_at is not None and hook.failing_since is None

        cid = await make_call(client)
        delivery = await receiver.next_where(of_call(cid))
        event = verify(created.secret, delivery)
        assert event["type"] == "call.created"
        assert event["callCid"] == cid
        assert delivery.id == f"evt_{event['position']}"
        assert delivery.headers["content-type"] == "application/json"
        # Another secret, or a body changed by one byte, fails verification.
        other = Webhook("whsec_" + "A" * 43 + "=")
        with pytest.raises(WebhookVerificationError):
            other.verify(delivery.body, delivery.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(created.secret).verify(delivery.body + b" ", delivery.headers)

        page = await eventually(
            lambda: client.list_webhook_deliveries(hook.id, call_cid=cid),
            lambda page: len(page) == 1 and page[0].status == "SUCCEEDED",
        )
        record = page[0]
        assert isinstance(record, WebhookDeliveryInfo)
        assert (record.webhook_id, record.call_cid, record.event_type) == (hook.id, cid, "call.created")
        assert record.message_id == delivery.id
        assert record.position == int(event["position"]) and record.seq == int(event["seq"])
        assert (record.attempts, record.last_status_code, record.last_error) == (1, 200, "")
        assert record.last_latency is not None and record.next_attempt_at is None
        assert record.first_attempt_at is not None and record.last_attempt_at is not None
        await client.delete_webhook(hook.id)


async def test_get_list_update_delete(client: CallplaneClient) -> None:
    created = await client.create_webhook("http://127.0.0.1:9/unused", description="first")
    hook = created.webhook
    got = await client.get_webhook(hook.id)
    assert isinstance(got, WebhookInfo)
    assert (got.id, got.url, got.description, got.event_types, got.call_types) == (
        hook.id,
        hook.url,
        "first",
        [],
        [],
    )
    assert hook.id in [w.id for w in await client.list_webhooks()]

    updated = await client.update_webhook(hook.id, event_types=["call.ended", "custom"], description="second")
    assert (updated.event_types, updated.description, updated.url) == (
        ["call.ended", "custom"],
        "second",
        hook.url,
    )
    # Unset arguments keep their values; an empty list removes a filter.
    updated = await client.update_webhook(hook.id, call_types=["livestream"])
    assert (updated.event_types, updated.call_types) == (["call.ended", "custom"], ["livestream"])
    updated = await client.update_webhook(hook.id, event_types=[])
    assert (updated.event_types, updated.call_types, updated.description) == ([], ["livestream"], "second")
    disabled = await client.update_webhook(hook.id, enabled=False)
    assert (disabled.enabled, disabled.state) == (False, "DISABLED")
    enabled = await client.update_webhook(hook.id, enabled=True, url="http://127.0.0.1:9/other")
    assert (enabled.enabled, enabled.state, enabled.url) == (True, "ACTIVE", "http://127.0.0.1:9/other")

    await client.delete_webhook(hook.id)
    with pytest.raises(CallplaneError) as raised:
        await client.get_webhook(hook.id)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.reason == "WEBHOOK_NOT_FOUND"
    assert hook.id not in [w.id for w in await client.list_webhooks()]


async def test_errors_come_back_as_callplane_errors(client: CallplaneClient, server: RunningServer) -> None:
    with pytest.raises(CallplaneError) as raised:
        await client.create_webhook("ftp://127.0.0.1/hook")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "url" in raised.value.fields
    with pytest.raises(CallplaneError) as raised:
        await client.resume_webhook("wh_missing")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    # User tokens may not manage webhooks.
    as_alice = client.with_options(token=user_token("alice"))
    with pytest.raises(CallplaneError) as raised:
        await as_alice.list_webhooks()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(ValueError):
        await client.redeliver_webhook("wh_any")
    with pytest.raises(ValueError):
        await client.redeliver_webhook("wh_any", after_position=1, positions=[2])


async def test_deliveries_filtered_and_paged(client: CallplaneClient) -> None:
    async with Receiver() as receiver:
        created = await client.create_webhook(receiver.url)
        hook = created.webhook
        cids = [await make_call(client) for _ in range(3)]
        for cid in cids:
            call_type, call_id = cid.split(":")
            await client.call(call_type, call_id).send_event("alice", {"note": cid})
        # 3 call.created + 3 custom, delivered and recorded.
        await eventually(
            lambda: client.list_webhook_deliveries(hook.id, status="succeeded", limit=100),
            lambda page: len([d for d in page if d.call_cid in cids]) == 6,
        )
        for delivery in receiver.received:
            verify(created.secret, delivery)

        # Paging: newest event first, every delivery once, `next` None on the last page.
        seen: list[WebhookDeliveryInfo] = []
        page = await client.list_webhook_deliveries(hook.id, limit=2)
        pages = 1
        while True:
            assert len(page) <= 2
            seen.extend(page)
            if page.next is None:
                break
            page = await client.list_webhook_deliveries(hook.id, limit=2, next=page.next)
            pages += 1
        assert pages >= 3
        positions = [d.position for d in seen]
        assert positions == sorted(positions, reverse=True) and len(set(positions)) == len(positions)
        assert {d.call_cid for d in seen} >= set(cids)

        by_call = await client.list_webhook_deliveries(hook.id, call_cid=cids[1])
        assert [d.event_type for d in by_call] == ["custom", "call.created"]
        customs = await client.list_webhook_deliveries(hook.id, event_type="custom")
        assert {d.call_cid for d in customs} == set(cids)
        assert all(d.event_type == "custom" for d in customs)
        assert len(await client.list_webhook_deliveries(hook.id, status="failed")) == 0
        await client.delete_webhook(hook.id)


async def test_redeliver_by_positions_and_after_position(client: CallplaneClient) -> None:
    async with Receiver() as receiver:
        created = await client.create_webhook(receiver.url)
        hook = created.webhook
        cid = await make_call(client)
        call_type, call_id = cid.split(":")
        await client.call(call_type, call_id).send_event("alice", {"n": 1})
        first = [await receiver.next_where(of_call(cid)) for _ in range(2)]
        assert [d.event()["type"] for d in first] == ["call.created", "custom"]
        page = await eventually(
            lambda: client.list_webhook_deliveries(hook.id, call_cid=cid, status="succeeded"),
            lambda page: len(page) == 2,
        )
        created_at, custom_at = sorted(d.position for d in page)

        # Given deliveries: sent once more, with the same webhook-id.
        again = await client.redeliver_webhook(hook.id, positions=[custom_at])
        assert isinstance(again, WebhookRedelivery)
        assert again.queued == 1
        repeat = await receiver.next_where(of_call(cid))
        assert repeat.id == first[1].id and repeat.body == first[1].body
        verify(created.secret, repeat)

        # After a position: the cursor moves back and the later events come again, in order.
        back = await client.redeliver_webhook(hook.id, after_position=created_at - 1)
        assert back.webhook.delivered_position == created_at - 1
        replay = [await receiver.next_where(of_call(cid)) for _ in range(2)]
        assert [d.id for d in replay] == [d.id for d in first]
        for delivery in replay:
            verify(created.secret, delivery)
        await client.delete_webhook(hook.id)


async def test_rotated_secret_overlaps(client: CallplaneClient) -> None:
    async with Receiver() as receiver:
        created = await client.create_webhook(receiver.url, event_types=["custom"])
        hook = created.webhook
        cid = await make_call(client)
        call = client.call(*cid.split(":"))
        await call.send_event("alice", {"n": 0})
        verify(created.secret, await receiver.next_where(of_call(cid)))

        rotated = await client.rotate_webhook_secret(hook.id, overlap=timedelta(hours=1))
        assert isinstance(rotated, WebhookSecret)
        assert rotated.secret.startswith("whsec_") and rotated.secret != created.secret
        assert rotated.webhook.previous_secret_expires_at is not None
        assert rotated.webhook.updated_at is not None
        expected = rotated.webhook.updated_at + timedelta(hours=1)
        assert abs(rotated.webhook.previous_secret_expires_at - expected) < timedelta(seconds=1)

        # The worker picks the new secret up as its next lease round sees the change; until then it still
        # signs with the old one alone. Send events until one arrives signed with both.
        for n in range(1, 200):
            await call.send_event("alice", {"n": n})
            delivery = await receiver.next_where(of_call(cid))
            verify(created.secret, delivery)  # the old secret keeps working throughout the overlap
            if len(delivery.signatures) == 2:
                break
        else:
            raise AssertionError("no delivery was signed with the rotated secret")
        verify(rotated.secret, delivery)
        await client.delete_webhook(hook.id)


async def test_failing_then_resumed(client: CallplaneClient, server: RunningServer) -> None:
    dispatcher = server.server.webhooks
    assert dispatcher is not None
    async with Receiver() as receiver:
        receiver.status = 503
        created = await client.create_webhook(receiver.url, event_types=["custom"])
        hook = created.webhook
        with pytest.raises(CallplaneError) as raised:
            await client.resume_webhook(hook.id)  # not FAILING
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION

        cid = await make_call(client)
        await client.call(*cid.split(":")).send_event("alice", {"n": 1})
        first = await receiver.next_where(of_call(cid))
        pending = await eventually(
            lambda: client.list_webhook_deliveries(hook.id, status="pending"),
            lambda page: len(page) == 1 and page[0].attempts >= 1,
        )
        assert pending[0].last_status_code == 503 and pending[0].last_error.startswith("HTTP 503")
        assert pending[0].next_attempt_at is not None

        # Past the retry period, the next attempt fails too and the endpoint gives up: FAILING.
        server.clock.advance(timedelta(seconds=RETRY_PERIOD_S + 1))
        dispatcher.wake()
        failing = await eventually(lambda: client.get_webhook(hook.id), lambda w: w.failing)
        assert failing.failing_since is not None and "HTTP 503" in failing.last_error
        failed = await client.list_webhook_deliveries(hook.id, status="failed")
        assert [d.position for d in failed] == [pending[0].position]

        # Resumed: the event it gave up on goes again at once, and now succeeds.
        receiver.status = 200
        resumed = await client.resume_webhook(hook.id)
        assert (resumed.state, resumed.failing_since) == ("ACTIVE", None)
        delivery = await receiver.next_where(lambda d: d.id == first.id)
        verify(created.secret, delivery)
        await eventually(
            lambda: client.list_webhook_deliveries(hook.id, status="succeeded"),
            lambda page: [d.position for d in page] == [pending[0].position],
        )
        await client.delete_webhook(hook.id)
