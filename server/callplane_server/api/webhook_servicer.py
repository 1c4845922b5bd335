"""WebhookService: request proto → webhook service → response proto. Secrets appear only in the replies
of CreateWebhook and RotateWebhookSecret."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.message import Message

from callplane.v1 import webhook_service_pb2, webhook_service_pb2_grpc
from callplane_server.domain.webhooks import (
    DeliveryQuery,
    DeliveryRecord,
    DeliveryStatus,
    WebhookRecord,
    WebhookState,
)
from callplane_server.errors import InvalidArgument
from callplane_server.messages import duration_to_timedelta, set_timestamp
from callplane_server.services.webhooks import (
    WebhookInput,
    WebhookPatch,
    WebhookService,
    decode_page_token,
    encode_page_token,
)

Context = grpc.aio.ServicerContext[Message, Message]

_STATES = {
    WebhookState.ACTIVE: webhook_service_pb2.WEBHOOK_STATE_ACTIVE,
    WebhookState.FAILING: webhook_service_pb2.WEBHOOK_STATE_FAILING,
}
_STATUSES = {
    DeliveryStatus.PENDING: webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_PENDING,
    DeliveryStatus.SUCCEEDED: webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_SUCCEEDED,
    DeliveryStatus.FAILED: webhook_service_pb2.WEBHOOK_DELIVERY_STATUS_FAILED,
}
_STATUS_FILTERS = {value: status for status, value in _STATUSES.items()}


def webhook_message(record: WebhookRecord) -> webhook_service_pb2.Webhook:
    message = webhook_service_pb2.Webhook(
        id=record.id,
        url=record.url,
        event_types=record.event_types,
        call_types=record.call_types,
        description=record.description,
        enabled=record.enabled,
        state=_STATES[record.state] if record.enabled else webhook_service_pb2.WEBHOOK_STATE_DISABLED,
        delivered_position=record.delivered_position,
        last_error=record.last_error,
    )
    set_timestamp(message.failing_since, record.failing_since)
    set_timestamp(message.previous_secret_expires_at, record.previous_secret_expires_at)
    set_timestamp(message.created_at, record.created_at)
    set_timestamp(message.updated_at, record.updated_at)
    return message


def delivery_message(record: DeliveryRecord) -> webhook_service_pb2.WebhookDelivery:
    message = webhook_service_pb2.WebhookDelivery(
        webhook_id=record.webhook_id,
        position=record.position,
        message_id=record.message_id,
        call_cid=record.call_cid,
        seq=record.seq,
        event_type=record.event_type,
        status=_STATUSES[record.status],
        attempts=record.attempts,
        last_status_code=record.last_status_code,
        last_error=record.last_error,
    )
    if record.last_latency is not None:
        message.last_latency.FromTimedelta(record.last_latency)
    set_timestamp(message.first_attempt_at, record.first_attempt_at)
    set_timestamp(message.last_attempt_at, record.last_attempt_at)
    set_timestamp(message.next_attempt_at, record.next_attempt_at)
    return message


def _overlap(request: webhook_service_pb2.RotateWebhookSecretRequest) -> timedelta | None:
    return duration_to_timedelta(request, "overlap", "overlap")


class WebhookServicer(webhook_service_pb2_grpc.WebhookServiceServicer):
    def __init__(self, service: WebhookService) -> None:
        self._service = service

    async def CreateWebhook(
        self, request: webhook_service_pb2.CreateWebhookRequest, context: Context
    ) -> webhook_service_pb2.CreateWebhookResponse:
        record, secret = await self._service.create(
            WebhookInput(
                url=request.url,
                event_types=list(request.event_types),
                call_types=list(request.call_types),
                description=request.description,
                enabled=not request.disabled,
            )
        )
        return webhook_service_pb2.CreateWebhookResponse(webhook=webhook_message(record), secret=secret)

    async def GetWebhook(
        self, request: webhook_service_pb2.GetWebhookRequest, context: Context
    ) -> webhook_service_pb2.GetWebhookResponse:
        return webhook_service_pb2.GetWebhookResponse(
            webhook=webhook_message(await self._service.get(request.id))
        )

    async def ListWebhooks(
        self, request: webhook_service_pb2.ListWebhooksRequest, context: Context
    ) -> webhook_service_pb2.ListWebhooksResponse:
        records = await self._service.list()
        return webhook_service_pb2.ListWebhooksResponse(webhooks=[webhook_message(r) for r in records])

    async def UpdateWebhook(
        self, request: webhook_service_pb2.UpdateWebhookRequest, context: Context
    ) -> webhook_service_pb2.UpdateWebhookResponse:
        patch = WebhookPatch(
            url=request.url if request.HasField("url") else None,
            event_types=list(request.event_types.values) if request.HasField("event_types") else None,
            call_types=list(request.call_types.values) if request.HasField("call_types") else None,
            description=request.description if request.HasField("description") else None,
            enabled=request.enabled if request.HasField("enabled") else None,
        )
        record = await self._service.update(request.id, patch)
        return webhook_service_pb2.UpdateWebhookResponse(webhook=webhook_message(record))

    async def DeleteWebhook(
        self, request: webhook_service_pb2.DeleteWebhookRequest, context: Context
    ) -> webhook_service_pb2.DeleteWebhookResponse:
        await self._service.delete(request.id)
        return webhook_service_pb2.DeleteWebhookResponse()

    async def RotateWebhookSecret(
        self, request: webhook_service_pb2.RotateWebhookSecretRequest, context: Context
    ) -> webhook_service_pb2.RotateWebhookSecretResponse:
        record, secret = await self._service.rotate_secret(request.id, _overlap(request))
        return webhook_service_pb2.RotateWebhookSecretResponse(webhook=webhook_message(record), secret=secret)

    async def ResumeWebhook(
        self, request: webhook_service_pb2.ResumeWebhookRequest, context: Context
    ) -> webhook_service_pb2.ResumeWebhookResponse:
        record = await self._service.resume(request.id)
        return webhook_service_pb2.ResumeWebhookResponse(webhook=webhook_message(record))

    async def ListWebhookDeliveries(
        self, request: webhook_service_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> webhook_service_pb2.ListWebhookDeliveriesResponse:
        if request.status and request.status not in _STATUS_FILTERS:
            raise InvalidArgument.for_field("status", f"unknown delivery status {request.status}")
        page = await self._service.deliveries(
            DeliveryQuery(
                webhook_id=request.webhook_id,
                status=_STATUS_FILTERS.get(request.status),
                call_cid=request.call_cid,
                event_type=request.event_type,
                limit=request.limit,
                before_position=decode_page_token(request.next),
            )
        )
        return webhook_service_pb2.ListWebhookDeliveriesResponse(
            deliveries=[delivery_message(d) for d in page.deliveries],
            next=encode_page_token(page.next_before),
        )

    async def RedeliverWebhook(
        self, request: webhook_service_pb2.RedeliverWebhookRequest, context: Context
    ) -> webhook_service_pb2.RedeliverWebhookResponse:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument.for_field("after_position", "set after_position or positions")
        if target == "positions":
            record, queued = await self._service.redeliver(request.id, list(request.positions.positions))
            return webhook_service_pb2.RedeliverWebhookResponse(
                webhook=webhook_message(record), queued=queued
            )
        record = await self._service.redeliver_after(request.id, request.after_position)
        return webhook_service_pb2.RedeliverWebhookResponse(webhook=webhook_message(record))
