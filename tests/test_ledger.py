"""Ledger behaviour with small synthetic patches, on both backends: a real SQLite file and a real
PostgreSQL server (started by the tests, `tests._pg`): versions, head, rollback, revert,
idempotency, audit log, materialisation, integrity checks, export/import validation, CLI.
Backend-specific tests (SQLite files and $EDITSERVE_HOME; PostgreSQL DSN secrecy, migrations,
lost server, blob tables) follow the shared ones.

The same behaviour on the real SmolLM2 checkpoint is in test_ledger_smollm.py; crash and
multi-process tests are in test_ledger_crash.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from tests._ledger_util import FP, NAME, NAME2, SHAPE, Backend, backend, base_weights, synth_patch, tensor_hash  # noqa: F401
from tests._pg import pg_server  # noqa: F401

from editserve.cli import main as cli_main
from editserve.editing.arch import Layout
from editserve.errors import EditserveError, InvalidRequestError
from editserve.ledger import (
    BaseCopyMismatch,
    BaseCopyMissing,
    IdempotencyMismatch,
    ImportRejected,
    Ledger,
    LedgerConflict,
    LedgerCorrupt,
    LedgerError,
    LedgerModelMismatch,
    RebaseOutcome,
    RebaseStep,
    RevertError,
    VersionNotFound,
    tensor_sha256,
)
from editserve.ledger.transfer import export_patch, export_version, import_patch, import_version
from editserve.patches import materialize


@pytest.fixture
def base() -> dict[str, torch.Tensor]:
    return base_weights()


@pytest.fixture
def ledger(backend: Backend, base: dict[str, torch.Tensor]) -> Ledger:
    led = Ledger.open(backend.location(), model_fingerprint=FP, caller="test")
    yield led
    led.close()


def _commit_n(ledger: Ledger, base: dict[str, torch.Tensor], n: int, start: int = 1) -> list[int]:
    out = []
    for i in range(start, start + n):
        out.append(ledger.commit(synth_patch(i), ledger.head(), caller=f"user{i}", base=base,
                                 probe_report={"efficacy": 1.0, "i": i}))
    return out


def _state(ledger: Ledger) -> tuple:
    return (ledger.head(), len(ledger.versions()), len(ledger.events()), sorted(ledger.blobs))


# -- versions, head, commit ----------------------------------------------------------------------


def test_new_ledger_has_base_version_and_create_event(ledger: Ledger) -> None:
    assert ledger.head() == 0
    [v0] = ledger.versions()
    assert (v0.version, v0.kind, v0.parent, v0.caller) == (0, "base", None, "test")
    assert ledger.active_patches() == []
    assert [e.kind for e in ledger.events()] == ["create"]


def test_commit_records_everything(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    p = synth_patch(1)
    v = ledger.commit(p, 0, caller="alice", probe_report={"efficacy": 0.9}, base=base)
    assert v == 1 and ledger.head() == 1
    info = ledger.version(1)
    assert info.patch_id == p.digest and info.parent == 0 and info.kind == "commit"
    assert info.caller == "alice" and info.probe_report == {"efficacy": 0.9}
    assert info.method == "rome" and info.requests == p.requests and info.hparams == p.hparams
    assert info.created_at > 0
    # The factors are a content-addressed safetensors blob; the patch loads back identical.
    loaded = ledger.patch(p.digest)
    assert loaded.digest == p.digest and torch.equal(loaded.deltas[0].u, p.deltas[0].u)
    assert ledger.weights.base_names() == (NAME,)        # base copy taken the first time NAME was touched
    ev = ledger.events()[-1]
    assert (ev.kind, ev.version, ev.from_version, ev.caller, ev.details["patch"]) == ("commit", 1, 0, "alice", p.digest)


def test_commit_conflict_when_head_moved(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    _commit_n(ledger, base, 2)
    before = _state(ledger)
    with pytest.raises(LedgerConflict) as exc:
        ledger.commit(synth_patch(99), 1, base=base)
    assert exc.value.expected_head == 1 and exc.value.actual_head == 2
    assert "expected version 1" in str(exc.value) and "version 2" in str(exc.value)
    # Nothing recorded (an unreferenced factor blob may remain; it is not part of any version).
    assert _state(ledger)[:3] == before[:3]


def test_commit_needs_base_copy_and_right_model(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    with pytest.raises(BaseCopyMissing, match=NAME):
        ledger.commit(synth_patch(1), 0)
    with pytest.raises(LedgerModelMismatch, match="computed for model"):
        ledger.commit(synth_patch(1, fp="0" * 64), 0, base=base)
    wrong = {NAME: torch.randn(SHAPE[1], SHAPE[0])}
    with pytest.raises(EditserveError, match="shape"):
        ledger.commit(synth_patch(1), 0, base=wrong)
    with pytest.raises(InvalidRequestError, match="expected_head"):
        ledger.commit(synth_patch(1), "0", base=base)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="probe_report"):
        ledger.commit(synth_patch(1), 0, base=base, probe_report={"x": float("nan")})
    assert ledger.head() == 0 and len(ledger.versions()) == 1


def test_base_copy_mismatch_is_refused(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    ledger.weights.ensure_base(NAME, base[NAME])
    ledger.weights.ensure_base(NAME, base[NAME].clone())            # same bytes: fine
    with pytest.raises(BaseCopyMismatch, match=NAME):
        ledger.weights.ensure_base(NAME, base[NAME] + 1e-3)


def test_idempotent_retry_never_creates_two_versions(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    p = synth_patch(1)
    v1 = ledger.commit(p, 0, base=base, idempotency_key="req-1")
    # A retry (e.g. the client timed out) with the stale expected head returns the same version.
    assert ledger.commit(p, 0, base=base, idempotency_key="req-1") == v1
    assert len(ledger.versions()) == 2 and [e.kind for e in ledger.events()].count("commit") == 1
    with pytest.raises(IdempotencyMismatch, match="req-1"):
        ledger.commit(synth_patch(2), 1, base=base, idempotency_key="req-1")


def test_rollback_and_roll_forward_keep_history(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    p = [synth_patch(i) for i in (1, 2, 3)]
    for patch in p:
        ledger.commit(patch, ledger.head(), base=base)
    assert ledger.active_ids() == tuple(x.digest for x in p)
    assert ledger.rollback(1, caller="ops") == 1
    assert ledger.active_ids() == (p[0].digest,)
    assert len(ledger.versions()) == 4                       # later versions stay in history
    assert ledger.rollback(3) == 3                            # roll forward
    assert ledger.active_ids() == tuple(x.digest for x in p)
    kinds = [(e.kind, e.from_version, e.version, e.caller) for e in ledger.events()[-2:]]
    assert kinds == [("rollback", 3, 1, "ops"), ("roll_forward", 1, 3, "local")]
    with pytest.raises(VersionNotFound, match="version 9"):
        ledger.rollback(9)
    with pytest.raises(LedgerConflict):
        ledger.rollback(0, expected_head=2)
    # Committing after a rollback branches from the head; numbers keep increasing.
    ledger.rollback(1)
    v = ledger.commit(synth_patch(4), 1, base=base)
    assert v == 4 and ledger.version(4).parent == 1
    assert ledger.active_ids(4) == (p[0].digest, synth_patch(4).digest)
    assert ledger.active_ids(3) == tuple(x.digest for x in p)


def test_revert_in_the_middle(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    p = [synth_patch(i) for i in (1, 2, 3)]
    for patch in p:
        ledger.commit(patch, ledger.head(), base=base)
    res = ledger.revert(2, caller="bob")
    assert (res.version, res.reverted_version, res.removed_patch, res.created) == (4, 2, p[1].digest, True)
    assert ledger.head() == 4 and ledger.active_ids() == (p[0].digest, p[2].digest)
    assert ledger.version(4).kind == "revert" and ledger.version(4).removed == (p[1].digest,)
    assert ledger.events()[-1].kind == "revert" and ledger.events()[-1].caller == "bob"
    assert ledger.active_ids(3) == tuple(x.digest for x in p)
    with pytest.raises(RevertError, match="not active"):
        ledger.revert(2)
    with pytest.raises(RevertError, match="added no patch"):
        ledger.revert(0)
    with pytest.raises(VersionNotFound):
        ledger.revert(17)


def test_revert_with_rebase_callable(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    p = [synth_patch(i) for i in (1, 2, 3)]
    for patch in p:
        ledger.commit(patch, ledger.head(), base=base, probe_report={"efficacy": 1.0})
    seen: list[RebaseStep] = []

    def recompute(step: RebaseStep) -> RebaseOutcome:
        seen.append(step)
        new = synth_patch(100 + step.version)
        return RebaseOutcome(patch=new, metrics_before={"efficacy": 1.0}, metrics_after={"efficacy": 0.75})

    res = ledger.revert(1, rebase=recompute)
    assert [s.version for s in seen] == [2, 3]
    assert [x.digest for x in seen[0].old_context] == [p[0].digest]          # what v2 was computed on
    assert seen[0].new_context == () and [x.digest for x in seen[1].new_context] == [synth_patch(102).digest]
    assert [x.digest for x in seen[1].old_context] == [p[0].digest, p[1].digest]
    assert seen[0].requests == p[1].requests and seen[0].method == "rome"
    assert ledger.active_ids() == (synth_patch(102).digest, synth_patch(103).digest)
    assert [r.changes for r in res.rebased] == [{"efficacy": -0.25}, {"efficacy": -0.25}]
    assert ledger.version(res.version).details["rebased"][0]["new_patch"] == synth_patch(102).digest
    # A callable returning only a patch: the stored probe report is the "before".
    ledger.rollback(3)
    res2 = ledger.revert(1, rebase=lambda step: synth_patch(200 + step.version))
    assert res2.rebased[0].metrics_before == {"efficacy": 1.0} and res2.rebased[0].metrics_after == {}


def test_revert_rebase_conflict_if_head_moves(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    _commit_n(ledger, base, 2)

    def slow(step: RebaseStep):
        # Another writer commits while we recompute.
        with Ledger.open(ledger.location, model_fingerprint=FP) as other:
            other.commit(synth_patch(50), other.head(), base=base)
        return synth_patch(60)

    with pytest.raises(LedgerConflict):
        ledger.revert(1, rebase=slow)
    assert ledger.head() == 3 and ledger.version(3).kind == "commit"


def test_idempotent_revert(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    _commit_n(ledger, base, 2)
    r1 = ledger.revert(1, idempotency_key="rv")
    r2 = ledger.revert(1, idempotency_key="rv")
    assert r1.version == r2.version == 3 and r2.created is False and len(ledger.versions()) == 4


def test_event_log_and_history_are_append_only(ledger: Ledger, backend: Backend,
                                                base: dict[str, torch.Tensor]) -> None:
    _commit_n(ledger, base, 1)
    before = _state(ledger)
    for sql in ("UPDATE events SET kind='x'", "DELETE FROM events", "DELETE FROM versions WHERE version=1",
                "UPDATE versions SET caller='mallory'", "DELETE FROM patches", "UPDATE version_ops SET op='remove'",
                "DELETE FROM base_copies"):
        assert "append-only" in backend.raw_write_fails(ledger, sql)
    assert _state(ledger) == before
    ledger.check_integrity()


# -- materialisation ---------------------------------------------------------------------------


def test_materialize_is_bit_reproducible_and_v0_is_base(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    p = [synth_patch(1), synth_patch(2, names=(NAME, NAME2)), synth_patch(3)]
    for patch in p:
        ledger.commit(patch, ledger.head(), base=base)
    w0 = ledger.weights.materialize(0)
    assert set(w0) == {NAME, NAME2}
    assert all(tensor_hash(w0[n]) == tensor_hash(base[n]) for n in w0)
    a, b = ledger.weights.materialize(3), ledger.weights.materialize(3)
    assert all(tensor_hash(a[n]) == tensor_hash(b[n]) for n in a)
    want = materialize(base[NAME], [d for x in p for d in x.deltas if d.name == NAME], Layout.OUT_IN)
    assert torch.equal(a[NAME], want)
    assert not torch.equal(a[NAME], w0[NAME])
    assert ledger.weights.expected_checksums(3) == {n: tensor_sha256(t) for n, t in a.items()}
    # Rollback to v0 gives the base back bit for bit.
    ledger.rollback(0)
    assert ledger.weights.expected_checksums() == {n: tensor_hash(base[n]) for n in base}
    # With caller-supplied base tensors (e.g. an engine's slice, other layout).
    t = ledger.weights.materialize(3, base={NAME: base[NAME].t().contiguous()}, layout=Layout.IN_OUT)
    assert torch.equal(t[NAME].t(), a[NAME])


def test_materialize_in_bfloat16_casts_once(backend: Backend) -> None:
    base = {NAME: base_weights()[NAME].to(torch.bfloat16)}
    with Ledger.open(backend.location(), model_fingerprint=FP) as led:
        for i in range(1, 4):
            led.commit(synth_patch(i), led.head(), base=base)
        w = led.weights.materialize(3)[NAME]
        assert w.dtype == torch.bfloat16
        acc = base[NAME].float() + sum(synth_patch(i).deltas[0].dense() for i in range(1, 4))
        assert torch.allclose(w.float(), acc, atol=0.02)
        assert torch.equal(led.weights.materialize(0)[NAME], base[NAME])


def test_diff_reports_patches_and_norms(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    _commit_n(ledger, base, 2)
    ledger.commit(synth_patch(7, names=(NAME2,)), 2, base=base)
    d = ledger.weights.diff(1, 3)
    assert d.only_a == () and d.only_b == (synth_patch(2).digest, synth_patch(7, names=(NAME2,)).digest)
    assert d.common == (synth_patch(1).digest,)
    norms = {w.name: w.norm for w in d.weights}
    assert norms[NAME] == pytest.approx(float(synth_patch(2).deltas[0].dense().norm()), rel=1e-5)
    assert norms[NAME2] == pytest.approx(float(synth_patch(7, names=(NAME2,)).deltas[0].dense().norm()), rel=1e-5)
    assert all(w.relative is not None and 0 < w.relative < 1 for w in d.weights)
    assert ledger.weights.diff(2, 2).weights == ()


# -- opening and integrity -----------------------------------------------------------------------


def test_open_refuses_other_model_and_uses_editserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDITSERVE_LEDGER", raising=False)
    monkeypatch.delenv("EDITSERVE_LEDGER_DSN_FILE", raising=False)
    with Ledger.open(model_fingerprint=FP) as led:
        assert led.root == tmp_path / "home" / "ledger" / FP[:16]
    with pytest.raises(LedgerModelMismatch, match=FP[:16]):
        Ledger.open(tmp_path / "home" / "ledger" / FP[:16], model_fingerprint="1" * 64)
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(tmp_path / "nothing", create=False)
    with Ledger.open(tmp_path / "home" / "ledger" / FP[:16]) as led:     # fingerprint read from the ledger
        assert led.model_fingerprint == FP


def _blob_of(ledger: Ledger, version: int) -> str:
    return ledger.store.patch(ledger.version(version).patch_id).blob


def test_corrupt_blob_detected_at_open_and_last_good_stays_usable(backend: Backend,
                                                                  base: dict[str, torch.Tensor]) -> None:
    root = backend.location()
    with Ledger.open(root, model_fingerprint=FP) as led:
        _commit_n(led, base, 4)
        good = led.weights.expected_checksums(2)
        bad_blob = _blob_of(led, 3)
        backend.corrupt_blob(led, bad_blob)
    assert Ledger.open(root, verify="quick").close() is None      # same size: only hashing finds it
    with pytest.raises(LedgerCorrupt) as exc:
        Ledger.open(root, model_fingerprint=FP)
    err = exc.value
    assert bad_blob in str(err) and "checksum mismatch" in str(err)
    assert err.bad_versions == (3, 4) and err.last_good == 2 and bad_blob in err.bad_blobs
    with Ledger.open(root, model_fingerprint=FP, strict=False) as led:
        assert led.damage is not None and led.damage.last_good == 2
        assert led.weights.expected_checksums(2) == good                     # the last good version is usable
        with pytest.raises(LedgerCorrupt, match="version 4"):
            led.weights.materialize(4)
        with pytest.raises(LedgerCorrupt, match="version 4"):
            led.commit(synth_patch(9), 4, base=base)                  # no commit on a damaged head
        assert led.rollback(2) == 2
        assert led.commit(synth_patch(9), 2, base=base) == 5
        with pytest.raises(LedgerCorrupt):
            led.rollback(3)
        assert led.weights.expected_checksums(5) == led.weights.expected_checksums(5)


def test_object_cache_is_bounded_and_a_reread_is_verified(ledger: Ledger, backend: Backend,
                                                          base: dict[str, torch.Tensor]) -> None:
    """`LedgerObjects` keeps at most `cache_size` patches: one that fell out is read again and
    verified, so a blob damaged after its first load is found then; one still cached is served as
    it was verified when loaded."""
    from editserve.ledger.objects import LedgerObjects

    _commit_n(ledger, base, 4)
    ids = ledger.active_ids()
    objects = LedgerObjects(ledger.store, ledger.blobs, FP, cache_size=2)
    assert [p.digest for p in objects.patches(ids)] == list(ids)      # loads 1..4; 3 and 4 stay cached
    backend.corrupt_blob(ledger, _blob_of(ledger, 1))
    backend.corrupt_blob(ledger, _blob_of(ledger, 4))
    assert objects.patch(ids[3]).digest == ids[3]
    with pytest.raises(LedgerCorrupt, match="corrupt"):
        objects.patch(ids[0])
    assert objects.patch(ids[1]).digest == ids[1]                       # intact, read again


def test_missing_blob_and_missing_base_copy(backend: Backend, base: dict[str, torch.Tensor]) -> None:
    root = backend.location()
    with Ledger.open(root, model_fingerprint=FP) as led:
        _commit_n(led, base, 2)
        led.commit(synth_patch(5, names=(NAME2,)), 2, base=base)
        backend.remove_blob(led, _blob_of(led, 2))
        base_blob = led.store.base_copies()[NAME2].blob
    with pytest.raises(LedgerCorrupt, match="missing") as exc:
        Ledger.open(root)
    assert exc.value.bad_versions == (2, 3) and exc.value.last_good == 1
    with Ledger.open(root, strict=False) as led:
        backend.remove_blob(led, base_blob)
    with pytest.raises(LedgerCorrupt, match=f"base copy of {NAME2}"):
        Ledger.open(root)


def test_garbage_database_is_a_typed_error(tmp_path: Path) -> None:
    root = tmp_path / "l"
    root.mkdir()
    (root / "ledger.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerCorrupt, match="ledger.sqlite3"):
        Ledger.open(root, model_fingerprint=FP)


def test_check_integrity_deep_and_gc(ledger: Ledger, base: dict[str, torch.Tensor]) -> None:
    _commit_n(ledger, base, 3)
    report = ledger.check_integrity(deep=True)
    assert report.ok and report.versions == 4 and report.patches == 3 and report.base_copies == 1
    orphan = ledger.blobs.put(b"left over by a crashed commit")
    assert ledger.collect_garbage(min_age_s=3600) == []              # too young: may be a commit in flight
    assert ledger.collect_garbage(min_age_s=0) == [orphan]
    ledger.check_integrity()


# -- export / import ---------------------------------------------------------------------------


def _fix_checksum(src: Path, file_name: str) -> None:
    import hashlib

    m = json.loads((src / "manifest.json").read_text())
    data = (src / file_name).read_bytes()
    m["export"]["files"][file_name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (src / "manifest.json").write_text(json.dumps(m))


def test_export_import_patch_and_version(ledger: Ledger, backend: Backend, base: dict[str, torch.Tensor],
                                         tmp_path: Path) -> None:
    _commit_n(ledger, base, 3)
    export_patch(ledger, 2, tmp_path / "p2")
    export_version(ledger, 3, tmp_path / "v3")
    from editserve.patches import load_patch

    assert load_patch(tmp_path / "p2").digest == synth_patch(2).digest      # a plain patch directory too
    with Ledger.open(backend.location(), model_fingerprint=FP) as other:
        v = import_patch(other, tmp_path / "p2", 0, caller="importer", base=base)
        assert v == 1 and other.active_ids() == (synth_patch(2).digest,)
        assert other.version(1).kind == "import" and other.events()[-1].kind == "import"
        v = import_version(other, tmp_path / "v3", 1, caller="importer")
        assert other.active_ids(v) == ledger.active_ids(3)
        assert other.weights.expected_checksums(v) == ledger.weights.expected_checksums(3)
        manifest = json.loads((tmp_path / "v3" / "manifest.json").read_text())
        assert manifest["weight_checksums"] == ledger.weights.expected_checksums(3)
        assert manifest["export"]["model_fingerprint"] == FP
        with pytest.raises(ImportRejected, match="already active"):
            import_patch(other, tmp_path / "p2", v)


def _rejects(backend: Backend, base: dict[str, torch.Tensor], src: Path, match: str, **kw) -> None:
    with Ledger.open(backend.location(), model_fingerprint=FP) as other:
        other.commit(synth_patch(40), 0, base=base)
        before = _state(other)
        with pytest.raises(ImportRejected, match=match):
            import_patch(other, src, other.head(), base=base, **kw)
        assert _state(other) == before                        # nothing changed, not even a blob


@pytest.mark.parametrize("damage, match", [
    ("fingerprint", "model 0000000000000000"),
    ("checksum", "checksum of patch.safetensors"),
    ("dtype", "dtype torch.float64"),
    ("nan", "NaN"),
    ("shape", "shape"),
    ("digest", "digest mismatch"),
    ("missing", "missing"),
    ("format", "format"),
])
def test_import_rejects_bad_exports(ledger: Ledger, backend: Backend, base: dict[str, torch.Tensor], tmp_path: Path,
                                    damage: str, match: str) -> None:
    from safetensors.torch import load_file, save_file

    ledger.commit(synth_patch(1), 0, base=base)
    src = export_patch(ledger, 1, tmp_path / "p1")
    m = json.loads((src / "manifest.json").read_text())
    tensors = load_file(str(src / "patch.safetensors"))
    key = f"{NAME}::u"
    if damage == "fingerprint":
        m["export"]["model_fingerprint"] = "0" * 64
    elif damage == "format":
        m["export"]["format"] = 99
    elif damage == "missing":
        del tensors[key]
    elif damage == "dtype":
        tensors[key] = tensors[key].double()
    elif damage == "nan":
        tensors[key][3, 0] = float("nan")
    elif damage == "shape":
        # A self-consistent patch (digest matches) for a weight one row taller than the base.
        from editserve.patches import Patch

        tensors[key] = torch.randn(SHAPE[0] + 1, 1)
        m["weights"][0]["shape"][0] = SHAPE[0] + 1
        del m["digest"]
        m["digest"] = Patch.from_parts(m, tensors).digest
    elif damage == "digest":
        tensors[key] = tensors[key] * 1.5
    (src / "manifest.json").write_text(json.dumps(m))
    if damage != "checksum":
        save_file(tensors, str(src / "patch.safetensors"))
        _fix_checksum(src, "patch.safetensors")
    else:
        data = bytearray((src / "patch.safetensors").read_bytes())
        data[-1] ^= 1
        (src / "patch.safetensors").write_bytes(bytes(data))
    _rejects(backend, base, src, match)


def test_import_rejects_norm_above_bound_and_unknown_base(ledger: Ledger, backend: Backend,
                                                          base: dict[str, torch.Tensor], tmp_path: Path) -> None:
    huge = synth_patch(3, scale=50.0)
    ledger.commit(huge, 0, base=base)
    src = export_patch(ledger, 1, tmp_path / "huge")
    _rejects(backend, base, src, "the bound is 0.5")
    ledger.commit(synth_patch(4), 1, base=base)
    src = export_patch(ledger, 2, tmp_path / "ok")
    _rejects(backend, base, src, r"‖ΔW‖ .* the bound is 0.001", max_relative_norm=0.001)
    with Ledger.open(backend.location(), model_fingerprint=FP) as other:
        with pytest.raises(ImportRejected, match="no base weight"):
            import_patch(other, src, 0)
        assert other.head() == 0 and len(other.versions()) == 1


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_commands(ledger: Ledger, backend: Backend, base: dict[str, torch.Tensor], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    _commit_n(ledger, base, 3)
    root = ledger.location.dsn or str(ledger.root)

    def run(*argv: str) -> str:
        code = cli_main(["ledger", *argv, "--ledger", root])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    out = run("versions")
    assert "head = version 3" in out and "Landmark 2 is located in the city of → Rome" in out
    assert out.count("commit") == 3
    out = run("show", "2")
    assert synth_patch(2).digest in out and "user2" in out and '"efficacy": 1.0' in out
    out = run("diff", "1", "3")
    assert "2 only in 3" in out and NAME in out and "‖ΔW‖_F" in out
    assert "head: version 3 → version 1" in run("rollback", "1")
    assert ledger.head() == 1
    run("rollback", "3")
    assert "reverted version 2" in run("revert", "2")
    assert ledger.active_ids() == (synth_patch(1).digest, synth_patch(3).digest)
    run("export", "3", str(tmp_path / "exp"))
    assert "intact" in run("check-ledger", "--deep")
    assert "revert" in run("events")
    # Errors are typed and reported with exit status 2.
    assert cli_main(["ledger", "rollback", "42", "--ledger", root]) == 2
    assert "version 42" in capsys.readouterr().err
    imp = backend.location()
    with Ledger.open(imp, model_fingerprint=FP) as other:
        other.weights.ensure_base(NAME, base[NAME])
    assert cli_main(["ledger", "import", str(tmp_path / "exp"), "--ledger", imp]) == 0
    assert "as version 1" in capsys.readouterr().out


def test_cli_finds_the_only_ledger_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path))
    assert cli_main(["ledger", "versions"]) == 2
    assert "no ledger under" in capsys.readouterr().err
    Ledger.open(model_fingerprint=FP).close()
    assert cli_main(["ledger", "versions"]) == 0
    assert "head = version 0" in capsys.readouterr().out
    Ledger.open(model_fingerprint="2" * 64).close()
    assert cli_main(["ledger", "versions"]) == 2
    assert "2 ledgers" in capsys.readouterr().err


def test_blob_writes_are_atomic_files(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l", model_fingerprint=FP)
    digest = ledger.blobs.put(b"x" * 1000)
    path = ledger.blobs.path(digest)
    assert path.read_bytes() == b"x" * 1000 and oct(path.stat().st_mode)[-3:] == "644"
    assert not any(p.suffix == ".tmp" for p in (ledger.root / "tmp").iterdir()) if (ledger.root / "tmp").exists() else True
    assert ledger.blobs.put(b"x" * 1000) == digest
    assert os.path.getsize(path) == 1000
    ledger.close()


# -- both backends: locks, migrations ------------------------------------------------------------


def test_a_held_write_lock_is_ledger_busy(backend: Backend, base: dict[str, torch.Tensor]) -> None:
    import time

    from editserve.ledger import LedgerBusy

    root = backend.location()
    with Ledger.open(root, model_fingerprint=FP, busy_timeout_s=0.5) as led:
        if backend.server is None:
            holder = sqlite3.connect(str(led.root / "ledger.sqlite3"), isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            holder = psycopg.connect(led.location.dsn)          # a transaction stays open until rollback
            holder.execute("SELECT version FROM head WHERE id = 1 FOR UPDATE")
        t = time.monotonic()
        with pytest.raises(LedgerBusy, match="locked"):
            led.commit(synth_patch(1), 0, base=base)
        assert time.monotonic() - t < 30
        holder.rollback() if backend.server is not None else holder.execute("ROLLBACK")
        holder.close()
        assert led.commit(synth_patch(1), 0, base=base) == 1 and led.head() == 1


def _latest_migration(backend: Backend) -> int:
    from editserve.ledger.pgschema import PG_MIGRATIONS
    from editserve.ledger.sqlite import SQLITE_MIGRATIONS

    return len(SQLITE_MIGRATIONS if backend.server is None else PG_MIGRATIONS)


def test_schema_migrations_are_recorded_and_a_newer_schema_is_refused(backend: Backend) -> None:
    from editserve.ledger import LedgerSchemaError

    root = backend.location()
    Ledger.open(root, model_fingerprint=FP).close()
    with Ledger.open(root) as led:
        assert led.store.schema_version() == _latest_migration(backend)
        assert led.store.upgrade() == []                       # nothing pending: nothing applied twice
    # A database written by a newer editserve (migration 99) is not opened by this one.
    if backend.server is None:
        conn = sqlite3.connect(str(Path(root) / "ledger.sqlite3"))
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'x', 0)")
        conn.commit()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(root, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations(version, name, checksum) VALUES (99, 'future', 'x')")
    with pytest.raises(LedgerSchemaError, match=r"migration\(s\) \[99\].*newer editserve"):
        Ledger.open(root)


def test_sqlite_ledger_from_before_migrations_is_adopted(tmp_path: Path, base: dict[str, torch.Tensor]) -> None:
    from editserve.ledger.sqlite import SQLITE_MIGRATIONS

    root = tmp_path / "old"
    with Ledger.open(root, model_fingerprint=FP) as led:
        led.commit(synth_patch(1), 0, base=base)
    conn = sqlite3.connect(str(root / "ledger.sqlite3"))
    conn.execute("DROP TABLE schema_migrations")                 # what a ledger written before this change has
    conn.commit()
    conn.close()
    with Ledger.open(root) as led:
        assert led.store.schema_version() == len(SQLITE_MIGRATIONS) and led.head() == 1
        led.check_integrity(deep=True)


# -- PostgreSQL: DSN secrecy, migrations, a lost server, blob tables -------------------------------

SECRET = "s3cr3t-Pa55word"


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, f"the password leaked into: {text[:300]}"


def test_redact_dsn() -> None:
    from editserve.ledger import LedgerLocation, redact_dsn

    assert redact_dsn("postgresql://app:pw@db.example:5432/ledger") == "postgresql://app@db.example:5432/ledger"
    assert redact_dsn("postgres://app@/l?host=/run/pg&password=pw&sslmode=require") == \
        "postgres://app@/l?host=/run/pg&sslmode=require"
    assert redact_dsn("postgresql://h1:5432,h2:5433/l?sslpassword=x") == "postgresql://h1:5432,h2:5433/l"
    loc = LedgerLocation.parse("postgresql://app:pw@db/ledger")
    assert loc.backend == "postgresql" and loc.dsn.endswith("pw@db/ledger")
    assert "pw" not in repr(loc) and "pw" not in str(loc) and "pw" not in f"{loc!r} {loc}"
    assert LedgerLocation.parse("/tmp/x").backend == "sqlite"
    with pytest.raises(InvalidRequestError):
        LedgerLocation(dsn="mysql://root:pw@db/x")


def _password_database(pg_server) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    role = f"app_{os.getpid()}_{len(pg_server.dsn())}"
    pg_server.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN "
                      f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{SECRET}'; END IF; END $$")
    db = pg_server.create_database()
    pg_server.execute(f'ALTER DATABASE "{db}" OWNER TO "{role}"')
    return role, db


def test_postgres_dsn_password_is_never_shown(pg_server, tmp_path: Path, base: dict[str, torch.Tensor],  # type: ignore[no-untyped-def]
                                              caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import traceback

    from editserve.ledger import LedgerUnavailable

    caplog.set_level(logging.DEBUG)
    role, db = _password_database(pg_server)
    dsn = pg_server.dsn(db, user=role, password=SECRET)
    with Ledger.open(dsn, model_fingerprint=FP, caller="app") as led:
        led.commit(synth_patch(1), 0, base=base)
        assert led.backend == "postgresql" and led.root is None
        assert str(led.location) == f"postgresql://{role}@/{db}?host={pg_server.socket_dir}"
        _no_secret(repr(led), str(led.location), repr(led.location), repr(led.store), repr(led.blobs))
    # Wrong password, unknown database, no server: typed errors that name the redacted DSN only.
    for bad in (pg_server.dsn(db, user=role, password=SECRET + "x"), pg_server.dsn("nope", user=role, password=SECRET),
                f"postgresql://{role}:{SECRET}@/{db}?host={tmp_path}"):
        with pytest.raises(LedgerUnavailable) as exc:
            Ledger.open(bad, model_fingerprint=FP)
        assert "cannot connect to ledger postgresql://" in str(exc.value)
        _no_secret(str(exc.value), "".join(traceback.format_exception(exc.value)))
    with pytest.raises(LedgerError, match="invalid ledger DSN") as exc:
        Ledger.open(f"postgresql://{role}:{SECRET}@[::1/{db}", model_fingerprint=FP)    # libpq quotes the URI
    assert not isinstance(exc.value, LedgerUnavailable)
    _no_secret(str(exc.value), "".join(traceback.format_exception(exc.value)))
    # From a DSN file (a mounted Secret), for the library and the CLI.
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(dsn + "\n")
    monkeypatch.setenv("EDITSERVE_LEDGER_DSN_FILE", str(dsn_file))
    with Ledger.open(model_fingerprint=FP) as led:
        assert led.head() == 1
    assert cli_main(["ledger", "versions"]) == 0
    out = capsys.readouterr()
    assert "head = version 1" in out.out and f"postgresql://{role}@" in out.out
    assert cli_main(["ledger", "check-ledger", "--ledger", pg_server.dsn("nope", user=role, password=SECRET)]) == 2
    out2 = capsys.readouterr()
    _no_secret(out.out, out.err, out2.out, out2.err, caplog.text)
    monkeypatch.setenv("EDITSERVE_LEDGER_DSN_FILE", str(tmp_path / "missing"))
    with pytest.raises(LedgerError, match="cannot read the ledger DSN file .*missing"):
        Ledger.open(model_fingerprint=FP)
    dsn_file.write_text(f"host=/tmp password={SECRET}")
    monkeypatch.setenv("EDITSERVE_LEDGER_DSN_FILE", str(dsn_file))
    with pytest.raises(LedgerError, match="does not hold a postgresql:// or postgres:// DSN") as exc2:
        Ledger.open(model_fingerprint=FP)
    _no_secret(str(exc2.value), caplog.text)


def test_postgres_open_checks(pg_server, base: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    dsn = pg_server.dsn(pg_server.create_database())
    with pytest.raises(LedgerError, match="no ledger in database"):
        Ledger.open(dsn, create=False)
    with pytest.raises(InvalidRequestError, match="needs the model fingerprint"):
        Ledger.open(dsn)
    Ledger.open(dsn, model_fingerprint=FP).close()
    with pytest.raises(LedgerModelMismatch, match=FP[:16]):
        Ledger.open(dsn, model_fingerprint="1" * 64)
    with Ledger.open(dsn) as led:
        assert led.model_fingerprint == FP and led.nbytes() > 0


def _opener(dsn: str, barrier, out) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    try:
        with Ledger.open(dsn, model_fingerprint=FP, caller=f"p{os.getpid()}") as led:
            out.put(("ok", led.head()))
    except BaseException as exc:  # reported to the test
        out.put(("error", repr(exc)))


def test_postgres_concurrent_openers_create_one_ledger(pg_server) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing as mp

    import psycopg

    ctx = mp.get_context("fork")
    dsn = pg_server.dsn(pg_server.create_database())
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(dsn, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == [("ok", 0)] * 8, results
    with psycopg.connect(dsn) as conn:
        from editserve.ledger.pgschema import PG_MIGRATIONS

        assert conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall() == [
            (m.number, m.name) for m in PG_MIGRATIONS]
        assert conn.execute("SELECT count(*) FROM versions").fetchone()[0] == 1
        assert conn.execute("SELECT kind FROM events").fetchall() == [("create",)]


def test_postgres_later_migration_adds_per_version_state(pg_server, base: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    """The shape of a later migration (per-version editing state in blobs) applies to an existing ledger."""
    import psycopg

    from editserve.ledger import LedgerSchemaError
    from editserve.ledger.migrations import Migration
    from editserve.ledger.pgconn import PgConnection
    from editserve.ledger.pgschema import PG_MIGRATIONS
    from editserve.ledger.postgres import PostgresStore

    dsn = pg_server.dsn(pg_server.create_database())
    with Ledger.open(dsn, model_fingerprint=FP) as led:
        led.commit(synth_patch(1), 0, base=base)
        state_blob = led.blobs.put(b"preserved-key factors of version 1")
    n = len(PG_MIGRATIONS) + 1
    m2 = Migration(n, "version_state", (
        "CREATE TABLE version_state (version integer NOT NULL REFERENCES versions(version), kind text NOT NULL, "
        "blob text NOT NULL REFERENCES blobs(digest), blob_size bigint NOT NULL, PRIMARY KEY (version, kind))",
        "CREATE TRIGGER version_state_append_only BEFORE UPDATE OR DELETE ON version_state "
        "FOR EACH ROW EXECUTE FUNCTION editserve_append_only()",
    ))
    newer = PostgresStore(PgConnection(Ledger.open(dsn).location), migrations=PG_MIGRATIONS + (m2,))
    assert newer.upgrade() == [n] and newer.upgrade() == [] and newer.schema_version() == n
    with newer.conn.transaction() as c:
        c.execute("INSERT INTO version_state VALUES (1, 'alphaedit_keys', %s, 34)", (state_blob,))
    assert newer.check_consistency() == []
    newer.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="append-only"):
            conn.execute("DELETE FROM version_state")
        with pytest.raises(psycopg.Error, match="foreign key"):
            conn.execute("DELETE FROM blobs WHERE digest = %s", (state_blob,))     # referenced: not garbage
    with pytest.raises(LedgerSchemaError, match=rf"\[{n}\]"):                   # this code knows only 1..n-1
        Ledger.open(dsn)


def test_postgres_blob_tables(pg_server, base: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    from editserve.ledger.pgblobs import PgBlobStore

    dsn = pg_server.dsn(pg_server.create_database())
    with Ledger.open(dsn, model_fingerprint=FP) as led:
        led.commit(synth_patch(1), 0, base=base)
        small = PgBlobStore(led.blobs.conn, chunk_bytes=1000)
        data = bytes(range(256)) * 10                                   # 2,560 bytes: 3 chunks
        digest = small.put(data)
        assert small.put(data) == digest and led.blobs.get(digest) == data and small.check(digest, len(data)) is None
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM blob_chunks WHERE digest = %s", (digest,)).fetchone()[0] == 3
            for sql, match in (("UPDATE blob_chunks SET data = 'x'", "append-only"),
                               ("DELETE FROM blob_chunks WHERE seq = 1", "only be deleted with the blob"),
                               ("TRUNCATE blobs CASCADE", "append-only"), ("DELETE FROM head", "append-only"),
                               ("UPDATE blobs SET size = 1", "append-only"),
                               (f"DELETE FROM blobs WHERE digest = '{led.store.patches()[0].blob}'", "foreign key")):
                with pytest.raises(psycopg.Error, match=match):
                    conn.execute(sql)
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute("UPDATE blob_chunks SET data = 'x' || data WHERE digest = %s AND seq = 1", (digest,))
        assert small.check(digest, len(data)) == f"size {len(data) + 1} != {len(data)}"
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("UPDATE blob_chunks SET data = substr(data, 2) WHERE digest = %s AND seq = 1", (digest,))
            conn.execute("UPDATE blob_chunks SET data = 'y' || substr(data, 2) WHERE digest = %s AND seq = 2", (digest,))
        assert small.check(digest, len(data), full=False) is None
        assert small.check(digest, len(data)) == "checksum mismatch"   # multi-chunk: hashed here, not on the server
        with pytest.raises(LedgerCorrupt, match="corrupt"):
            small.get(digest)
        assert led.collect_garbage(min_age_s=0) == [digest]
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM blob_chunks WHERE digest = %s", (digest,)).fetchone()[0] == 0
        led.check_integrity(deep=True)


def test_postgres_disabled_trigger_fails_the_integrity_check(pg_server, base: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    dsn = pg_server.dsn(pg_server.create_database())
    with Ledger.open(dsn, model_fingerprint=FP) as led:
        led.commit(synth_patch(1), 0, base=base)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
    with pytest.raises(LedgerCorrupt, match=r"append-only triggers disabled: \['events_append_only'\]"):
        Ledger.open(dsn)


def test_postgres_server_down_is_unavailable_and_nothing_is_lost(base: dict[str, torch.Tensor]) -> None:
    from editserve.ledger import LedgerUnavailable
    from tests._pg import TempPostgres

    server = TempPostgres(fsync=False).start()
    try:
        dsn = server.dsn(server.create_database())
        with Ledger.open(dsn, model_fingerprint=FP) as led:
            led.commit(synth_patch(1), 0, base=base, idempotency_key="k1")
            server.stop_server()
            for call in (led.head, lambda: led.commit(synth_patch(2), 1, base=base, idempotency_key="k2"),
                         lambda: led.rollback(0)):
                with pytest.raises(LedgerUnavailable, match="ledger postgresql://"):
                    call()
            server.start_server()
            # The same connection object reconnects; the retried commit lands once.
            assert led.head() == 1
            assert led.commit(synth_patch(2), 1, base=base, idempotency_key="k2") == 2
            assert led.commit(synth_patch(2), 1, base=base, idempotency_key="k2") == 2
            led.check_integrity(deep=True)
            assert [v.version for v in led.versions()] == [0, 1, 2]
    finally:
        server.stop()


def test_postgres_ledger_survives_fork(pg_server, base: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    """A child forked with an open ledger connects anew; the parent's session is untouched."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with Ledger.open(pg_server.dsn(pg_server.create_database()), model_fingerprint=FP) as led:
        led.commit(synth_patch(1), 0, base=base)
        child = ctx.Process(target=lambda: os._exit(0 if led.commit(synth_patch(2), 1, base=base) == 2 else 1))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert led.head() == 2 and led.commit(synth_patch(3), 2, base=base) == 3
