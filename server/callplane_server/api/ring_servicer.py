"""RingService servicer."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from callplane.v1 import ring_service_pb2, ring_service_pb2_grpc
from callplane_server.services.ringing import RingingService

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
        return ring_service_pb2.RingCallResponse(members_ids=result.members_ids, call=result.call)

    async def AcceptCall(
        self, request: ring_service_pb2.AcceptCallRequest, context: Context
    ) -> ring_service_pb2.AcceptCallResponse:
        await self._service.accept(request.type, request.id, request.user_id)
        return ring_service_pb2.AcceptCallResponse()

    async def RejectCall(
        self, request: ring_service_pb2.RejectCallRequest, context: Context
    ) -> ring_service_pb2.RejectCallResponse:
        await self._service.reject(request.type, request.id, request.user_id, request.reason)
        return ring_service_pb2.RejectCallResponse()
