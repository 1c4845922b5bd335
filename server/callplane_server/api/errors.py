"""Turns every failure into a google.rpc.Status with ErrorInfo (and BadRequest for validation), and logs
one line per RPC. A domain error never reaches a client as UNKNOWN."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from callplane_server import errors
from callplane_server.api.metrics import RpcMetrics
from callplane_server.api.request_checks import check_request
from callplane_server.auth.context import set_principal
from callplane_server.auth.tokens import TokenVerifier, parse_bearer

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
MAX_VIOLATION_FIELD_BYTES = 96
MAX_VIOLATION_DESCRIPTION_BYTES = 160


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
    details = [info]
    message = error.message
    if error.field_violations:
        shown = error.field_violations[:MAX_VIOLATIONS]
        if len(error.field_violations) > len(shown):
            message = f"{message} ({len(error.field_violations)} problems, the first {len(shown)} in details)"
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=cap(v.field, MAX_VIOLATION_FIELD_BYTES),
                        description=cap(v.description, MAX_VIOLATION_DESCRIPTION_BYTES),
                    )
                    for v in shown
                ]
            )
        )
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

    def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if method.startswith(_OPEN_PREFIXES):
            return
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
        set_principal(self._tokens.verify(parse_bearer(authorization)))


class RpcWrapper:
    """Wraps every method handler: authentication first, domain errors → status with details, unexpected
    ones → INTERNAL, and a log line and metrics with method, status code and duration."""

    def __init__(self, authenticator: Authenticator, metrics: RpcMetrics | None = None) -> None:
        self._authenticator = authenticator
        self._metrics = metrics or RpcMetrics()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, "unary", handler.unary_unary, self._authenticator, self._metrics),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            wrapped = (
                _wrap_stream(method, behavior, self._authenticator, self._metrics)
                if inspect.isasyncgenfunction(behavior)
                # Handlers using context.write().
                else _wrap_unary(method, "server_stream", behavior, self._authenticator, self._metrics)
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=_passing_bytes(handler.response_serializer),
            )
        return handler


class WrappingRegistrar:
    """Stands in for the grpc.aio.Server while the generated `add_*Servicer_to_server` functions (and
    health, reflection) register: each method handler is wrapped once, here, rather than on every RPC
    as a ServerInterceptor would (which costs a coroutine and new handler objects per call)."""

    def __init__(self, server: grpc.aio.Server, wrapper: RpcWrapper) -> None:
        self._server = server
        self._wrapper = wrapper

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrapper.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(handler, self._wrapper) for handler in generic_handlers)
        )


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: RpcWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrapper.wrap(method, handler)
        return wrapped


def _passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """Stream handlers may yield a message already serialized (one event fanned out to many watchers is
    serialized once), which goes on the wire as is."""
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _finish(
    method: str, kind: str, context: grpc.aio.ServicerContext, started: float, metrics: RpcMetrics
) -> None:
    code = context.code()
    if code is None:
        name = "OK"
    elif isinstance(code, int):  # code() may hand back the raw integer
        name = _CODE_NAMES.get(code, "UNKNOWN")
    else:
        name = code.name
    seconds = time.perf_counter() - started
    metrics.handled(method, kind, name, seconds)
    log.info("rpc %s %s %.1fms", method, name, seconds * 1000)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    await context.abort_with_status(to_rpc_status(_classify(error)))


def _wrap_unary(
    method: str,
    kind: str,
    behavior: Callable[..., Awaitable[Any]],
    authenticator: Authenticator,
    metrics: RpcMetrics,
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            authenticator.authenticate(method, context)
            check_request(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)
        finally:
            _finish(method, kind, context, started, metrics)

    return wrapper


def _wrap_stream(
    method: str,
    behavior: Callable[..., AsyncIterator[Any]],
    authenticator: Authenticator,
    metrics: RpcMetrics,
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            authenticator.authenticate(method, context)
            check_request(request)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)
        finally:
            _finish(method, "server_stream", context, started, metrics)

    return wrapper
