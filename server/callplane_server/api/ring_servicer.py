"""RingService servicer."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from callplane.v1 import ring_service_pb2, ring_service_pb2_grpc
from callplane_server.messages import call_message
from callplane_server.services.ringing import BUSY, CANCEL, DECLINE, TIMEOUT, RingingService

_REASONS = {
    ring_service_pb2.REJECT_REASON_UNSPECIFIED: DECLINE,
    ring_service_pb2.REJECT_REASON_DECLINE: DECLINE,
    ring_service_pb2.REJECT_REASON_BUSY: BUSY,
    ring_service_pb2.REJECT_REASON_CANCEL: CANCEL,
    ring_service_pb2.REJECT_REASON_TIMEOUT: TIMEOUT,
}

# Servicers never look at their context's message types (the generated base leaves them open too).
Context = grpc.aio.ServicerContext[Message, Message]


class RingServicer(ring_service_pb2_grpc.RingServiceServicer):
    def __init__(self, service: RingingService) -> None:
        self._service = service

    async def RingCall(
        self, request: ring_service_pb2.RingCallRequest, context: Context
    ) -> ring_service_pb2.RingCallResponse:
        result = await self._service.ring(
            request.type, request.id, request.user_id, list(request.members_ids), request.video
        )
        return ring_service_pb2.RingCallResponse(
            members_ids=result.members_ids, call=call_message(result.call)
        )

    async def AcceptCall(
        self, request: ring_service_pb2.AcceptCallRequest, context: Context
    ) -> ring_service_pb2.AcceptCallResponse:
        await self._service.accept(request.type, request.id, request.user_id)
        return ring_service_pb2.AcceptCallResponse()

    async def RejectCall(
        self, request: ring_service_pb2.RejectCallRequest, context: Context
    ) -> ring_service_pb2.RejectCallResponse:
        reason = _REASONS.get(request.reason, str(request.reason))  # an unknown value is refused by name
        await self._service.reject(request.type, request.id, request.user_id, reason)
        return ring_service_pb2.RejectCallResponse()
