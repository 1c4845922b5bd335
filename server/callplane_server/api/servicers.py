"""Thin servicers: request proto → service call → response proto. Rules live in the services."""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import Message

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.api.rendering import Renderings
from callplane_server.domain.records import CallView
from callplane_server.messages import (
    call_message,
    call_type_message,
    grants_to_dict,
    member_inputs,
    member_message,
    optional_struct,
    page_request,
    settings_to_dict,
    struct_to_dict,
    timestamp_to_datetime,
    user_message,
)
from callplane_server.services.call_types import CallTypeService
from callplane_server.services.calls import CallData, CallService, CallUpdate
from callplane_server.services.users import UserInput, UserPatch, UserService

# Servicers never look at their context's message types (the generated base leaves them open too).
Context = grpc.aio.ServicerContext[Message, Message]
# The messages made of a call view: the call, its first members and the caller's capabilities.
Reply = TypeVar(
    "Reply", call_service_pb2.GetCallResponse, call_service_pb2.GetOrCreateCallResponse, call_pb2.CallState
)


class CallTypeServicer(call_type_service_pb2_grpc.CallTypeServiceServicer):
    def __init__(self, service: CallTypeService) -> None:
        self._service = service

    async def CreateCallType(
        self, request: call_type_service_pb2.CreateCallTypeRequest, context: Context
    ) -> call_type_service_pb2.CreateCallTypeResponse:
        record = await self._service.create(
            request.name,
            settings_to_dict(request.settings),
            grants_to_dict(request.grants),
            list(request.custom_indexes),
        )
        return call_type_service_pb2.CreateCallTypeResponse(call_type=call_type_message(record))

    async def GetCallType(
        self, request: call_type_service_pb2.GetCallTypeRequest, context: Context
    ) -> call_type_service_pb2.GetCallTypeResponse:
        record = await self._service.get(request.name)
        return call_type_service_pb2.GetCallTypeResponse(call_type=call_type_message(record))

    async def ListCallTypes(
        self, request: call_type_service_pb2.ListCallTypesRequest, context: Context
    ) -> call_type_service_pb2.ListCallTypesResponse:
        records = await self._service.list()
        return call_type_service_pb2.ListCallTypesResponse(call_types=[call_type_message(r) for r in records])

    async def UpdateCallType(
        self, request: call_type_service_pb2.UpdateCallTypeRequest, context: Context
    ) -> call_type_service_pb2.UpdateCallTypeResponse:
        record = await self._service.update(
            request.name,
            settings_to_dict(request.settings),
            grants_to_dict(request.grants),
            list(request.custom_indexes.specs) if request.HasField("custom_indexes") else None,
        )
        return call_type_service_pb2.UpdateCallTypeResponse(call_type=call_type_message(record))

    async def DeleteCallType(
        self, request: call_type_service_pb2.DeleteCallTypeRequest, context: Context
    ) -> call_type_service_pb2.DeleteCallTypeResponse:
        await self._service.delete(request.name)
        return call_type_service_pb2.DeleteCallTypeResponse()


class UserServicer(user_pb2_grpc.UserServiceServicer):
    def __init__(self, service: UserService) -> None:
        self._service = service

    async def UpsertUsers(
        self, request: user_pb2.UpsertUsersRequest, context: Context
    ) -> user_pb2.UpsertUsersResponse:
        users = [
            UserInput(
                u.id, u.name, u.image, u.role, list(u.teams), struct_to_dict(u.custom, f"users[{i}].custom")
            )
            for i, u in enumerate(request.users)
        ]
        records = await self._service.upsert(users)
        return user_pb2.UpsertUsersResponse(users=[user_message(r) for r in records])

    async def UpdateUsersPartial(
        self, request: user_pb2.UpdateUsersPartialRequest, context: Context
    ) -> user_pb2.UpdateUsersPartialResponse:
        patches = [
            UserPatch(u.id, struct_to_dict(u.set, f"users[{i}].set"), list(u.unset))
            for i, u in enumerate(request.users)
        ]
        records = await self._service.update_partial(patches)
        return user_pb2.UpdateUsersPartialResponse(users=[user_message(r) for r in records])

    async def QueryUsers(
        self, request: user_pb2.QueryUsersRequest, context: Context
    ) -> user_pb2.QueryUsersResponse:
        page = await self._service.query(page_request(request))
        return user_pb2.QueryUsersResponse(
            users=[user_message(r) for r in page.items], next=page.next, prev=page.prev
        )

    async def DeleteUsers(
        self, request: user_pb2.DeleteUsersRequest, context: Context
    ) -> user_pb2.DeleteUsersResponse:
        deleted = await self._service.delete(list(request.user_ids))
        return user_pb2.DeleteUsersResponse(deleted_user_ids=deleted)


_RENDERINGS = Renderings()


def _rendered(view: CallView, reply_type: type[Reply], **fields: bool) -> Reply:
    """The reply (or QueryCalls page entry) for a view, built once per state of a cached call (anchored
    on its record): a hot call is read far more often than it changes."""
    key = (reply_type, len(view.members), tuple(view.own_capabilities), tuple(fields.items()))
    return _RENDERINGS.get(
        view.call,
        key,
        lambda: reply_type(
            call=call_message(view),
            members=[member_message(m) for m in view.members],
            own_capabilities=view.own_capabilities,
            **fields,
        ),
    )


class CallServicer(call_service_pb2_grpc.CallServiceServicer):
    def __init__(self, service: CallService) -> None:
        self._service = service

    async def GetOrCreateCall(
        self, request: call_service_pb2.GetOrCreateCallRequest, context: Context
    ) -> call_service_pb2.GetOrCreateCallResponse:
        data = request.data
        view = await self._service.get_or_create(
            request.type,
            request.id,
            CallData(
                created_by_id=data.created_by_id,
                members=member_inputs(data.members, "data.members"),
                custom=struct_to_dict(data.custom, "data.custom"),
                settings_override=settings_to_dict(data.settings_override),
                starts_at=timestamp_to_datetime(data, "starts_at", "data.starts_at"),
                team=data.team,
            )
            if request.HasField("data")
            else CallData(),  # most requests find the call and send no data: skip the conversions
            request.members_limit,
            ring=request.ring,
            notify=request.notify,
            video=request.video,
        )
        return _rendered(view, call_service_pb2.GetOrCreateCallResponse, created=view.created)

    async def GetCall(
        self, request: call_service_pb2.GetCallRequest, context: Context
    ) -> call_service_pb2.GetCallResponse:
        view = await self._service.get(request.type, request.id, request.members_limit)
        return _rendered(view, call_service_pb2.GetCallResponse)

    async def UpdateCall(
        self, request: call_service_pb2.UpdateCallRequest, context: Context
    ) -> call_service_pb2.UpdateCallResponse:
        change = CallUpdate(
            custom=optional_struct(request, "custom", "custom"),
            set_custom=struct_to_dict(request.set_custom, "set_custom"),
            unset_custom=list(request.unset_custom),
            settings_override=settings_to_dict(request.settings_override)
            if request.HasField("settings_override")
            else None,
            starts_at=timestamp_to_datetime(request, "starts_at", "starts_at"),
            etag=request.etag,
        )
        view = await self._service.update(request.type, request.id, change, request.members_limit)
        # Anchored on the call's record: an update that changed nothing answers with the cached state.
        return _RENDERINGS.get(
            view.call,
            ("UpdateCall", len(view.members)),
            lambda: call_service_pb2.UpdateCallResponse(
                call=call_message(view), members=[member_message(m) for m in view.members]
            ),
        )

    async def EndCall(
        self, request: call_service_pb2.EndCallRequest, context: Context
    ) -> call_service_pb2.EndCallResponse:
        view = await self._service.end(request.type, request.id)
        return call_service_pb2.EndCallResponse(call=call_message(view))

    async def DeleteCall(
        self, request: call_service_pb2.DeleteCallRequest, context: Context
    ) -> call_service_pb2.DeleteCallResponse:
        view = await self._service.delete(request.type, request.id, hard=request.hard)
        return call_service_pb2.DeleteCallResponse(call=call_message(view))

    async def QueryCalls(
        self, request: call_service_pb2.QueryCallsRequest, context: Context
    ) -> call_service_pb2.QueryCallsResponse:
        page = await self._service.query(page_request(request), request.members_limit)
        return call_service_pb2.QueryCallsResponse(
            calls=[_rendered(view, call_pb2.CallState) for view in page.items], next=page.next, prev=page.prev
        )

    async def UpdateCallMembers(
        self, request: call_service_pb2.UpdateCallMembersRequest, context: Context
    ) -> call_service_pb2.UpdateCallMembersResponse:
        change = await self._service.update_members(
            request.type,
            request.id,
            member_inputs(request.update_members, "update_members"),
            list(request.remove_members),
        )
        return call_service_pb2.UpdateCallMembersResponse(
            members=[member_message(m) for m in change.members], removed_user_ids=change.removed_user_ids
        )

    async def QueryMembers(
        self, request: call_service_pb2.QueryMembersRequest, context: Context
    ) -> call_service_pb2.QueryMembersResponse:
        page = await self._service.query_members(request.type, request.id, page_request(request))
        # A cached page is the same object until the call changes: rendered once.
        return _RENDERINGS.get(
            page,
            "QueryMembers",
            lambda: call_service_pb2.QueryMembersResponse(
                members=[member_message(m) for m in page.items], next=page.next, prev=page.prev
            ),
        )
