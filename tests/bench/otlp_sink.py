"""`make bench BENCH_ARGS=--tracing`: a no-op OTLP/gRPC trace receiver the servers export their spans to,
so the figures include what tracing costs a server (spans made, batched, serialized and sent). Run as
`python -m tests.bench.otlp_sink HOST:PORT`; prints the spans it received when stopped."""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import subprocess
import sys
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.bench.servers import REPO, free_port, pinned


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    spans = 0

    async def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        _Sink.spans += sum(
            len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


async def _serve(address: str) -> None:
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Sink(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)
    print(f"OTLP sink: {_Sink.spans} spans received", flush=True)


def start(cpu: str | None) -> None:
    """Starts the sink (on `cpu`, with the load generators) and points every server the bench starts
    from now on at it (OTEL_EXPORTER_OTLP_ENDPOINT); stopped when the bench exits."""
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [*pinned(cpu), sys.executable, "-m", "tests.bench.otlp_sink", address], cwd=REPO
    )
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{address}"
    os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"

    def stop() -> None:
        process.send_signal(signal.SIGTERM)
        process.wait(10)

    atexit.register(stop)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
