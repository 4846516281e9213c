"""The strict converter: every bad field is named by its path."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import attrs
import pytest

from statusd.errors import InvalidParams
from statusd.protocol.codec import format_timestamp, structure_params, unstructure
from statusd.state.status import Level, StatusMessage


@attrs.frozen
class Item:
    url: str
    sha256: str | None = None


@attrs.frozen
class Params:
    level: Level
    count: int = 0
    ratio: float = 1.0
    flag: bool = False
    items: list[Item] = attrs.Factory(list)
    tasks: Literal["all"] | list[str] | None = None


@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({}, "level", "is required"),
        ({"level": "loud"}, "level", "must be one of info, warning, error, success, not 'loud'"),
        ({"level": 1}, "level", "must be one of info, warning, error, success, not the number 1"),
        ({"level": "info", "count": "5"}, "count", "must be an integer, not '5'"),
        ({"level": "info", "count": True}, "count", "must be an integer, not a boolean"),
        ({"level": "info", "count": 1.5}, "count", "must be an integer, not the number 1.5"),
        ({"level": "info", "ratio": "x"}, "ratio", "must be a number, not 'x'"),
        ({"level": "info", "flag": 1}, "flag", "must be a boolean, not the number 1"),
        ({"level": "info", "items": "abc"}, "items", "must be an array, not 'abc'"),
        ({"level": "info", "items": [1]}, "items[0]", "must be an object, not the number 1"),
        ({"level": "info", "items": [{"url": "a"}, {}]}, "items[1].url", "is required"),
        ({"level": "info", "items": [{"url": "a", "x": 1}]}, "items[0].x", "unknown field"),
        ({"level": "info", "bogus": 1}, "bogus", "unknown field"),
        ({"level": "info", "tasks": "some"}, "tasks", "must be 'all' or an array, not 'some'"),
        ({"level": "info", "tasks": [1]}, "tasks", "must be 'all' or an array, not an array"),
    ],
)
def test_bad_params_name_the_field(params: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        structure_params(params, Params)
    assert caught.value.data == {"field": field, "reason": reason}


def test_good_params() -> None:
    params = structure_params(
        {"level": "success", "count": 2, "ratio": 3, "items": [{"url": "u"}], "tasks": "all"},
        Params,
    )
    assert params == Params(Level.SUCCESS, 2, 3.0, False, [Item("u")], "all")


def test_long_strings_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidParams) as caught:
        structure_params({"level": "x" * 1000}, Params)
    assert len(caught.value.message) < 120


def test_status_message_wire_shape() -> None:
    moment = datetime(2026, 11, 23, 10, 30, 0, 123456, tzinfo=UTC)
    assert format_timestamp(moment) == "2026-11-23T10:30:00.123Z"
    assert unstructure(StatusMessage(4, moment, Level.ERROR, "boom")) == {
        "seq": 4,
        "timestamp": "2026-11-23T10:30:00.123Z",
        "level": "error",
        "message": "boom",
        "operation_id": None,
        "user": None,
        "audience": "all",
    }
