"""SessionService servicer."""

from __future__ import annotations

from callplane.v1 import session_service_pb2_grpc
from callplane_server.services.sessions import SessionService


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, service: SessionService) -> None:
        self._service = service
