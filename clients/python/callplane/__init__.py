"""Callplane Python client. `callplane.v1` holds the generated stubs; the names here wrap them."""

from callplane.client import (
    DEFAULT_TIMEOUT,
    Call,
    CallInfo,
    CallplaneClient,
    CallplaneError,
    CallState,
    CallTypeInfo,
    CustomData,
    MemberInfo,
    MembersUpdate,
    QueryPage,
    UserInfo,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Call",
    "CallInfo",
    "CallState",
    "CallTypeInfo",
    "CallplaneClient",
    "CallplaneError",
    "CustomData",
    "MemberInfo",
    "MembersUpdate",
    "QueryPage",
    "UserInfo",
]
