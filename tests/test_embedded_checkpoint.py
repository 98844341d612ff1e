"""Publishing the converted embedded model (editserve.editing.model.embedded_checkpoint): the
conversion goes to a private temporary directory that a failure removes, and the rename that
publishes it never removes a complete checkpoint (one with a fingerprint file) that another process
published first. The GGUF conversion itself is replaced by small fakes: only the directory steps are
under test."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from editserve.editing import model as model_mod
from editserve.editing.model import EMBEDDED_NAME, FINGERPRINT_FILE, _publish_dir, _remove_incomplete


def _checkpoint(folder: Path, tag: str, complete: bool = True) -> Path:
    """A stand-in checkpoint directory: a weights file (and a nested one) named by `tag`, and the
    fingerprint file if `complete`."""
    folder.mkdir()
    (folder / "model.safetensors").write_text(f"weights {tag}")
    (folder / "nested").mkdir()
    (folder / "nested" / "extra.json").write_text(f"extra {tag}")
    if complete:
        (folder / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": tag, "name": EMBEDDED_NAME}))
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `folder` (itself included) with its inode and, for files, its bytes."""
    snap = {".": (folder.stat().st_ino, b"")}
    for p in sorted(folder.rglob("*")):
        snap[str(p.relative_to(folder))] = (p.stat().st_ino, p.read_bytes() if p.is_file() else b"")
    return snap


def test_publish_without_target_renames_the_directory(tmp_path: Path) -> None:
    tmp = _checkpoint(tmp_path / "ckpt.1.2.3.tmp", "ours")
    inode = tmp.stat().st_ino
    target = tmp_path / "ckpt"
    assert _publish_dir(tmp, target) == target
    assert not tmp.exists()
    assert target.stat().st_ino == inode
    assert (target / "model.safetensors").read_text() == "weights ours"


def test_publish_keeps_a_complete_target_and_drops_ours(tmp_path: Path) -> None:
    """Another process published first: its directory stays as it is (same inodes, same bytes: a
    reader that found its fingerprint file keeps reading it), ours is removed."""
    target = _checkpoint(tmp_path / "ckpt", "theirs")
    before = _snapshot(target)
    tmp = _checkpoint(tmp_path / "ckpt.1.2.3.tmp", "ours")
    assert _publish_dir(tmp, target) == target
    assert not tmp.exists()
    assert _snapshot(target) == before


def test_publish_replaces_an_incomplete_target(tmp_path: Path) -> None:
    """A directory without a fingerprint file (left by an older version) is not a checkpoint: it is
    removed and ours published in its place."""
    target = _checkpoint(tmp_path / "ckpt", "stale", complete=False)
    (target / "leftover.bin").write_bytes(b"x" * 10)
    tmp = _checkpoint(tmp_path / "ckpt.1.2.3.tmp", "ours")
    assert _publish_dir(tmp, target) == target
    assert not tmp.exists()
    assert (target / "model.safetensors").read_text() == "weights ours"
    assert (target / "nested" / "extra.json").read_text() == "extra ours"
    assert not (target / "leftover.bin").exists()
    assert (target / FINGERPRINT_FILE).exists()


def test_publish_that_fails_removes_ours(tmp_path: Path) -> None:
    """A rename that fails for another reason (here: the target is a file) leaves no temporary
    directory behind and raises."""
    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    tmp = _checkpoint(tmp_path / "ckpt.1.2.3.tmp", "ours")
    with pytest.raises(OSError):
        _publish_dir(tmp, target)
    assert not tmp.exists()
    assert target.read_text() == "not a directory"


def test_remove_incomplete_never_touches_a_complete_checkpoint(tmp_path: Path) -> None:
    """The guard for a complete checkpoint published between the caller's check and the removal."""
    target = _checkpoint(tmp_path / "ckpt", "theirs")
    before = _snapshot(target)
    _remove_incomplete(target)
    assert _snapshot(target) == before
    _remove_incomplete(tmp_path / "missing")          # nothing there: nothing to do


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, save: Any) -> None:
    monkeypatch.setattr(model_mod, "_load_embedded_gguf", lambda: ("model", "tokenizer"))
    monkeypatch.setattr(model_mod, "_save_checkpoint", save)


def _models_dir(home: Path) -> Path:
    return home / "models"


def test_failed_conversion_leaves_no_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path))

    def save(model: Any, tok: Any, folder: Path) -> None:
        (folder / "model.safetensors").write_text("half written")
        raise RuntimeError("disk full")

    _fake_conversion(monkeypatch, save)
    with pytest.raises(RuntimeError, match="disk full"):
        model_mod.embedded_checkpoint()
    models = _models_dir(tmp_path)
    assert [p.name for p in models.iterdir()] == []
    assert not list(models.glob("*.tmp*"))


def test_conversion_publishes_a_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path))

    def save(model: Any, tok: Any, folder: Path) -> None:
        (folder / "model.safetensors").write_text(f"weights of {model}")
        (folder / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": "f", "name": EMBEDDED_NAME}))

    _fake_conversion(monkeypatch, save)
    target = model_mod.embedded_checkpoint()
    assert target == _models_dir(tmp_path) / EMBEDDED_NAME
    assert (target / "model.safetensors").read_text() == "weights of model"
    assert [p.name for p in _models_dir(tmp_path).iterdir()] == [EMBEDDED_NAME]


def test_two_conversions_at_once_keep_the_first_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converts first but publishes after B: B's checkpoint, which a reader may already use, is
    left as it is (the old code removed it and renamed A's in its place), and A uses it."""
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path))
    target = _models_dir(tmp_path) / EMBEDDED_NAME
    a_saving, b_published = threading.Event(), threading.Event()

    def save(model: Any, tok: Any, folder: Path) -> None:
        name = threading.current_thread().name
        (folder / "model.safetensors").write_text(f"weights {name}")
        (folder / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": name, "name": EMBEDDED_NAME}))
        if name == "A":
            a_saving.set()
            assert b_published.wait(30)

    _fake_conversion(monkeypatch, save)
    results: dict[str, Path | BaseException] = {}

    def convert() -> None:
        try:
            results[threading.current_thread().name] = model_mod.embedded_checkpoint()
        except BaseException as exc:          # reported by the asserts below
            results[threading.current_thread().name] = exc

    a = threading.Thread(target=convert, name="A")
    a.start()
    assert a_saving.wait(30)
    b = threading.Thread(target=convert, name="B")
    b.start()
    b.join(30)
    published = _snapshot(target)
    b_published.set()
    a.join(30)
    assert results == {"A": target, "B": target}
    assert _snapshot(target) == published
    assert (target / "model.safetensors").read_text() == "weights B"
    assert sorted(os.listdir(_models_dir(tmp_path))) == [EMBEDDED_NAME]
