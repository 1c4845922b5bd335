"""The transport's own limit: a bare grpc.aio server answering CallService/GetCall with a fixed
Call-shaped reply (the bytes of a real GetCallResponse, so the same proto types and size), with no
database, authentication or interceptors, on the same event loop Callplane runs on. Its
EventService/WatchCall sends one progress message and then holds the stream open, which gives the memory
floor of an idle server stream.

    python -m tests.bench.reference_server --listen 127.0.0.1:50099 --reply reply.bin
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from callplane_server import runtime


class ReferenceCallService(call_service_pb2_grpc.CallServiceServicer):
    def __init__(self, reply: call_service_pb2.GetCallResponse) -> None:
        self._reply = reply

    async def GetCall(self, request, context):  # type: ignore[no-untyped-def]
        return self._reply


class ReferenceEventService(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self) -> None:
        self._forever = asyncio.Event()

    async def WatchCall(self, request, context):  # type: ignore[no-untyped-def]
        yield event_service_pb2.WatchCallResponse(progress=event_service_pb2.Progress(seq=0))
        await self._forever.wait()


async def serve(listen: str, reply: call_service_pb2.GetCallResponse) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    call_service_pb2_grpc.add_CallServiceServicer_to_server(ReferenceCallService(reply), server)
    event_service_pb2_grpc.add_EventServiceServicer_to_server(ReferenceEventService(), server)
    # Only so the driver can wait for it to be up; not on the measured path.
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"could not bind {listen}")
    await server.start()
    print(f"reference serving on {listen} ({runtime.loop_name()})", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--reply", required=True, type=Path, help="a serialized GetCallResponse")
    args = parser.parse_args()
    reply = call_service_pb2.GetCallResponse.FromString(args.reply.read_bytes())
    runtime.run(serve(args.listen, reply))


if __name__ == "__main__":
    main()
