"""The one exception type the client raises for a failed RPC."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["CallplaneError"]


class CallplaneError(Exception):
    """A failed RPC, with the server's `google.rpc.Status` details unpacked.

    `code` is the gRPC status code, `reason`/`domain`/`metadata` come from `google.rpc.ErrorInfo`
    (empty when the server sent none) and `field_violations` from `google.rpc.BadRequest`.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        #: The raw `google.rpc.Status`, if the server sent one.
        self.status = status

    @property
    def retryable(self) -> bool:
        """True when retrying the same request may succeed (UNAVAILABLE)."""
        return self.code == grpc.StatusCode.UNAVAILABLE

    @property
    def fields(self) -> list[str]:
        """The field paths named in `field_violations`."""
        return [path for path, _ in self.field_violations]

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> CallplaneError:
        """Build from a `grpc.aio.AioRpcError` (or any `grpc.Call`-like RpcError)."""
        code: grpc.StatusCode = _safe(err, "code") or grpc.StatusCode.UNKNOWN
        message: str = _safe(err, "details") or ""
        status: status_pb2.Status | None = None
        try:
            # arg-type: typed for a grpc.Call; the RpcErrors grpc raises (AioRpcError too) have the code,
            # details and trailing metadata it reads, and anything else fails below.
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            status = None
        reason = domain = ""
        metadata: dict[str, str] = {}
        violations: list[tuple[str, str]] = []
        if status is not None:
            message = status.message or message
            for detail in status.details:
                # arg-type (twice): the stubs type a message's DESCRIPTOR more widely than Any.Is's parameter.
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):  # type: ignore[arg-type]
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, domain = info.reason, info.domain
                    metadata = dict(info.metadata)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):  # type: ignore[arg-type]
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations.extend((v.field, v.description) for v in bad.field_violations)
        return cls(
            code,
            message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            field_violations=violations,
            status=status,
        )


def _safe(err: Any, attr: str) -> Any:
    method = getattr(err, attr, None)
    if method is None:
        return None
    try:
        return method()
    except Exception:
        return None
