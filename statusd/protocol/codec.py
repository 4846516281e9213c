"""The one cattrs converter between wire JSON and statusd's attrs values.

Pure. Structuring is strict, as a wire format must be: no ``"5"`` for an int, no ``1`` for
a string, no extra keys. Any failure becomes ``InvalidParams`` naming the field by its
path (``items[2].url``), so a -32602 answer always tells the caller what to fix.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

from statusd.errors import InvalidParams

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)


class _Problem(Exception):
    """A type mismatch found by a strict hook; the converter adds where it happened."""


def _strict(expected: type, description: str) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        # bool is a subclass of int; a JSON true is never a count.
        if isinstance(value, bool) and expected is not bool:
            raise _Problem(f"must be {description}, not a boolean")
        if isinstance(value, expected):
            return value
        raise _Problem(f"must be {description}, not {_describe(value)}")

    return hook


# Every count, id and size statusd takes fits in 64 bits; a bigger integer (JSON has no
# limit, Python neither) would only fail later, deeper and less clearly.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def _structure_int(value: Any, _type: Any) -> int:
    number: int = _strict(int, "an integer")(value, _type)
    if not INT_MIN <= number <= INT_MAX:
        raise _Problem(f"must fit in 64 bits, not {_describe(number)}")
    return number


converter.register_structure_hook(str, _strict(str, "a string"))
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(bool, _strict(bool, "a boolean"))


def _structure_float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Problem(f"must be a number, not {_describe(value)}")
    return float(value)


converter.register_structure_hook(float, _structure_float)


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Literal


def _structure_literal(value: Any, tp: Any) -> Any:
    choices = typing.get_args(tp)
    if value in choices and type(value) in {type(c) for c in choices}:
        return value
    listed = ", ".join(str(c) for c in choices)
    raise _Problem(f"must be one of {listed}, not {_describe(value)}")


converter.register_structure_hook_func(_is_literal, _structure_literal)


def _structure_enum(value: Any, tp: type[enum.Enum]) -> Any:
    try:
        return tp(value)
    except ValueError:
        listed = ", ".join(str(m.value) for m in tp)
        raise _Problem(f"must be one of {listed}, not {_describe(value)}") from None


# By class, not by predicate: a StrEnum is also a str, and the str hook must not win.
converter.register_structure_hook(enum.Enum, _structure_enum)
converter.register_structure_hook(enum.StrEnum, _structure_enum)
converter.register_unstructure_hook_func(
    lambda tp: isinstance(tp, type) and issubclass(tp, enum.Enum), lambda member: member.value
)


class _AtIndex(Exception):
    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, Sequence) or tp in (list, tuple)


def _list_hook_factory(tp: Any, conv: cattrs.Converter) -> Any:
    args = typing.get_args(tp)
    element = args[0] if args else Any
    element_hook = conv.get_structure_hook(element)
    container = tuple if typing.get_origin(tp) is tuple or tp is tuple else list

    def hook(value: Any, _type: Any) -> Any:
        # A JSON string is iterable and would otherwise structure as a list of characters.
        if not isinstance(value, list):
            raise _Problem(f"must be an array, not {_describe(value)}")
        items = []
        for index, item in enumerate(value):
            try:
                items.append(element_hook(item, element))
            except Exception as exc:
                raise _AtIndex(index, exc) from None
        return container(items)

    return hook


def _attrs_hook_factory(tp: Any, conv: cattrs.Converter) -> Any:
    inner = make_dict_structure_fn(tp, conv, _cattrs_forbid_extra_keys=True)

    def hook(value: Any, _type: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Problem(f"must be an object, not {_describe(value)}")
        return inner(value, tp)

    return hook


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_literal(tp):
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if _is_list(tp):
        return "an array"
    if attrs.has(tp):
        return "an object"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


_TYPE_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    float: "a number",
}


def _union_hook_factory(tp: Any, conv: cattrs.Converter) -> Any:
    members = [m for m in typing.get_args(tp) if m is not type(None)]
    nullable = len(members) < len(typing.get_args(tp))
    hooks = [(m, conv.get_structure_hook(m)) for m in members]

    def hook(value: Any, _type: Any) -> Any:
        if value is None and nullable:
            return None
        if len(hooks) == 1:
            member, member_hook = hooks[0]
            return member_hook(value, member)
        for member, member_hook in hooks:
            try:
                return member_hook(value, member)
            except Exception:
                continue
        wanted = " or ".join(_type_name(m) for m in members)
        raise _Problem(f"must be {wanted}, not {_describe(value)}")

    return hook


converter.register_structure_hook_factory(_is_union, _union_hook_factory)
converter.register_structure_hook_factory(_is_list, _list_hook_factory)
converter.register_structure_hook_factory(attrs.has, _attrs_hook_factory)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-11-23T10:30:00.123Z``."""
    # isoformat is C code; strftime plus an f-string cost several times more per message.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


converter.register_unstructure_hook(datetime, format_timestamp)
converter.register_structure_hook(datetime, lambda value, _t: parse_timestamp(value))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        shown = repr(value)
        # An error message must stay short whatever was sent (a 4,000-digit number).
        return f"the number {shown if len(shown) <= 24 else shown[:21] + '...'}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return repr(shown)
    return "an array" if isinstance(value, list) else "an object"


def structure_params(params: Mapping[str, Any], cls: type[T]) -> T:
    """Turn a request's params into ``cls``, or raise ``InvalidParams`` naming the field."""
    try:
        return converter.structure(params, cls)
    except InvalidParams:
        raise
    except Exception as exc:  # cattrs reports everything as an exception group
        field, problem = _first_problem(exc, "")
        raise InvalidParams(field or "params", problem) from None


def unstructure(value: Any) -> Any:
    return converter.unstructure(value)


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _first_problem(exc: BaseException, path: str) -> tuple[str, str]:
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            return _first_problem(sub, _join(path, note.name))
        if without:
            return _first_problem(without[0], path)
    if isinstance(exc, IterableValidationError):
        with_index, without = exc.group_exceptions()
        for sub, index_note in with_index:
            return _first_problem(sub, _join(path, index_note.index))
        if without:
            return _first_problem(without[0], path)
    if isinstance(exc, _AtIndex):
        return _first_problem(exc.error, _join(path, exc.index))
    if isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(exc.extra_fields)
        return _join(path, extra[0]), "unknown field"
    if isinstance(exc, InvalidParams):
        return _join(path, exc.field) if path else exc.field, exc.problem
    if isinstance(exc, KeyError):
        return path, "is required"
    if isinstance(exc, _Problem):
        return path, str(exc)
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _first_problem(exc.exceptions[0], path)
    if isinstance(exc, TypeError | ValueError | AttributeError):
        return path, "has the wrong type or shape"
    return path, str(exc) or type(exc).__name__
