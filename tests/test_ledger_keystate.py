"""Issue 16: the preserved-keys state (AlphaEdit) is part of a ledger version, on SQLite and PostgreSQL.

Three alphaedit edits are computed in sequence on a tiny model, each with the state read back from
the ledger at the head, and committed with their key blocks. The state at every version is the
blocks of its active patches in commit order; rollback restores it exactly (torch.equal), a fresh
open (a restart) rebuilds it, export/import carry it, and a revert drops the reverted patch's blocks.
"""

from __future__ import annotations

import sqlite3

import pytest
import torch
from tests._ledger_util import Backend, backend  # noqa: F401
from tests._pg import pg_server  # noqa: F401
from tests.tiny import TEXT, tiny_model, tiny_tokenizer

from editserve.editing import EditRequest, apply_patch
from editserve.editing.corpus import load_corpus
from editserve.editing.edit import compute_edit
from editserve.editing.model import fingerprint
from editserve.ledger import Ledger
from editserve.ledger.sqlite import SQLITE_MIGRATIONS
from editserve.ledger.transfer import export_patch, export_version, import_patch, import_version

HP = {"stats": {"n_tokens": 200, "seq_len": 20}, "prefixes": {"n_prefixes": 0}, "nullspace_threshold": 1e-3,
      "alpha": 1.0,
      "value": {"max_steps": 10, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}}
LAYERS = [1, 2]
REQS = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome"),
        EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English"),
        EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new=" piano")]


def _same(a, b) -> bool:
    return (len(a.blocks) == len(b.blocks) and
            all(x.tag == y.tag and x.layer == y.layer and torch.equal(x.keys, y.keys) for x, y in zip(a.blocks, b.blocks)))


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """Three sequential alphaedit edits on a tiny llama: [(patch, own blocks, state after)], base weights."""
    tmp = tmp_path_factory.mktemp("keystate")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDITSERVE_HOME", str(tmp / "home"))
    try:
        corpus_file = tmp / "corpus.txt"
        corpus_file.write_text("\n".join(TEXT * 3))
        corpus = load_corpus(corpus_file)
        model, tok = tiny_model("llama"), tiny_tokenizer()
        params = dict(model.named_parameters())
        base = None
        state = None
        out = []
        for r in REQS:
            res = compute_edit(model, tok, [r], method="alphaedit", layers=LAYERS, hparams=HP, corpus=corpus,
                               preserved=state)
            if base is None:
                base = {d.name: params[d.name].detach().clone() for d in res.patch.deltas}
            apply_patch(model, res.patch)
            out.append((res.patch, res.preserved.for_patch(res.patch.digest), res.preserved))
            state = res.preserved
        return out, base, fingerprint(model)
    finally:
        mp.undo()


def _commit_all(ledger, edits, base):
    for i, (patch, own, _state) in enumerate(edits):
        # the state a sidecar reads back at the head is the one the edit was computed with
        assert _same(ledger.preserved_keys(), edits[i - 1][2] if i else own.select([]))
        ledger.commit(patch, expected_head=ledger.head(), base=base, preserved=own)


def test_state_is_part_of_a_version(backend: Backend, edits, tmp_path):
    edits, base, fp = edits
    loc = backend.location()
    with Ledger.open(loc, fp, create=True) as ledger:
        _commit_all(ledger, edits, base)
        assert ledger.head() == 3
        for v in (1, 2, 3):
            assert _same(ledger.preserved_keys(v), edits[v - 1][2])
        assert ledger.preserved_keys(0).blocks == ()
        ledger.rollback(1)
        assert _same(ledger.preserved_keys(), edits[0][2])          # exactly the state at 1
        ledger.rollback(3)
        # revert the middle edit (no rebase): its blocks leave the state, the others stay in order
        res = ledger.revert(2)
        want = edits[2][2].select([edits[0][0].digest, edits[2][0].digest])
        assert _same(ledger.preserved_keys(res.version), want)
        exp = export_version(ledger, 3, tmp_path / "v3")
        one = export_patch(ledger, 2, tmp_path / "p2")
        assert (exp / "keys.safetensors").exists() and (one / "keys.safetensors").exists()
    # a restart (fresh open, empty caches) rebuilds the same state from the stored blobs
    with Ledger.open(loc, fp) as again:
        assert _same(again.preserved_keys(3), edits[2][2])
        assert again.collect_garbage(min_age_s=0.0) == []            # the key blobs are referenced
    # export/import round trip into another ledger carries the blocks bit for bit
    with Ledger.open(backend.location(), fp, create=True) as other:
        v = import_version(other, exp, expected_head=0, base=base)
        assert _same(other.preserved_keys(v), edits[2][2])
        v2 = other.rollback(0)
        v2 = import_patch(other, one, expected_head=0, base=base)
        assert _same(other.preserved_keys(v2), edits[1][1])


def test_state_rows_are_append_only_and_tampered_export_refused(backend: Backend, edits, tmp_path):
    edits, base, fp = edits
    with Ledger.open(backend.location(), fp, create=True) as ledger:
        _commit_all(ledger, edits[:1], base)
        assert ledger.store.schema_version() >= 2
        msg = backend.raw_write_fails(ledger, "DELETE FROM patch_state")
        assert "append-only" in msg
        d = export_patch(ledger, 1, tmp_path / "p1")
    data = bytearray((d / "keys.safetensors").read_bytes())
    data[-2] ^= 0x11
    (d / "keys.safetensors").write_bytes(bytes(data))
    from editserve.ledger.errors import ImportRejected

    with Ledger.open(backend.location(), fp, create=True) as other:
        with pytest.raises(ImportRejected, match="keys.safetensors"):
            import_patch(other, d, expected_head=0, base=base)
        assert other.head() == 0


def test_sqlite_ledger_at_schema_1_is_upgraded(tmp_path, edits):
    """A ledger written before migration 2 opens, gets the patch_state table, and old patches have no state."""
    edits, base, fp = edits
    root = tmp_path / "old"
    with Ledger.open(root, fp, create=True) as ledger:
        ledger.commit(edits[0][0], expected_head=0, base=base)       # a ROME-era commit: no state
    conn = sqlite3.connect(str(root / "ledger.sqlite3"))
    conn.execute("DROP TABLE patch_state")
    conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    conn.commit()
    conn.close()
    with Ledger.open(root, fp) as ledger:
        assert ledger.store.schema_version() == len(SQLITE_MIGRATIONS) == 3
        assert ledger.preserved_keys().blocks == ()
        ledger.commit(edits[1][0], expected_head=1, base=base, preserved=edits[1][1])
        assert _same(ledger.preserved_keys(), edits[1][1])


def test_an_upload_carries_the_keys_or_is_refused(backend: Backend, edits, tmp_path):
    """What the API's ImportPatch / StageCandidate receive (`control.validate.patch_upload`): an
    export's three files; the keys travel bit for bit, and an upload that drops them, or sends keys
    its manifest does not list, is refused before anything is written."""
    from editserve.control.gen import pb2
    from editserve.control.validate import patch_upload
    from editserve.ledger.errors import ImportRejected
    from editserve.ledger.transfer import PatchFiles

    edits, base, fp = edits
    with Ledger.open(backend.location(), fp, create=True) as ledger:
        _commit_all(ledger, edits[:2], base)
        files = PatchFiles.read(export_patch(ledger, 2, tmp_path / "p2"))
    assert files.keys and files.factors and files.manifest_json
    req = pb2.ImportPatchRequest(manifest_json=files.manifest_json, factors=files.factors, keys=files.keys)
    got = patch_upload(req)
    assert got == files
    with Ledger.open(backend.location(), fp, create=True) as other:
        v = import_patch(other, got.write(tmp_path / "upload"), expected_head=0, base=base)
        assert _same(other.preserved_keys(v), edits[1][1])
        with pytest.raises(ImportRejected, match=r"lists keys\.safetensors .*'keys' is empty"):
            patch_upload(pb2.ImportPatchRequest(manifest_json=files.manifest_json, factors=files.factors))
        # a directory that lists keys but lacks them (an old upload) is refused by the reader too
        bare = tmp_path / "bare"
        PatchFiles(files.manifest_json, files.factors).write(bare)
        other.rollback(0)
        with pytest.raises(ImportRejected, match="keys.safetensors but has none"):
            import_patch(other, bare, expected_head=0, base=base)
        assert other.head() == 0 and _same(other.preserved_keys(v), edits[1][1])      # nothing written
    # keys for a patch whose manifest lists none (a ROME export, say) are refused, naming their size
    import json

    manifest = json.loads(files.manifest_json)
    del manifest["export"]["files"]["keys.safetensors"]
    with pytest.raises(ImportRejected, match=rf"'keys' has {len(files.keys)} bytes but the manifest lists no"):
        patch_upload(pb2.StageCandidateRequest(manifest_json=json.dumps(manifest).encode(), factors=files.factors,
                                               keys=files.keys))
