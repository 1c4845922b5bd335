"""OpenTelemetry tracing against a real server, its spans kept by an in-memory exporter: a SERVER span per
RPC naming the call and the caller (never the token or custom data), transaction and statement spans
beneath it, and a client's `traceparent` (sent by hand or by the Python client) as its parent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callplane import CallplaneClient
from callplane.v1 import call_service_pb2, call_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from callplane_server import tracing
from tests.support import SERVER_TOKEN, RunningServer, channel, eventually, running_server, struct, user_token

SECRET_VALUE = "do-not-trace-this-value"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced(
    backend: str, tmp_path_factory: pytest.TempPathFactory, exporter: InMemorySpanExporter
) -> AsyncIterator[RunningServer]:
    provider = tracing.provider([SimpleSpanProcessor(exporter)])
    async with running_server(backend, tmp_path_factory.mktemp(backend), tracer_provider=provider) as running:
        yield running


def _server_spans(exporter: InMemorySpanExporter, method: str) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.kind is trace.SpanKind.SERVER and span.name == method
    ]


def _descendants(exporter: InMemorySpanExporter, root: ReadableSpan) -> list[ReadableSpan]:
    """The spans below `root` in its trace (following parents)."""
    assert root.context is not None
    spans = [
        s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == root.context.trace_id
    ]
    below: list[ReadableSpan] = []
    frontier = {root.context.span_id}
    while frontier:
        found = [s for s in spans if s.parent is not None and s.parent.span_id in frontier and s not in below]
        below.extend(found)
        frontier = {s.context.span_id for s in found if s.context is not None}
    return below


def _values(span: ReadableSpan) -> Iterator[str]:
    yield span.name
    for value in (span.attributes or {}).values():
        yield str(value)


async def test_a_server_span_per_rpc_with_cid_caller_and_database_children(
    traced: RunningServer, exporter: InMemorySpanExporter, unique: Callable[[str], str]
) -> None:
    call_id = unique("traced")
    calls = call_service_pb2_grpc.CallServiceStub(traced.channel)
    exporter.clear()
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default", id=call_id, data=call_service_pb2.CallData(custom=struct({"note": SECRET_VALUE}))
        )
    )
    [span] = _server_spans(exporter, "callplane.v1.CallService/GetOrCreateCall")
    attributes = dict(span.attributes or {})
    assert attributes["callplane.cid"] == f"default:{call_id}"
    assert attributes["callplane.caller"] == "server"
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "callplane.v1.CallService"
    assert attributes["rpc.method"] == "GetOrCreateCall"
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert span.parent is None  # no traceparent sent: the RPC starts its trace

    below = _descendants(exporter, span)
    transactions = [s for s in below if s.name == "transaction"]
    assert any((s.attributes or {}).get("callplane.transaction.write") for s in transactions), below
    statements = [s for s in below if s.kind is trace.SpanKind.CLIENT and s.name.split()[0] == "INSERT"]
    assert statements, [s.name for s in below]
    assert all(s.instrumentation_scope and "sqlalchemy" in s.instrumentation_scope.name for s in statements)

    # Neither the token nor the call's custom data is in any span of the trace.
    for traced_span in [span, *below]:
        for value in _values(traced_span):
            assert SECRET_VALUE not in value
            assert SERVER_TOKEN not in value


async def test_the_callers_user_and_a_refusal_are_in_the_span(
    traced: RunningServer, exporter: InMemorySpanExporter, unique: Callable[[str], str]
) -> None:
    user = unique("tracer")
    token = user_token(user)
    exporter.clear()
    as_user = channel(traced.target, token=token)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call_service_pb2_grpc.CallServiceStub(as_user).GetCall(
                call_service_pb2.GetCallRequest(type="default", id=unique("missing"))
            )
    finally:
        await as_user.close()
    [span] = _server_spans(exporter, "callplane.v1.CallService/GetCall")
    attributes = dict(span.attributes or {})
    code = refused.value.code()
    assert attributes["rpc.grpc.status_code"] == code.value[0]
    assert attributes["callplane.caller"] == user
    assert attributes["enduser.id"] == user
    # An answer about the request, not a failure of the server: the span's status stays unset.
    assert span.status.status_code is trace.StatusCode.UNSET
    assert all(token not in value for value in _values(span))


async def test_a_client_traceparent_becomes_the_parent(
    traced: RunningServer, exporter: InMemorySpanExporter, unique: Callable[[str], str]
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    calls = call_service_pb2_grpc.CallServiceStub(traced.channel)
    exporter.clear()
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(type="default", id=unique("parented")),
        metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")],
    )
    [span] = _server_spans(exporter, "callplane.v1.CallService/GetOrCreateCall")
    assert span.context is not None and span.parent is not None
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == parent_id
    assert span.parent.is_remote
    assert _descendants(exporter, span), "the database spans join the client's trace"


async def test_the_python_client_propagates_its_context(
    traced: RunningServer, exporter: InMemorySpanExporter, unique: Callable[[str], str]
) -> None:
    client_spans = InMemorySpanExporter()
    client_provider = TracerProvider()
    client_provider.add_span_processor(SimpleSpanProcessor(client_spans))
    tracer = client_provider.get_tracer("test-client")
    exporter.clear()
    async with CallplaneClient(traced.target, token=SERVER_TOKEN) as client:
        with tracer.start_as_current_span("client operation") as operation:
            await client.call("default", unique("client")).get_or_create()
            await client.call("default", unique("client-2")).get_or_create()
        await client.call("default", unique("client-3")).get_or_create()  # outside: a trace of its own
    spans = _server_spans(exporter, "callplane.v1.CallService/GetOrCreateCall")
    assert len(spans) == 3
    inside = [s for s in spans if s.parent is not None]
    assert len(inside) == 2
    for span in inside:
        assert span.context is not None and span.parent is not None
        assert span.context.trace_id == operation.get_span_context().trace_id
        assert span.parent.span_id == operation.get_span_context().span_id


async def test_a_stream_has_its_span_too(
    traced: RunningServer, exporter: InMemorySpanExporter, unique: Callable[[str], str]
) -> None:
    call_id = unique("watched")
    calls = call_service_pb2_grpc.CallServiceStub(traced.channel)
    await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
    exporter.clear()
    events = event_service_pb2_grpc.EventServiceStub(traced.channel)
    stream = events.WatchCall(event_service_pb2.WatchCallRequest(type="default", id=call_id, snapshot=True))
    message = await stream.read()
    assert message.WhichOneof("message") == "snapshot"
    stream.cancel()

    async def ended() -> bool:
        return bool(_server_spans(exporter, "callplane.v1.EventService/WatchCall"))

    await eventually(ended)
    [span] = _server_spans(exporter, "callplane.v1.EventService/WatchCall")
    assert (span.attributes or {})["callplane.cid"] == f"default:{call_id}"
    assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert any(s.name == "transaction" for s in _descendants(exporter, span)), "the snapshot's read"


def test_tracing_is_off_without_otel_variables() -> None:
    assert tracing.from_environment({}) is None
    assert (
        tracing.from_environment(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}
        )
        is None
    )
    assert tracing.from_environment({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing.exporters_named({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == ["otlp"]
    assert tracing.exporters_named({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]


async def test_statements_outside_any_rpc_start_no_trace(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    """Background work (here the timer runner's look for due timers, run by the test outside any span)
    runs statements, whose spans are not sampled: no trace of their own several times a second."""
    exporter.clear()
    assert not trace.get_current_span().get_span_context().is_valid
    await traced.server.timers.run_due()  # type: ignore[union-attr]
    assert [s for s in exporter.get_finished_spans() if s.parent is None] == []


async def test_without_a_tracer_provider_nothing_is_installed(server: RunningServer) -> None:
    assert server.server.tracing is None
    assert server.server.store is not None and server.server.store.database.tracer is None
    for engine in server.server.store.database.engines.values():
        # No statement listeners of OpenTelemetry's on the engines (the SQLite inline path checks these).
        assert not engine.sync_engine.dispatch.after_cursor_execute
