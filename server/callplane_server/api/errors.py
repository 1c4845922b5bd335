"""Turns every failure into a google.rpc.Status with ErrorInfo (and BadRequest for validation), and logs
one line per RPC. A domain error never reaches a client as UNKNOWN."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from callplane_server import errors
from callplane_server.auth.context import set_principal
from callplane_server.auth.tokens import parse_bearer, verify_token

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


def to_rpc_status(error: errors.CallplaneError) -> grpc.Status:
    code = status_code_for(error)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    details = [info]
    if error.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.field_violations
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=packed)
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
        self._secret = secret

    def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if method.startswith(_OPEN_PREFIXES):
            return
        metadata = {key: value for key, value in (context.invocation_metadata() or ())}
        token = parse_bearer(metadata.get("authorization"))
        set_principal(verify_token(self._secret, token))


class ErrorAndLoggingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: authentication first, domain errors → status with details, unexpected ones
    → INTERNAL, and a log line with method, status code and duration."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, self._authenticator),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            wrapped = (
                _wrap_stream(method, behavior, self._authenticator)
                if inspect.isasyncgenfunction(behavior)
                else _wrap_unary(method, behavior, self._authenticator)  # handlers using context.write()
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _log(method: str, context: grpc.aio.ServicerContext, started: float) -> None:
    code = context.code() or grpc.StatusCode.OK
    if isinstance(code, int):  # code() may hand back the raw integer
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    log.info("rpc %s %s %.1fms", method, code.name, (time.perf_counter() - started) * 1000)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    await context.abort_with_status(to_rpc_status(_classify(error)))


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], authenticator: Authenticator
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            authenticator.authenticate(method, context)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)
        finally:
            _log(method, context, started)

    return wrapper


def _wrap_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], authenticator: Authenticator
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            authenticator.authenticate(method, context)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)
        finally:
            _log(method, context, started)

    return wrapper
