"""OpenTelemetry tracing: configured from the standard OTEL_* environment, and nothing at all when it is not.

`from_environment()` returns a TracerProvider exporting over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` is set, else None: then the server installs
no span code and no SQLAlchemy listeners (the RPC wrapper and the database check one attribute). The SDK
reads the rest itself: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG],
OTEL_EXPORTER_OTLP_* (headers, timeout, protocol...), OTEL_BSP_*, and OTEL_PROPAGATORS for `traceparent`.

Spans: one SERVER span per RPC, made by the RPC wrapper (api/errors.py) with the OTel API, its parent taken
from the client's `traceparent` metadata; an INTERNAL span per transaction (store/database.py), and one per
SQLite group commit; statement and connect spans from opentelemetry-instrumentation-sqlalchemy. The
maintained grpc.aio server interceptor (opentelemetry-instrumentation-grpc) is not used: it wraps every
server-streaming handler as an async generator, which breaks handlers that write with `context.write`
(ours: every stream, after the wrapper) with a TypeError; and it runs per RPC ahead of our one wrapper."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

#: The instrumentation scope of Callplane's own spans.
TRACER_NAME = "callplane_server"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def exporters_named(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for ([] when tracing is off)."""
    if _truthy(environ.get("OTEL_SDK_DISABLED")):
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if named:
        return [name.strip().lower() for name in named.split(",") if name.strip().lower() not in ("", "none")]
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here: use otlp, console or none")
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf")


class WithinTraces(Sampler):
    """The configured sampler, except that a CLIENT span with no parent is dropped: a statement or a
    connect of background work (the event tailer's and the timers' polls) that belongs to no RPC would
    otherwise be a trace of its own several times a second."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"WithinTraces({self._inner.get_description()})"


def resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, with service.name `callplane` when neither names it."""
    detected = Resource.create()
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        detected = detected.merge(Resource({SERVICE_NAME: "callplane"}))
    return detected


def provider(processors: Sequence[Any] = ()) -> TracerProvider:
    """A TracerProvider with the environment's sampler (OTEL_TRACES_SAMPLER), kept to traces (see
    WithinTraces), and `processors`."""
    # The sampler OTEL_TRACES_SAMPLER names, as the SDK builds it (read off a provider made for that).
    sampler = WithinTraces(TracerProvider(shutdown_on_exit=False).sampler)
    made = TracerProvider(sampler=sampler, resource=resource())
    for processor in processors:
        made.add_span_processor(processor)
    return made


def from_environment(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """The provider the OTEL_* environment asks for, or None when tracing is off (the default)."""
    env = os.environ if environ is None else environ
    names = exporters_named(env)
    if not names:
        return None
    made = provider([BatchSpanProcessor(_exporter(name, env)) for name in names])
    log.info("tracing on: exporting spans with %s", ", ".join(names))
    return made


class ServerTracing:
    """What one server traces with: its tracer, and the SQLAlchemy instrumentation of its engines (process
    wide: one traced server per process, as `callplane serve` runs)."""

    def __init__(self, tracer_provider: TracerProvider) -> None:
        self.provider = tracer_provider
        self.tracer = tracer_provider.get_tracer(TRACER_NAME)
        self._instrumented = False

    def instrument_engines(self, engines: Sequence[Any]) -> None:
        """Statement and connect spans for these (async) engines."""
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        unique = list({id(engine): engine for engine in engines}.values())
        # skip_dep_check: the package declares SQLAlchemy < 2.1, and its engine events are those of 2.1 too
        # (tests/test_tracing.py checks the statement spans).
        SQLAlchemyInstrumentor().instrument(
            engines=[engine.sync_engine for engine in unique],
            tracer_provider=self.provider,
            skip_dep_check=True,
        )
        self._instrumented = True

    def close(self) -> None:
        """Removes the statement instrumentation (whoever made the provider flushes and shuts it down)."""
        if self._instrumented:
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

            SQLAlchemyInstrumentor().uninstrument()
            self._instrumented = False


def parent_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Context:
    """The context a client sent (W3C `traceparent` / `tracestate`, baggage: OTEL_PROPAGATORS), read from
    those keys only: nothing else of the metadata (its token) is looked at."""
    fields = propagate.get_global_textmap().fields
    carrier = {key: value for key, value in metadata or () if key in fields and isinstance(value, str)}
    return propagate.extract(carrier)


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or None outside any (recorded or propagated) trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
