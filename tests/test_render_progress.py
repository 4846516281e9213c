"""statusctl's pure progress rendering: bars, byte counts, rates, plain update lines."""

from __future__ import annotations

import re
from typing import Any

import pytest

from statusctl import render

RUNNING: dict[str, Any] = {
    "id": "t20261126-ab12cd34",
    "name": "ubuntu-24.04.iso",
    "status": "running",
    "progress": 0.0,
    "processed_items": 0,
    "total_items": 1,
    "bytes_done": 512 << 20,
    "bytes_total": 2048 << 20,
    "current_item": "http://example.org/ubuntu-24.04.iso",
}
BAR = re.compile(r"\[(=*)(>?)( *)\]")


def bar_of(line: str) -> tuple[int, int]:
    """(filled columns, bar width) of the bar in ``line``."""
    match = BAR.search(line)
    assert match is not None, line
    filled, head, empty = match.groups()
    return len(filled), len(filled) + len(head) + len(empty)


@pytest.mark.parametrize("width", [20, 30, 40, 60, 80, 100, 120, 200])
def test_a_line_never_exceeds_the_width(width: int) -> None:
    line = render.progress_line(RUNNING, width, rate=3.5 * 2**20)
    assert len(line) <= width
    assert "25.0%" in line or width < 30


def test_wide_terminal_shows_every_field() -> None:
    line = render.progress_line(RUNNING, 200, rate=3.5 * 2**20)
    assert line == (
        "ubuntu-24.04.iso [==========>                             ]   25.0%"
        "  512.0 MiB/2.0 GiB  3.5 MiB/s  eta 7m19s"
    )


def test_fields_leave_from_the_right_as_the_terminal_narrows() -> None:
    at_80 = render.progress_line(RUNNING, 80, rate=1024.0)
    assert "1.0 KiB/s" in at_80
    assert "eta " in at_80
    at_60 = render.progress_line(RUNNING, 60, rate=1024.0)
    assert "/s" not in at_60
    assert "512.0 MiB/2.0 GiB" in at_60
    at_50 = render.progress_line(RUNNING, 50, rate=1024.0)
    assert "/s" not in at_50
    assert "MiB" not in at_50
    assert "25.0%" in at_50
    assert bar_of(at_50)[1] >= 10


def test_long_names_are_cut_not_the_bar() -> None:
    task = dict(RUNNING, name="a-very-long-file-name-" * 5)
    line = render.progress_line(task, 60)
    assert len(line) <= 60
    assert "..." in line
    assert bar_of(line)[1] >= 10


def test_too_narrow_for_a_bar_still_says_how_far() -> None:
    line = render.progress_line(RUNNING, 28)
    assert BAR.search(line) is None
    assert line == "ubuntu-24.04.iso   25.0%"


@pytest.mark.parametrize(("done", "filled"), [(0, 0), (1, 10), (2, 20), (4, 40)])
def test_the_bar_is_proportional_to_the_bytes(done: int, filled: int) -> None:
    task = dict(RUNNING, bytes_done=done << 30, bytes_total=4 << 30)
    assert bar_of(render.progress_line(task, 200)) == (filled, 40)


def test_without_a_byte_total_the_item_progress_counts() -> None:
    task = dict(RUNNING, bytes_total=None, progress=50.0, processed_items=5, total_items=10)
    line = render.progress_line(task, 100)
    assert " 50.0%" in line
    assert "5/10" in line
    assert "512.0 MiB" in line
    assert "GiB" not in line


def test_a_job_update_renders_like_a_task() -> None:
    update = {
        "type": "job_update",
        "job_id": "t1",
        "status": "progress",
        "task_status": "running",
        "progress": 30.0,
        "processed": 3,
        "total": 10,
        "bytes_done": 0,
        "bytes_total": None,
        "current_item": None,
        "message": "Processed 3 of 10",
    }
    assert (
        render.progress_line(update, 60) == "t1 [" + "=" * 12 + ">" + " " * 27 + "]   30.0%  3/10"
    )


@pytest.mark.parametrize(("status", "shown"), [("completed", "100.0%"), ("failed", "25.0%")])
def test_a_finished_task_says_so_instead_of_a_rate(status: str, shown: str) -> None:
    line = render.progress_line(dict(RUNNING, status=status), 120, rate=99.0)
    assert line.endswith(f"  {status}")
    assert shown in line
    assert "/s" not in line
    assert "example.org" not in line


def test_names_from_other_users_cannot_move_the_cursor() -> None:
    line = render.progress_line(dict(RUNNING, name="evil\x1b[2J\rname"), 120)
    assert "\x1b" not in line
    assert "\r" not in line
    assert line.startswith("evil\\x1b[2J\\rname [")


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (3 * 2**40, "3.0 TiB"),
        (2**60, "1024.0 PiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert render.format_bytes(count) == text


def test_format_rate() -> None:
    assert render.format_rate(2.5 * 2**20) == "2.5 MiB/s"


def test_plain_update_line() -> None:
    update = {
        "job_id": "t1",
        "status": "progress",
        "task_status": "running",
        "progress": 40.0,
        "processed": 4,
        "total": 10,
        "bytes_done": 2048,
        "bytes_total": None,
        "message": "Processed 4 of 10",
    }
    assert render.format_task_update(update) == (
        "t1  progress      40.0%  4/10  2.0 KiB  Processed 4 of 10"
    )
    done = dict(update, status="completed", task_status="completed", message="Task completed\n")
    assert render.format_task_update(done) == (
        "t1  completed    100.0%  4/10  2.0 KiB  Task completed\\n"
    )


def test_rate_meter() -> None:
    meter = render.RateMeter(window=5.0)
    assert meter.sample(100.0, 0) is None  # one sample: no rate yet
    assert meter.sample(100.1, 1000) is None  # too short a span to say
    assert meter.sample(101.0, 10_000) == pytest.approx(10_000)
    assert meter.sample(102.0, 30_000) == pytest.approx(15_000)
    # Old samples leave the window: the rate follows what happens now.
    for second in range(103, 120):
        rate = meter.sample(float(second), 30_000 + (second - 102) * 1000)
    assert rate == pytest.approx(1000)
    # A restart from zero forgets the past rather than report a negative rate.
    assert meter.sample(121.0, 0) is None
    assert meter.sample(122.0, 500) == pytest.approx(500)
