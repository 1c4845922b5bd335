"""The transport's own limit: a bare grpc.aio server answering each measured unary method with a fixed reply
(the bytes of a real reply Callplane gave in the same run, so the same proto types and size), with no
database, authentication or interceptors, on the same event loop Callplane runs on. It parses each request
and serializes each reply as a generated servicer does. Its EventService/WatchCall sends one progress
message and then holds the stream open, which gives the memory floor of an idle server stream.

    python -m tests.bench.reference_server --listen 127.0.0.1:50099 --replies replies.json

`replies.json` maps full method names (`/callplane.v1.CallService/GetCall`) to base64 replies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2_grpc

# Imported for their descriptors: every service a measured method may belong to.
from callplane.v1 import (  # noqa: F401
    call_data_service_pb2,
    call_service_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    session_service_pb2,
)
from callplane_server import runtime


class ReferenceEventService(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self) -> None:
        self._forever = asyncio.Event()

    async def WatchCall(self, request, context):  # type: ignore[no-untyped-def]
        yield event_service_pb2.WatchCallResponse(progress=event_service_pb2.Progress(seq=0))
        await self._forever.wait()


def _fixed(reply: Message) -> Callable[[Any, Any], Any]:
    async def handler(request: Any, context: Any) -> Message:
        return reply

    return handler


def fixed_reply_handlers(replies: dict[str, bytes]) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service: each method parses its request type and answers `replies[method]`
    parsed as its response type (what a generated servicer's registration does)."""
    pool = descriptor_pool.Default()
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
    for method, reply in replies.items():
        service_name, _, method_name = method.strip("/").partition("/")
        descriptor = pool.FindServiceByName(service_name).methods_by_name[method_name]
        request_type = message_factory.GetMessageClass(descriptor.input_type)
        response_type = message_factory.GetMessageClass(descriptor.output_type)
        by_service[service_name][method_name] = grpc.unary_unary_rpc_method_handler(
            _fixed(response_type.FromString(reply)),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    return [grpc.method_handlers_generic_handler(name, handlers) for name, handlers in by_service.items()]


async def serve(listen: str, replies: dict[str, bytes]) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(fixed_reply_handlers(replies))
    event_service_pb2_grpc.add_EventServiceServicer_to_server(ReferenceEventService(), server)
    # Only so the driver can wait for it to be up; not on the measured path.
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"could not bind {listen}")
    await server.start()
    print(f"reference serving on {listen} ({runtime.loop_name()}): {', '.join(replies)}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--replies", required=True, type=Path, help="JSON: full method → base64 reply")
    args = parser.parse_args()
    replies = {
        method: base64.b64decode(encoded) for method, encoded in json.loads(args.replies.read_text()).items()
    }
    runtime.run(serve(args.listen, replies))


if __name__ == "__main__":
    main()
