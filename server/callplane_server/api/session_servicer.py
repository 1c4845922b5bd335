"""SessionService servicer."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from callplane.v1 import session_service_pb2, session_service_pb2_grpc
from callplane_server.messages import (
    call_message,
    member_inputs,
    page_request,
    participant_message,
    session_message,
    settings_to_dict,
    struct_to_dict,
    timestamp_to_datetime,
)
from callplane_server.services.calls import CallData
from callplane_server.services.sessions import SessionService

# Servicers never look at their context's message types (the generated base leaves them open too).
Context = grpc.aio.ServicerContext[Message, Message]


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, service: SessionService) -> None:
        self._service = service

    async def JoinCall(
        self, request: session_service_pb2.JoinCallRequest, context: Context
    ) -> session_service_pb2.JoinCallResponse:
        data = None
        if request.create:
            data = CallData(
                created_by_id=request.data.created_by_id,
                members=member_inputs(request.data.members, "data.members"),
                custom=struct_to_dict(request.data.custom, "data.custom"),
                settings_override=settings_to_dict(request.data.settings_override),
                starts_at=timestamp_to_datetime(request.data, "starts_at", "data.starts_at"),
                team=request.data.team,
            )
        result = await self._service.join(
            request.type,
            request.id,
            request.user_id,
            participant_session_id=request.participant_session_id,
            custom=struct_to_dict(request.custom, "custom"),
            create=request.create,
            data=data,
        )
        lease_ttl = duration_pb2.Duration()
        lease_ttl.FromTimedelta(self._service.lease_ttl)
        return session_service_pb2.JoinCallResponse(
            call=call_message(result.view),
            session=session_message(result.session, result.participants, result.now),
            participant=participant_message(result.participant, result.now),
            lease_ttl=lease_ttl,
            seq=result.seq,
            own_capabilities=sorted(result.capabilities),
        )

    async def LeaveCall(
        self, request: session_service_pb2.LeaveCallRequest, context: Context
    ) -> session_service_pb2.LeaveCallResponse:
        await self._service.leave(request.type, request.id, request.participant_session_id)
        return session_service_pb2.LeaveCallResponse()

    async def KeepAlive(
        self, request: session_service_pb2.KeepAliveRequest, context: Context
    ) -> session_service_pb2.KeepAliveResponse:
        participant = await self._service.keep_alive(request.type, request.id, request.participant_session_id)
        return session_service_pb2.KeepAliveResponse(participant=participant_message(participant))

    async def UpdateParticipant(
        self, request: session_service_pb2.UpdateParticipantRequest, context: Context
    ) -> session_service_pb2.UpdateParticipantResponse:
        participant, now = await self._service.update_participant(
            request.type, request.id, request.participant_session_id, list(request.published_tracks)
        )
        return session_service_pb2.UpdateParticipantResponse(
            participant=participant_message(participant, now)
        )

    async def QueryCallParticipants(
        self, request: session_service_pb2.QueryCallParticipantsRequest, context: Context
    ) -> session_service_pb2.QueryCallParticipantsResponse:
        found = await self._service.query_participants(request.type, request.id, page_request(request))
        return session_service_pb2.QueryCallParticipantsResponse(
            participants=[participant_message(p, found.now) for p in found.page.items],
            total_participants=found.total,
            participants_by_role=found.by_role,
            session_id=found.session_id,
            next=found.page.next,
            prev=found.page.prev,
        )

    async def QueryCallSessions(
        self, request: session_service_pb2.QueryCallSessionsRequest, context: Context
    ) -> session_service_pb2.QueryCallSessionsResponse:
        found = await self._service.query_sessions(request.type, request.id, page_request(request))
        return session_service_pb2.QueryCallSessionsResponse(
            sessions=[
                session_message(session, found.participants.get(session.id, []), found.now)
                for session in found.page.items
            ],
            next=found.page.next,
            prev=found.page.prev,
        )

    async def GoLive(
        self, request: session_service_pb2.GoLiveRequest, context: Context
    ) -> session_service_pb2.GoLiveResponse:
        view = await self._service.go_live(request.type, request.id)
        return session_service_pb2.GoLiveResponse(call=call_message(view))

    async def StopLive(
        self, request: session_service_pb2.StopLiveRequest, context: Context
    ) -> session_service_pb2.StopLiveResponse:
        view = await self._service.stop_live(request.type, request.id)
        return session_service_pb2.StopLiveResponse(call=call_message(view))
