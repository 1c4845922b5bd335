"""RingService servicer."""

from __future__ import annotations

from callplane.v1 import ring_service_pb2_grpc
from callplane_server.services.ringing import RingingService


class RingServicer(ring_service_pb2_grpc.RingServiceServicer):
    def __init__(self, service: RingingService) -> None:
        self._service = service
