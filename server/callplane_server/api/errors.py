"""Turns every failure into a google.rpc.Status with ErrorInfo (and BadRequest for validation), and logs
one line per RPC. A domain error never reaches a client as UNKNOWN."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

# import-not-found: grpc ships no stubs for its Cython core, whose ExecuteBatchError is how a write to a
# client that went away fails (see _wrap_stream).
from grpc._cython.cygrpc import ExecuteBatchError  # type: ignore[import-not-found]
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from callplane_server import deadlines, errors
from callplane_server.api.metrics import RpcMetrics
from callplane_server.api.request_checks import nul_refusal
from callplane_server.auth.context import set_principal
from callplane_server.auth.tokens import Principal, TokenVerifier, parse_bearer
from callplane_server.domain.validation import MAX_CUSTOM_DEPTH
from callplane_server.services.authz import MissingRule, rule_for
from callplane_server.tracing import parent_from_metadata

log = logging.getLogger("callplane.rpc")

DOMAIN = "callplane"

_CODES: dict[type[errors.CallplaneError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code_for(error: errors.CallplaneError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


# Errors echo request values (ids, field paths, filter keys), which a client may make huge. The status
# travels in trailers, and gRPC drops a reply whose metadata passes 8 KB (soft) / 16 KB (hard): the
# client would get RESOURCE_EXHAUSTED "Stream removed" instead of the error. So every echoed text is cut
# (UTF-8 bytes; grpc-message percent-encodes, details are base64), keeping the whole reply under ~7 KB.
MAX_MESSAGE_BYTES = 256
MAX_METADATA_ENTRIES = 8
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_VALUE_BYTES = 128
MAX_VIOLATIONS = 10
# A field path is kept whole up to 256 bytes (32 levels of custom data make long ones); the violations
# shown stop at 1.5 KB in all.
MAX_VIOLATION_FIELD_BYTES = 256
MAX_VIOLATION_DESCRIPTION_BYTES = 160
MAX_VIOLATIONS_BYTES = 1536


def cap(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked with … when cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "…"


def to_rpc_status(error: errors.CallplaneError) -> grpc.Status:
    code = status_code_for(error)
    metadata = {
        cap(key, MAX_METADATA_KEY_BYTES): cap(value, MAX_METADATA_VALUE_BYTES)
        for key, value in list(error.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    details: list[error_details_pb2.ErrorInfo | error_details_pb2.BadRequest] = [info]
    message = error.message
    if error.field_violations:
        shown: list[error_details_pb2.BadRequest.FieldViolation] = []
        budget = MAX_VIOLATIONS_BYTES
        for violation in error.field_violations[:MAX_VIOLATIONS]:
            field = cap(violation.field, MAX_VIOLATION_FIELD_BYTES)
            description = cap(violation.description, MAX_VIOLATION_DESCRIPTION_BYTES)
            budget -= len(field.encode()) + len(description.encode())
            if shown and budget < 0:
                break
            shown.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
        if len(error.field_violations) > len(shown):
            message = f"{message} ({len(error.field_violations)} problems, the first {len(shown)} in details)"
        details.append(error_details_pb2.BadRequest(field_violations=shown))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=cap(message, MAX_MESSAGE_BYTES), details=packed
    )
    return rpc_status.to_status(status)


def _classify(error: BaseException) -> errors.CallplaneError:
    if isinstance(error, errors.CallplaneError):
        return error
    log.exception("unexpected error", exc_info=error)
    return errors.CallplaneError("internal error; see the server log", reason="INTERNAL")


# Health checks and reflection stay open to everyone (reflection can be switched off by config).
_OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class Authenticator:
    """Turns the `authorization` metadata of an RPC into its principal."""

    def __init__(self, secret: str) -> None:
        self._tokens = TokenVerifier(secret)

    def authenticate(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
        """Sets the RPC's principal and returns it (None: acting for nobody)."""
        if method.startswith(_OPEN_PREFIXES):
            set_principal(None)  # open to everyone, so acting for nobody
            return None
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = cast(str, value)  # only metadata keys ending in "-bin" carry bytes
        principal = self._tokens.verify(parse_bearer(authorization))
        set_principal(principal)
        return principal


class RpcWrapper:
    """Wraps every method handler: authentication first, domain errors → status with details, unexpected
    ones → INTERNAL, and a log line and metrics with method, status code and duration."""

    def __init__(
        self,
        authenticator: Authenticator,
        metrics: RpcMetrics | None = None,
        *,
        log_requests: bool = False,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._metrics = metrics or RpcMetrics()
        # None (tracing off): the wrappers make no span and read no trace context.
        self._tracer = tracer
        # Successful unary calls are nearly all of the traffic and the metrics count them: their line is
        # at DEBUG unless asked for (--log-requests); formatting and emitting it cost a few % of a write.
        self._success_level = logging.INFO if log_requests else logging.DEBUG

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(
                    method,
                    "unary",
                    handler.unary_unary,
                    self._authenticator,
                    self._metrics,
                    success_level=self._success_level,
                    tracer=self._tracer,
                ),
                request_deserializer=_tolerant(method, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            wrapped = (
                _wrap_stream(method, behavior, self._authenticator, self._metrics, tracer=self._tracer)
                if inspect.isasyncgenfunction(behavior)
                # Handlers using context.write(): coroutine functions, which grpc.aio accepts for unary_stream
                # though the stubs type it as returning an Iterator.
                else _wrap_unary(
                    method,
                    "server_stream",
                    cast("Callable[..., Awaitable[Any]]", behavior),
                    self._authenticator,
                    self._metrics,
                    tracer=self._tracer,
                )
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=_tolerant(method, handler.request_deserializer),
                response_serializer=_passing_bytes(handler.response_serializer),
            )
        if handler.stream_stream is not None:  # reflection
            return grpc.stream_stream_rpc_method_handler(
                _wrap_bidi(
                    method,
                    # The stubs type stream handlers as synchronous; asyncio servicers' are async generators.
                    cast(Callable[..., AsyncGenerator[Any, None]], handler.stream_stream),
                    self._authenticator,
                    self._metrics,
                    tracer=self._tracer,
                ),
                request_deserializer=_tolerant(method, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _require_rule(method: str) -> None:
    """Raises MissingRule unless `method` is open to everyone or has an entry in RPC_RULES: nothing is
    served unchecked."""
    if not method.startswith(_OPEN_PREFIXES):
        rule_for(method)


class WrappingRegistrar:
    """Stands in for the grpc.aio.Server while the generated `add_*Servicer_to_server` functions (and
    health, reflection) register: each method handler is wrapped once, here, rather than on every RPC
    as a ServerInterceptor would (which costs a coroutine and new handler objects per call).

    A method without an entry in RPC_RULES (services/authz.py) is refused: registering it raises
    MissingRule, so the server does not start. `methods` lists every method registered."""

    def __init__(self, server: grpc.aio.Server, wrapper: RpcWrapper) -> None:
        self._server = server
        self._wrapper = wrapper
        self.methods: list[str] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        methods = [f"/{service}/{name}" for name in handlers]
        for method in methods:
            _require_rule(method)  # a MissingRule names the method: the server does not start
        self._server.add_registered_method_handlers(
            service, {name: self._wrapper.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )
        self.methods.extend(methods)

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(handler, self._wrapper) for handler in generic_handlers)
        )


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: RpcWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            try:
                _require_rule(method)
            except MissingRule:  # never served unchecked (UNIMPLEMENTED)
                log.error("refusing to serve %s: it has no entry in RPC_RULES", method)
                return None
            wrapped = self._wrapped[method] = self._wrapper.wrap(method, handler)
        return wrapped


class _Refused:
    """Stands in for a request refused as it was decoded: bytes that did not decode, or strings holding
    NUL characters. grpc.aio decodes before any handler runs and answers a decoder's exception with UNKNOWN
    and the exception's text; handing the wrapper this marker instead lets it answer INVALID_ARGUMENT
    (after authentication) and log the RPC like any other."""

    __slots__ = ("error",)

    def __init__(self, error: errors.InvalidArgument) -> None:
        self.error = error


def _decode_problem(error: Exception) -> str:
    """What was wrong with the bytes, in the client's terms (the decoder's own text names its internals)."""
    text = str(error)
    if "UTF-8" in text:
        return "a string field is not valid UTF-8"
    if "Depth" in text or "depth" in text or isinstance(error, RecursionError):
        return f"messages nest too deeply (custom data and filters allow at most {MAX_CUSTOM_DEPTH} levels)"
    return "the bytes are not a valid protobuf encoding of the request message"


def _tolerant(method: str, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            request = deserializer(data)
            # No zero byte in the encoding: no NUL in any string (the common case costs one scan).
            refusal = nul_refusal(request) if b"\x00" in data else None
            return request if refusal is None else _Refused(refusal)
        # DecodeError from protobuf; any exception a decoder raises here comes from the client's bytes.
        except Exception as error:
            problem = _decode_problem(error)
            return _Refused(
                errors.InvalidArgument(
                    f"the request could not be decoded: {problem}",
                    reason="MALFORMED_REQUEST",
                    metadata={"method": method},
                )
            )

    return deserialize


def _passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """Stream handlers may yield a message already serialized (one event fanned out to many watchers is
    serialized once), which goes on the wire as is."""
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_CODE_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}


#: A client cancel this close to the call's deadline is logged as the deadline passing.
DEADLINE_CANCEL_SLACK_SECONDS = 0.1

# How a request names its call, by message type: "call_cid", "type+id", or "" (none).
_CID_FIELDS: dict[type, str] = {}
#: Longest cid put in a span or a log line (a request not yet validated may carry a huge one).
MAX_LOGGED_CID_BYTES = 160


def request_cid(request: Any) -> str:
    """The call a request is about (`type:id`, or its `call_cid`), "" when it names none."""
    kind = _CID_FIELDS.get(type(request))
    if kind is None:
        fields = getattr(getattr(type(request), "DESCRIPTOR", None), "fields_by_name", {})
        kind = (
            "call_cid" if "call_cid" in fields else "type+id" if "type" in fields and "id" in fields else ""
        )
        _CID_FIELDS[type(request)] = kind
    if kind == "type+id":
        cid = f"{request.type}:{request.id}" if request.id else ""
    elif kind == "call_cid":
        cid = request.call_cid
    else:
        return ""
    return cap(cid, MAX_LOGGED_CID_BYTES)


def caller_name(principal: Principal | None) -> str | None:
    """Who called, for logs and spans: a user id, "server" for a server token, None for nobody."""
    if principal is None:
        return None
    return "server" if principal.is_server else principal.user_id


def _finish(
    method: str,
    kind: str,
    context: grpc.aio.ServicerContext[Any, Any],
    started: float,
    metrics: RpcMetrics,
    *,
    cancelled: bool = False,
    success_level: int = logging.INFO,
    request: Any = None,
    principal: Principal | None = None,
) -> str:
    """Counts and logs the RPC; returns its status code's name."""
    code = context.code()
    if cancelled:
        # The client went away (or its deadline passed): it saw no status from us. The client's own
        # timer cancels the call the request's transit time before ours expires (more when this server
        # is busy), so a cancel that close to the deadline is the deadline.
        deadline = deadlines.current_deadline()
        near = None if deadline is None else deadline - DEADLINE_CANCEL_SLACK_SECONDS
        name = "DEADLINE_EXCEEDED" if deadlines.passed(near) else "CANCELLED"
    elif code is None:
        name = "OK"
    elif isinstance(code, int):  # code() may hand back the raw integer
        name = _CODE_NAMES.get(code, "UNKNOWN")
    else:
        name = code.name
    seconds = time.perf_counter() - started
    metrics.handled(method, kind, name, seconds)
    level = success_level if name == "OK" else logging.INFO
    if log.isEnabledFor(level):
        # `rpc`: the fields of a structured (--log-format json) line; the text line is the message.
        fields = {
            "method": method,
            "code": name,
            "duration_ms": round(seconds * 1000, 3),
            "cid": request_cid(request) or None,
            "user": caller_name(principal),
        }
        log.log(level, "rpc %s %s %.1fms", method, name, seconds * 1000, extra={"rpc": fields})
    return name


# gRPC server spans are errors for these codes only (OpenTelemetry's semantic conventions for RPC): the
# others are answers about the request, not failures of the server.
_SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def _open_span(
    tracer: trace.Tracer, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any
) -> tuple[trace.Span, object]:
    """A SERVER span for the RPC, made current; its parent is the client's `traceparent`, if any."""
    service, _, name = method[1:].partition("/")
    attributes: dict[str, str] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    cid = request_cid(request)
    if cid:
        attributes["callplane.cid"] = cid
    parent = parent_from_metadata(context.invocation_metadata())
    span = tracer.start_span(method[1:], context=parent, kind=SpanKind.SERVER, attributes=attributes)
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _close_span(span: trace.Span, token: object, code: str, principal: Principal | None) -> None:
    """Ends the RPC's span with its status code and caller (never its token or its data)."""
    caller = caller_name(principal)
    if caller is not None:
        span.set_attribute("callplane.caller", caller)
        if principal is not None and not principal.is_server:
            span.set_attribute("enduser.id", caller)
    span.set_attribute("rpc.grpc.status_code", _CODE_NUMBERS.get(code, 2))
    if code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    await context.abort_with_status(to_rpc_status(_classify(error)))


def _wrap_unary(
    method: str,
    kind: str,
    behavior: Callable[..., Awaitable[Any]],
    authenticator: Authenticator,
    metrics: RpcMetrics,
    *,
    success_level: int = logging.INFO,
    tracer: trace.Tracer | None = None,
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        deadlines.set_deadline(context.time_remaining())
        span = None if tracer is None else _open_span(tracer, method, context, request)
        cancelled = False
        principal = None
        try:
            principal = authenticator.authenticate(method, context)
            if type(request) is _Refused:
                raise request.error
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:  # grpc.aio cancels the handler when the client goes away
            cancelled = True
            raise
        except Exception as error:
            await _abort(context, error)
        finally:
            code = _finish(
                method,
                kind,
                context,
                started,
                metrics,
                cancelled=cancelled,
                success_level=success_level,
                request=request,
                principal=principal,
            )
            if span is not None:
                _close_span(*span, code, principal)

    return wrapper


def _wrap_stream(
    method: str,
    behavior: Callable[..., AsyncGenerator[Any, None]],
    authenticator: Authenticator,
    metrics: RpcMetrics,
    kind: str = "server_stream",
    *,
    tracer: trace.Tracer | None = None,
) -> Callable[..., Awaitable[None]]:
    """Runs a generator handler and writes what it yields with context.write, so that a write failing
    because the client went away (grpc's ExecuteBatchError, which grpc.aio logs at ERROR with a traceback
    when it gets it before noticing the cancellation: a stalled stream the client cancels) ends the RPC
    as cancelled instead: grpc's one DEBUG line and our CANCELLED line."""

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        started = time.perf_counter()
        deadlines.set_deadline(context.time_remaining())
        span = None if tracer is None else _open_span(tracer, method, context, request)
        cancelled = False
        principal = None
        responses: AsyncGenerator[Any, None] | None = None
        closed = metrics.stream_opened(method)
        try:
            principal = authenticator.authenticate(method, context)
            if type(request) is _Refused:
                raise request.error
            responses = behavior(request, context)
            async for response in responses:
                try:
                    await context.write(response)
                except ExecuteBatchError:
                    raise asyncio.CancelledError from None
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            cancelled = True
            raise
        except Exception as error:
            await _abort(context, error)
        finally:
            try:
                if responses is not None:
                    await responses.aclose()  # the handler's cleanup runs now, not when collected
            finally:
                closed()
                code = _finish(
                    method,
                    kind,
                    context,
                    started,
                    metrics,
                    cancelled=cancelled,
                    request=request,
                    principal=principal,
                )
                if span is not None:
                    _close_span(*span, code, principal)

    return wrapper


def _wrap_bidi(
    method: str,
    behavior: Callable[..., AsyncGenerator[Any, None]],
    authenticator: Authenticator,
    metrics: RpcMetrics,
    *,
    tracer: trace.Tracer | None = None,
) -> Callable[..., Awaitable[None]]:
    """A client-and-server streaming handler (reflection) wrapped like a server stream, its requests
    checked as they arrive."""

    async def screened(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[Any]:
        async def decoded() -> AsyncGenerator[Any]:
            async for request in requests:
                if type(request) is _Refused:
                    raise request.error
                yield request

        async for response in behavior(decoded(), context):
            yield response

    return _wrap_stream(method, screened, authenticator, metrics, kind="bidi_stream", tracer=tracer)
