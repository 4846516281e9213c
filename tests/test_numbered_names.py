"""Many items that share a name: each gets a free numbered name, found without trying
every taken one again (files.link_free and its hints)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from statusd.downloads import files

COUNT = 300


def link_parts(directory: files.Directory, count: int, base: str) -> list[str]:
    finals = []
    for n in range(count):
        part = f".part-{n}"
        fd = os.open(part, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600, dir_fd=directory.fd)
        os.write(fd, str(n).encode())
        os.close(fd)
        finals.append(files.link_free(directory, part, base))
        os.unlink(part, dir_fd=directory.fd)
    return finals


@pytest.fixture
def counted_links(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tried: list[str] = []
    real = os.link

    def link(source: Any, target: Any, **kwargs: Any) -> None:
        tried.append(target)
        real(source, target, **kwargs)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(files, "_hints", files._NumberHints())
    return tried


def test_a_shared_name_is_numbered_in_linear_tries(
    tmp_path: Path, counted_links: list[str]
) -> None:
    directory = files.Directory.open(tmp_path)
    try:
        finals = link_parts(directory, COUNT, "gone.bin")
    finally:
        directory.close()
    assert finals[:3] == ["gone.bin", "gone.1.bin", "gone.2.bin"]
    assert len(set(finals)) == COUNT
    for n, final in enumerate(finals):
        assert (tmp_path / final).read_text() == str(n)  # nothing replaced
    # BASE, then the hint: at most two tries each (the quadratic search made 45,150 here).
    assert len(counted_links) <= 2 * COUNT


def test_a_deleted_name_is_given_again_and_a_stale_hint_replaces_nothing(
    tmp_path: Path, counted_links: list[str]
) -> None:
    directory = files.Directory.open(tmp_path)
    try:
        link_parts(directory, 5, "a.txt")  # a.txt, a.1.txt ... a.4.txt
        (tmp_path / "a.txt").unlink()
        (tmp_path / "a.2.txt").unlink()
        assert link_parts(directory, 1, "a.txt") == ["a.txt"]  # the base, freed, first
        # The hint says 5; the numbers below it that were freed come after the rest.
        (tmp_path / "a.5.txt").write_text("someone else's")
        assert link_parts(directory, 1, "a.txt") == ["a.6.txt"]
        assert (tmp_path / "a.5.txt").read_text() == "someone else's"
    finally:
        directory.close()


def test_hints_are_bounded_and_drop_the_oldest() -> None:
    hints = files._NumberHints(most=2)
    hints.ended((1, 1, "a"), 3)
    hints.ended((1, 1, "b"), 1)
    hints.ended((1, 1, "a"), 4)  # a is now the most recent
    hints.ended((1, 1, "c"), 1)
    assert hints.start((1, 1, "a")) == 5
    assert hints.start((1, 1, "b")) == 1  # dropped: back to the start
    assert hints.start((1, 1, "c")) == 2
