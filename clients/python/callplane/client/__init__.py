"""Ergonomic asyncio client over the generated `callplane.v1` stubs: dicts in, dataclasses out."""

from callplane.client.call import Call
from callplane.client.client import DEFAULT_TIMEOUT, CallplaneClient, TokenProvider
from callplane.client.convert import (
    dict_to_struct,
    from_timestamp,
    settings_to_dict,
    struct_to_dict,
    to_plain,
    to_settings,
    to_sort_params,
    to_timestamp,
)
from callplane.client.custom import CustomData, from_plain
from callplane.client.errors import CallplaneError
from callplane.client.models import (
    CallInfo,
    CallState,
    CallTypeInfo,
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
    "TokenProvider",
    "UserInfo",
    "dict_to_struct",
    "from_plain",
    "from_timestamp",
    "settings_to_dict",
    "struct_to_dict",
    "to_plain",
    "to_settings",
    "to_sort_params",
    "to_timestamp",
]
