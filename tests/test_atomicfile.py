"""Publishing a file through a private temporary file and a rename (editserve.atomicfile): two writers
of one cache file at once (replicas sharing $EDITSERVE_HOME, or two test workers, building the same
statistics or projection file), failures at every step, and the fsyncs of a durable write."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from editserve.atomicfile import private_tmp, publish, publish_bytes


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


def test_private_names_differ_between_calls_of_one_thread(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    names = {private_tmp(target) for _ in range(3)}
    assert len(names) == 3 and all(n.parent == tmp_path and n.name.endswith(".tmp") for n in names)
    assert private_tmp(target, tmp_path / "t").parent == tmp_path / "t"


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize("tmp_dir", [None, "tmp"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, durable: bool,
                                                             tmp_dir: str | None) -> None:
    target = tmp_path / "prefixes.json"
    target.write_text("old")
    tmps = tmp_path / tmp_dir if tmp_dir else None
    seen: list[Path] = []

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        seen.append(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(target, broken, durable=durable, tmp_dir=tmps)
    assert target.read_text() == "old"
    assert seen and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prefixes.json"] + ([tmp_dir] if tmp_dir else []))
    if tmps is not None:
        assert list(tmps.iterdir()) == []


def _fsync_spy(monkeypatch: pytest.MonkeyPatch, fail: bool = False,
               watch: Path | None = None) -> list[tuple[int, bool, bytes | None]]:
    """Record (inode, is a directory, content of `watch` at that moment) of every os.fsync; with
    `fail`, fsync raises instead."""
    calls: list[tuple[int, bool, bytes | None]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        calls.append((st.st_ino, stat.S_ISDIR(st.st_mode), watch.read_bytes() if watch else None))
        if fail:
            raise OSError("I/O error")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_durable_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "blob"
    target.write_bytes(b"old")
    calls = _fsync_spy(monkeypatch, watch=target)
    publish_bytes(target, b"new bytes", durable=True, tmp_dir=tmp_path / "tmp")
    assert target.read_bytes() == b"new bytes"
    # the new file (same inode once renamed) while the target still held the old bytes, then the directory
    assert calls == [(target.stat().st_ino, False, b"old"), (tmp_path.stat().st_ino, True, b"new bytes")]
    assert list((tmp_path / "tmp").iterdir()) == []

    calls.clear()
    publish(target, lambda tmp: tmp.write_text("cache"))
    assert calls == [] and target.read_text() == "cache"


def test_a_failed_fsync_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A durable write whose fsync fails (the ledger's blobs used to leave their temporary file)."""
    from editserve.ledger.blobs import FileBlobStore

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    _fsync_spy(monkeypatch, fail=True)
    with pytest.raises(OSError, match="I/O error"):
        publish_bytes(target, b"new", durable=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    store = FileBlobStore(tmp_path / "blobs")
    with pytest.raises(OSError, match="I/O error"):
        store.put(b"a blob")
    assert list(store) == [] and list(store.tmp.iterdir()) == []


def test_a_failed_rename_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    (target / "inside").mkdir(parents=True)              # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        publish_bytes(target, b"x", durable=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
