"""Read-only, dict-like custom data with typed getters (`custom.get("key", MyDataclass)`)."""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import enum
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar, overload

__all__ = ["CustomData", "from_plain"]

T = TypeVar("T")
_MISSING: Any = object()


class CustomData(Mapping[str, Any]):
    """Custom data (a `google.protobuf.Struct`) as a read-only mapping of plain JSON values.

    Numbers are floats (Struct numbers are doubles); `get(key, int)` converts integral ones.
    """

    __slots__ = ("_data", "_path")

    def __init__(self, data: Mapping[str, Any] | None = None, *, path: str = "custom") -> None:
        self._data: dict[str, Any] = dict(data or {})
        self._path = path

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"CustomData({self._data!r})"

    @overload
    def get(self, key: str, type_: None = None, default: Any = None) -> Any: ...
    @overload
    def get(self, key: str, type_: type[T], default: T) -> T: ...
    @overload
    def get(self, key: str, type_: type[T], default: None = None) -> T | None: ...
    @overload
    def get(self, key: str, type_: Any, default: Any = None) -> Any: ...

    def get(self, key: str, type_: Any = None, default: Any = None) -> Any:
        """The value at `key` (a top-level key, else a dotted path), converted to `type_` if given.

        `type_` may be a dataclass (built recursively from the nested dict), `int`, `float`, `str`,
        `bool`, `datetime` (from an ISO string), an Enum, `list[X]`, `dict[str, X]`, `X | None`, ...
        Missing or null → `default`. A value that does not fit raises TypeError (wrong JSON type)
        or ValueError (right type, bad value, e.g. 1.5 for `int`).
        """
        if type_ is not None and not _is_type_like(type_):
            raise TypeError(
                f"CustomData.get: the second argument is the type to convert to, got {type_!r}; "
                "pass a fallback value as default=..."
            )
        value = self._lookup(key)
        if value is _MISSING or value is None:
            return default
        if type_ is None:
            return copy.deepcopy(value)
        return from_plain(value, type_, path=f"{self._path}.{key}")

    def _lookup(self, key: str) -> Any:
        if key in self._data:
            return self._data[key]
        if "." not in key:
            return _MISSING
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as a plain dict."""
        return copy.deepcopy(self._data)


def _is_type_like(tp: Any) -> bool:
    return isinstance(tp, type) or typing.get_origin(tp) is not None or tp is Any


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp)


def from_plain(value: Any, tp: Any, *, path: str = "value") -> Any:
    """Convert a plain JSON value (as read from a Struct) to `tp`; see `CustomData.get`."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            if type(None) in args:
                return None
            raise TypeError(f"{path}: expected {_type_name(tp)}, got null")
        errors: list[str] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_plain(value, arg, path=path)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{path}: {_describe(value)} fits none of {_type_name(tp)} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(f"{path}: expected one of {list(args)}, got {_describe(value)}")
    if value is None:
        raise TypeError(f"{path}: expected {_type_name(tp)}, got null")
    if origin is not None:
        return _from_generic(value, tp, origin, args, path)
    if not isinstance(tp, type):
        raise TypeError(f"{path}: unsupported target type {tp!r}")
    if dataclasses.is_dataclass(tp):
        return _from_dataclass(value, tp, path)
    if issubclass(tp, CustomData):
        if not isinstance(value, Mapping):
            raise TypeError(f"{path}: expected an object, got {_describe(value)}")
        return CustomData(value, path=path)
    if issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ValueError(f"{path}: {_describe(value)} is not a valid {tp.__name__}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{path}: expected bool, got {_describe(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{path}: expected int, got {_describe(value)}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{path}: expected an integral number, got {value!r}")
            return int(value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{path}: expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{path}: expected str, got {_describe(value)}")
    if tp is _dt.datetime:
        if isinstance(value, _dt.datetime):
            return value
        if not isinstance(value, str):
            raise TypeError(f"{path}: expected an ISO 8601 datetime string, got {_describe(value)}")
        try:
            return _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{path}: {value!r} is not an ISO 8601 datetime") from None
    if tp is _dt.date:
        if not isinstance(value, str):
            raise TypeError(f"{path}: expected an ISO 8601 date string, got {_describe(value)}")
        try:
            return _dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{path}: {value!r} is not an ISO 8601 date") from None
    if tp in (dict, list, tuple):
        return _from_generic(value, tp, tp, (), path)
    if isinstance(value, tp):
        return value
    raise TypeError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


def _from_generic(value: Any, tp: Any, origin: Any, args: tuple[Any, ...], path: str) -> Any:
    if origin in (list, set, frozenset, Sequence):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{path}: expected a list, got {_describe(value)}")
        item = args[0] if args else Any
        items = [from_plain(v, item, path=f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin in (list, Sequence) else origin(items)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"{path}: expected a list, got {_describe(value)}")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(from_plain(v, item, path=f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(
            from_plain(v, a, path=f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TypeError(f"{path}: expected an object, got {_describe(value)}")
        item = args[1] if len(args) == 2 else Any
        return {k: from_plain(v, item, path=f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"{path}: unsupported target type {tp!r}")


def _from_dataclass(value: Any, tp: type, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise TypeError(f"{path}: expected an object for {tp.__name__}, got {_describe(value)}")
    try:
        hints = typing.get_type_hints(tp)
    except Exception as exc:  # unresolvable forward reference
        raise TypeError(f"{path}: cannot resolve the annotations of {tp.__name__}: {exc}") from exc
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(tp):
        if not field.init:
            continue
        has_default = not (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if field.name in value:
            raw = value[field.name]
            try:
                kwargs[field.name] = from_plain(raw, hints.get(field.name, Any), path=f"{path}.{field.name}")
            except TypeError:
                if raw is not None or not has_default:
                    raise  # null for a non-optional field with a default: keep the default
        elif not has_default:
            raise TypeError(f"{path}: missing field {field.name!r} required by {tp.__name__}")
    return tp(**kwargs)
