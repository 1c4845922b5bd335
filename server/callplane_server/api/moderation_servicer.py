"""ModerationService servicer."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from callplane.v1 import moderation_service_pb2, moderation_service_pb2_grpc
from callplane_server.services.moderation import ModerationService

# Servicers never look at their context's message types (the generated base leaves them open too).
Context = grpc.aio.ServicerContext[Message, Message]


class ModerationServicer(moderation_service_pb2_grpc.ModerationServiceServicer):
    def __init__(self, service: ModerationService) -> None:
        self._service = service

    async def UpdateUserPermissions(
        self, request: moderation_service_pb2.UpdateUserPermissionsRequest, context: Context
    ) -> moderation_service_pb2.UpdateUserPermissionsResponse:
        capabilities = await self._service.update_user_permissions(
            request.type,
            request.id,
            request.user_id,
            list(request.grant_permissions),
            list(request.revoke_permissions),
        )
        return moderation_service_pb2.UpdateUserPermissionsResponse(own_capabilities=capabilities)

    async def RequestPermission(
        self, request: moderation_service_pb2.RequestPermissionRequest, context: Context
    ) -> moderation_service_pb2.RequestPermissionResponse:
        await self._service.request_permission(request.type, request.id, list(request.permissions))
        return moderation_service_pb2.RequestPermissionResponse()

    async def BlockUser(
        self, request: moderation_service_pb2.BlockUserRequest, context: Context
    ) -> moderation_service_pb2.BlockUserResponse:
        await self._service.block_user(request.type, request.id, request.user_id)
        return moderation_service_pb2.BlockUserResponse()

    async def UnblockUser(
        self, request: moderation_service_pb2.UnblockUserRequest, context: Context
    ) -> moderation_service_pb2.UnblockUserResponse:
        await self._service.unblock_user(request.type, request.id, request.user_id)
        return moderation_service_pb2.UnblockUserResponse()

    async def KickUser(
        self, request: moderation_service_pb2.KickUserRequest, context: Context
    ) -> moderation_service_pb2.KickUserResponse:
        await self._service.kick_user(request.type, request.id, request.user_id, block=request.block)
        return moderation_service_pb2.KickUserResponse()
