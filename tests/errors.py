"""Assertions on Callplane's error contract: a gRPC status code plus google.rpc details (ErrorInfo with
domain "callplane" and an UPPER_SNAKE reason, BadRequest field violations naming request paths)."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "callplane"


@dataclass
class ErrorDetails:
    """The decoded details of one failed call."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None
    violations: list[error_details_pb2.BadRequest.FieldViolation] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return self.info.reason if self.info else ""

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.info.metadata) if self.info else {}

    @property
    def fields(self) -> list[str]:
        return [violation.field for violation in self.violations]


def decode(error: grpc.aio.AioRpcError) -> ErrorDetails:
    status = rpc_status.from_call(error)
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(bad_request.field_violations)
    return ErrorDetails(error.code(), error.details() or "", info, violations)


async def expect_error(
    awaitable: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str | None = None,
    fields: Iterable[str] | None = None,
) -> ErrorDetails:
    """Awaits a stub call that must fail with `code`; checks the ErrorInfo (domain "callplane", `reason`
    when given) and that the BadRequest violations include every path in `fields`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    details = decode(caught.value)
    assert details.code == code, f"expected {code.name}, got {details.code.name}: {details.message}"
    assert details.info is not None, f"no ErrorInfo detail in {details.code.name}: {details.message}"
    assert details.info.domain == DOMAIN, details.info
    assert details.reason, "ErrorInfo.reason is empty"
    assert details.reason == details.reason.upper(), details.reason
    if reason is not None:
        assert details.reason == reason, f"expected reason {reason}, got {details.reason}: {details.message}"
    if fields is not None:
        wanted = list(fields)
        missing = [path for path in wanted if path not in details.fields]
        assert not missing, f"field violations {details.fields} lack {missing} ({details.message})"
        if wanted:
            assert details.violations, "expected BadRequest field violations"
    return details
