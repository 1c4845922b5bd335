"""CallDataService servicer."""

from __future__ import annotations

from callplane.v1 import call_data_service_pb2_grpc
from callplane_server.services.call_data import CallDataService


class CallDataServicer(call_data_service_pb2_grpc.CallDataServiceServicer):
    def __init__(self, service: CallDataService) -> None:
        self._service = service
