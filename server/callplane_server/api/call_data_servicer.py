"""CallDataService servicer."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from callplane.v1 import call_data_service_pb2, call_data_service_pb2_grpc, session_pb2
from callplane_server.errors import InvalidArgument
from callplane_server.messages import participant_message, pin_messages, session_message, struct_to_dict
from callplane_server.services.call_data import CallDataService, CustomChange, CustomMode

# Servicers never look at their context's message types (the generated base leaves them open too).
Context = grpc.aio.ServicerContext[Message, Message]

_MODES = {
    session_pb2.CUSTOM_DATA_MODE_UNSPECIFIED: CustomMode.REPLACE,
    session_pb2.CUSTOM_DATA_MODE_REPLACE: CustomMode.REPLACE,
    session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE: CustomMode.SHALLOW_MERGE,
}


def _change(
    request: call_data_service_pb2.UpdateParticipantCustomRequest
    | call_data_service_pb2.UpdateSessionCustomRequest,
) -> CustomChange:
    mode = _MODES.get(request.mode)
    if mode is None:
        raise InvalidArgument.for_field("mode", f"unknown custom data mode {request.mode}")
    return CustomChange(
        mode=mode,
        custom=struct_to_dict(request.custom, "custom"),
        keys_to_delete=list(request.keys_to_delete),
        etag=request.etag,
    )


class CallDataServicer(call_data_service_pb2_grpc.CallDataServiceServicer):
    def __init__(self, service: CallDataService) -> None:
        self._service = service

    async def UpdateParticipantCustom(
        self, request: call_data_service_pb2.UpdateParticipantCustomRequest, context: Context
    ) -> call_data_service_pb2.UpdateParticipantCustomResponse:
        result = await self._service.update_participant_custom(
            request.type, request.id, request.participant_session_id, request.user_id, _change(request)
        )
        return call_data_service_pb2.UpdateParticipantCustomResponse(
            participant=participant_message(result.participant, result.at)
        )

    async def UpdateSessionCustom(
        self, request: call_data_service_pb2.UpdateSessionCustomRequest, context: Context
    ) -> call_data_service_pb2.UpdateSessionCustomResponse:
        result = await self._service.update_session_custom(
            request.type, request.id, request.user_id, _change(request)
        )
        return call_data_service_pb2.UpdateSessionCustomResponse(
            session=session_message(result.session, result.participants, result.at)
        )

    async def SendCallEvent(
        self, request: call_data_service_pb2.SendCallEventRequest, context: Context
    ) -> call_data_service_pb2.SendCallEventResponse:
        sent = await self._service.send_event(
            request.type,
            request.id,
            request.user_id,
            struct_to_dict(request.custom, "custom"),
            list(request.to_user_ids),
            list(request.to_roles),
            request.request_id,
        )
        return call_data_service_pb2.SendCallEventResponse(seq=sent.seq, duplicate=sent.duplicate)

    async def PinParticipant(
        self, request: call_data_service_pb2.PinParticipantRequest, context: Context
    ) -> call_data_service_pb2.PinParticipantResponse:
        pins = await self._service.pin(
            request.type, request.id, request.participant_session_id, request.user_id
        )
        return call_data_service_pb2.PinParticipantResponse(pins=pin_messages(pins))

    async def UnpinParticipant(
        self, request: call_data_service_pb2.UnpinParticipantRequest, context: Context
    ) -> call_data_service_pb2.UnpinParticipantResponse:
        pins = await self._service.unpin(
            request.type, request.id, request.participant_session_id, request.user_id
        )
        return call_data_service_pb2.UnpinParticipantResponse(pins=pin_messages(pins))
