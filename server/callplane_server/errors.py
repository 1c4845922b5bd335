"""Domain errors. Each maps to one gRPC status code in the API layer; `reason` is UPPER_SNAKE."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: a dotted path into the request and what is wrong with it."""

    field: str
    description: str


class CallplaneError(Exception):
    """Base of every error a client may see. Never raised directly."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, object] | None = None,
        field_violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}
        self.field_violations = list(field_violations or [])


class InvalidArgument(CallplaneError):
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def for_field(
        cls, field_path: str, description: str, *, reason: str = "INVALID_ARGUMENT"
    ) -> InvalidArgument:
        return cls(
            f"{field_path}: {description}",
            reason=reason,
            metadata={"field": field_path},
            field_violations=[FieldViolation(field_path, description)],
        )


class NotFound(CallplaneError):
    default_reason = "NOT_FOUND"


class AlreadyExists(CallplaneError):
    default_reason = "ALREADY_EXISTS"


class Aborted(CallplaneError):
    default_reason = "ABORTED"


class FailedPrecondition(CallplaneError):
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(CallplaneError):
    default_reason = "OUT_OF_RANGE"


class Unauthenticated(CallplaneError):
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(CallplaneError):
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(CallplaneError):
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(CallplaneError):
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(CallplaneError):
    """The caller's deadline passed (or it went away) before the work was done; nothing was changed."""

    default_reason = "DEADLINE_EXCEEDED"


# Violations spelled out in an error's message; the BadRequest details carry all of them.
_LISTED_VIOLATIONS = 5


@dataclass
class ViolationCollector:
    """Gathers every problem in a request so one error names them all."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.violations.append(FieldViolation(field_path, description))

    def raise_if_any(self, message: str = "invalid request", *, reason: str = "INVALID_ARGUMENT") -> None:
        error = self.error(message, reason=reason)
        if error is not None:
            raise error

    def error(
        self, message: str = "invalid request", *, reason: str = "INVALID_ARGUMENT"
    ) -> InvalidArgument | None:
        """InvalidArgument naming every violation (None if there is none): one is the message
        (`field: why`), several follow `message` (`invalid request: type: why; id: why`), the first few
        spelled out."""
        if not self.violations:
            return None
        listed = "; ".join(f"{v.field}: {v.description}" for v in self.violations[:_LISTED_VIOLATIONS])
        if len(self.violations) == 1:
            message = listed
        else:
            more = len(self.violations) - _LISTED_VIOLATIONS
            message = f"{message}: {listed}" + (f"; and {more} more" if more > 0 else "")
        return InvalidArgument(
            message,
            reason=reason,
            metadata={"fields": ",".join(v.field for v in self.violations)},
            field_violations=self.violations,
        )
