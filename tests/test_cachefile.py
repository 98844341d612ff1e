"""Two writers of one cache file at once (editserve.cachefile): replicas sharing $EDITSERVE_HOME, or
two test workers, building the same statistics or projection file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from editserve.cachefile import publish


def test_two_writers_interleaved_both_publish_a_whole_file(tmp_path: Path) -> None:
    """A writes its file and waits until B has written all of its own; then both rename. With one
    shared temporary name B's write truncated A's file and the second rename found no file."""
    target = tmp_path / "cov.safetensors"
    a_written, b_written = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def writer(content: bytes, mine: threading.Event, other: threading.Event | None) -> None:
        def write(tmp: Path) -> None:
            tmp.write_bytes(content)
            mine.set()
            if other is not None:
                assert other.wait(10)

        try:
            publish(target, write)
        except BaseException as exc:          # reported by the test below
            errors.append(exc)

    a = threading.Thread(target=writer, args=(b"A" * 100_000, a_written, b_written))
    a.start()
    assert a_written.wait(10)
    b = threading.Thread(target=writer, args=(b"B" * 50_000, b_written, None))
    b.start()
    a.join(10)
    b.join(10)
    assert not errors, errors
    assert target.read_bytes() in (b"A" * 100_000, b"B" * 50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cov.safetensors"]       # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "prefixes.json"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefixes.json"]
