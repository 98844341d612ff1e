"""Engine pieces that run without a vLLM server: the wire format, per-rank materialisation,
checksums, plugin configuration, the `editserve serve` argument handling and the swap
verification rules. The server tests are in tests/test_engine_server.py."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.arch import Layout
from editserve.editing.requests import EditRequest
from editserve.engine.errors import ChecksumMismatch, SwapFailed
from editserve.engine.plugin import _editable_pattern, is_editable, parse_layers
from editserve.engine.swap import check_mode, verify
from editserve.engine.wire import (
    ApplyMessage,
    RankReport,
    WireDelta,
    decode_tensor,
    deltas_of,
    encode_tensor,
    expected_rank_checksums,
    message_for,
    rank_range,
    weight_checksum,
)
from editserve.engine.worker import accumulate_slice
from editserve.errors import InvalidRequestError, PatchMismatchError
from editserve.ledger import tensor_sha256
from editserve.patches import Patch, WeightDelta, materialize

NAME = "model.layers.5.mlp.down_proj.weight"


def _patch(seed: int, rank: int = 1, shape: tuple[int, int] = (48, 96), name: str = NAME) -> Patch:
    g = torch.Generator().manual_seed(seed)
    d = WeightDelta(name=name, layer=int(name.split(".")[2]), u=torch.randn(shape[0], rank, generator=g),
                    v=torch.randn(shape[1], rank, generator=g))
    req = EditRequest(prompt="{} is located in the city of", subject=f"Place {seed}", target_new=" Rome")
    return Patch(deltas=(d,), requests=(req,), method="rome", hparams={}, model_fingerprint="f" * 64, family="llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_wire_roundtrip_is_exact(dtype):
    t = torch.randn(7, 5).to(dtype)
    back = decode_tensor(encode_tensor(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.contiguous().view(torch.uint8))


def test_tensor_wire_takes_a_one_column_factor_with_a_non_unit_stride():
    """One edit's AlphaEdit/MEMIT factor U = Rᵀ is [d_out, 1] with strides (1, d_out): "contiguous"
    to torch, yet not byte-viewable (this failed every AlphaEdit commit through the server)."""
    u = torch.randn(1, 576).T
    assert u.is_contiguous() and u.stride() == (1, 576)
    back = decode_tensor(encode_tensor(u))
    assert back.shape == (576, 1) and torch.equal(back, u)


def test_decode_rejects_bad_wire_tensors():
    good = encode_tensor(torch.ones(2, 3))
    with pytest.raises(PatchMismatchError, match="needs 24 bytes"):
        decode_tensor({**good, "data": good["data"][:-4]})
    with pytest.raises(PatchMismatchError, match="unknown dtype 'int8'"):
        decode_tensor({**good, "dtype": "int8"})
    with pytest.raises(PatchMismatchError, match="malformed"):
        decode_tensor({"data": b""})


def test_apply_message_roundtrip_keeps_order_and_keys():
    patches = [_patch(1), _patch(2, rank=3), _patch(3, name="model.layers.7.mlp.down_proj.weight")]
    msg = message_for(4, "llama", patches)
    back = ApplyMessage.from_wire(msg.to_wire())
    assert back.version == 4 and back.names == (NAME, "model.layers.7.mlp.down_proj.weight")
    layer5 = back.matrices[0]
    assert [d.key for d in layer5.deltas] == [f"{patches[0].digest}:0", f"{patches[1].digest}:0"]
    assert torch.equal(layer5.deltas[1].v, patches[1].deltas[0].v)
    with pytest.raises(PatchMismatchError, match="family 'llama'"):
        message_for(1, "gpt2", patches)


def test_wire_rejects_non_float32_factors():
    wire = message_for(1, "llama", [_patch(1)]).to_wire()
    wire["matrices"][0]["deltas"][0]["u"] = encode_tensor(torch.ones(48, 1, dtype=torch.float16))
    with pytest.raises(PatchMismatchError, match="must be float32"):
        ApplyMessage.from_wire(wire)


def test_checksum_is_the_ledgers():
    t = torch.randn(12, 10)
    assert weight_checksum(t) == tensor_sha256(t)
    assert weight_checksum(t[:, 5:]) == tensor_sha256(t[:, 5:].contiguous())
    assert weight_checksum(t) != weight_checksum(t.to(torch.bfloat16))


def test_rank_range_splits_the_input_dimension():
    assert [rank_range(96, 4, r) for r in range(4)] == [(0, 24), (24, 48), (48, 72), (72, 96)]
    with pytest.raises(PatchMismatchError, match="does not split evenly"):
        rank_range(10, 4, 0)
    with pytest.raises(PatchMismatchError, match="out of range"):
        rank_range(96, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_rank_slices_equal_slices_of_the_full_materialisation(dtype, tp):
    """What a worker rebuilds for its slice, incrementally or from scratch, is bit for bit the
    slice of `patches.materialize` of the full matrix (the ledger's expected value)."""
    patches = [_patch(10), _patch(11, rank=4), _patch(12)]
    msg = message_for(3, "llama", patches)
    deltas = msg.matrices[0].deltas
    base = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    full = materialize(base, [d for p in patches for d in p.deltas], Layout.OUT_IN)
    expected = expected_rank_checksums({NAME: full}, tp)
    for r in range(tp):
        lo, hi = rank_range(96, tp, r)
        scratch = accumulate_slice(base[:, lo:hi].to(torch.float32, copy=True), deltas, lo, hi, 96).to(dtype)
        acc = accumulate_slice(base[:, lo:hi].to(torch.float32, copy=True), deltas[:1], lo, hi, 96)
        incremental = accumulate_slice(acc, deltas[1:], lo, hi, 96).to(dtype)
        assert torch.equal(scratch, full[:, lo:hi])
        assert torch.equal(incremental, full[:, lo:hi])
        assert weight_checksum(scratch) == expected[(NAME, r)]
        sliced = materialize(base[:, lo:hi], deltas_of(msg.matrices[0], lo, hi), Layout.OUT_IN)
        assert torch.equal(sliced, full[:, lo:hi])


def test_accumulate_rejects_mismatched_shapes():
    delta = WireDelta(key="k:0", u=torch.ones(4, 1), v=torch.ones(6, 1))
    with pytest.raises(PatchMismatchError, match="k:0"):
        accumulate_slice(torch.zeros(5, 6), [delta], 0, 6, 6)


def test_editable_layers_and_prefix_matching():
    assert parse_layers(None) is None and parse_layers("all") is None
    assert parse_layers("3-5, 12") == frozenset({3, 4, 5, 12})
    for bad in ("3-x", "5-3", "a"):
        with pytest.raises(InvalidRequestError):
            parse_layers(bad)
    pattern = _editable_pattern()
    assert is_editable("model.layers.5.mlp.down_proj", None, pattern)
    assert is_editable("language_model.model.layers.5.mlp.down_proj", frozenset({5}), pattern)
    assert not is_editable("model.layers.5.mlp.down_proj", frozenset({4}), pattern)
    assert is_editable("transformer.h.3.mlp.c_proj", None, pattern)
    assert is_editable("gpt_neox.layers.2.mlp.dense_4h_to_h", None, pattern)
    for other in ("model.layers.5.mlp.gate_up_proj", "model.layers.5.self_attn.o_proj", "lm_head",
                  "model.layers.5.mlp.down_proj.extra"):
        assert not is_editable(other, None, pattern)


def _report(tp_rank: int, sums: dict[str, str], error: str | None = None) -> RankReport:
    return RankReport(rank=tp_rank, tp_rank=tp_rank, tp_size=2, version=1, checksums=sums, error=error)


def test_verify_requires_every_rank_and_matching_checksums():
    expected = {(NAME, 0): "a" * 64, (NAME, 1): "b" * 64}
    verify([_report(0, {NAME: "a" * 64}), _report(1, {NAME: "b" * 64})], expected, 2)
    with pytest.raises(ChecksumMismatch, match="rank 1"):
        verify([_report(0, {NAME: "a" * 64}), _report(1, {NAME: "c" * 64})], expected, 2)
    with pytest.raises(SwapFailed, match=r"rank\(s\) \[1\]"):
        verify([_report(0, {NAME: "a" * 64})], expected, 2)
    with pytest.raises(SwapFailed, match="NonFiniteError"):
        verify([_report(0, {NAME: "a" * 64}), _report(1, {}, error="NonFiniteError: inf")], expected, 2)
    with pytest.raises(InvalidRequestError, match="pause mode"):
        check_mode("drain")


def test_serve_arguments_pass_through_to_vllm(monkeypatch):
    from editserve.commands.serve import split_args
    from editserve.engine.launch import ServeOptions, plugins_value, with_default_model

    own, rest = split_args(["--ledger", "/x", "--pause-mode=wait", "m", "--port", "8000", "--ledger", "y"])
    assert own == {"ledger": "/x", "pause_mode": "wait"}
    assert rest == ["m", "--port", "8000", "--ledger", "y"]
    with pytest.raises(InvalidRequestError, match="needs a value"):
        split_args(["--ledger"])
    assert with_default_model(["mymodel", "--port", "1"]) == ["mymodel", "--port", "1"]
    assert with_default_model(["--model", "m", "--port", "1"]) == ["--model", "m", "--port", "1"]
    assert plugins_value(None) == "editserve"
    assert plugins_value("foo,editserve") == "foo,editserve"
    assert plugins_value("foo") == "foo,editserve"
    env = ServeOptions(ledger="/l", pause_mode="wait", sidecar_threads=2, editable_layers="5").environment()
    assert env == {"EDITSERVE_LEDGER": "/l", "EDITSERVE_PAUSE_MODE": "wait", "EDITSERVE_SIDECAR_THREADS": "2",
                   "EDITSERVE_EDITABLE_LAYERS": "5"}


def test_cli_serve_subcommand_takes_vllm_flags_verbatim():
    from editserve.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8000", "--tensor-parallel-size", "2"])
    assert args.args == ["--port", "8000", "--tensor-parallel-size", "2"]


def test_control_settings_from_env():
    from editserve.engine.control import ControlSettings

    s = ControlSettings.from_env("m", 2, {"EDITSERVE_LEDGER": "/l", "EDITSERVE_PAUSE_MODE": "wait",
                                          "EDITSERVE_SIDECAR_THREADS": "3"})
    assert (s.ledger_root, s.pause_mode, s.sidecar_threads, s.tensor_parallel_size) == ("/l", "wait", 3, 2)
    with pytest.raises(InvalidRequestError, match="pause mode"):
        ControlSettings.from_env("m", 1, {"EDITSERVE_PAUSE_MODE": "sometimes"})
    with pytest.raises(InvalidRequestError, match="EDITSERVE_SIDECAR_THREADS"):
        ControlSettings.from_env("m", 1, {"EDITSERVE_SIDECAR_THREADS": "many"})
    # an unknown default method fails the start, naming it (before, the first edit that named none)
    with pytest.raises(InvalidRequestError, match="EDITSERVE_DEFAULT_METHOD='romeo'"):
        ControlSettings.from_env("m", 1, {"EDITSERVE_DEFAULT_METHOD": "romeo"})
    assert ControlSettings.from_env("m", 1, {"EDITSERVE_DEFAULT_METHOD": "rome"}).default_method == "rome"
    d = ControlSettings.from_env("m", 1, {})
    assert (d.compute_timeout_s, d.read_timeout_s, d.sync_timeout_s, d.base_cache_bytes, d.sidecar_retry_s) == \
        (900, 600, 300, 512 << 20, 30)
    t = ControlSettings.from_env("m", 1, {"EDITSERVE_SIDECAR_TIMEOUT_S": "30", "EDITSERVE_SIDECAR_READ_TIMEOUT_S": "5",
                                          "EDITSERVE_SIDECAR_SYNC_TIMEOUT_S": "7.5", "EDITSERVE_BASE_CACHE_MB": "64",
                                          "EDITSERVE_SIDECAR_RETRY_S": "120"})
    assert (t.compute_timeout_s, t.read_timeout_s, t.sync_timeout_s, t.base_cache_bytes, t.sidecar_retry_s) == \
        (30, 5, 7.5, 64 << 20, 120)
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(InvalidRequestError, match="EDITSERVE_SIDECAR_TIMEOUT_S"):
            ControlSettings.from_env("m", 1, {"EDITSERVE_SIDECAR_TIMEOUT_S": bad})
        with pytest.raises(InvalidRequestError, match="EDITSERVE_SIDECAR_RETRY_S"):
            ControlSettings.from_env("m", 1, {"EDITSERVE_SIDECAR_RETRY_S": bad})


def test_transposed_materialisation_is_bit_identical():
    """GPT-2's Conv1D weights are [in, out] in Hugging Face and [out, in] in vLLM: materialising
    in either orientation gives the same bits (what the sidecar/ledger vs engine comparison assumes)."""
    g = torch.Generator().manual_seed(0)
    for rank in (1, 4):
        base = torch.randn(64, 256, generator=g)
        deltas = [WeightDelta(name="w", layer=0, u=torch.randn(64, rank, generator=g),
                              v=torch.randn(256, rank, generator=g))]
        hf = materialize(base.t().contiguous(), deltas, Layout.IN_OUT)
        assert torch.equal(hf.t(), materialize(base, deltas, Layout.OUT_IN))


def test_sidecar_process_mirrors_ledger_in_vllm_orientation(tmp_path):
    """A real sidecar process on a tiny GPT-2 (Conv1D, HF layout [in, out]): after a sync its
    checksums are those of the ledger's materialised weight transposed to vLLM's [out, in] and
    cut into 2 tensor-parallel slices; errors come back as their own types."""
    import json

    from editserve.editing.model import FINGERPRINT_FILE, weights_fingerprint
    from editserve.engine.errors import SidecarError
    from editserve.engine.sidecar import SidecarClient, SidecarConfig
    from editserve.ledger import Ledger, VersionNotFound
    from tests.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    ckpt = tmp_path / "tiny-gpt2"
    model.save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    fp = weights_fingerprint(model.state_dict())
    (ckpt / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": "tiny-gpt2"}))
    name = "transformer.h.1.mlp.c_proj.weight"
    hf_weight = model.state_dict()[name].clone()                 # [d_in=128, d_out=32]
    g = torch.Generator().manual_seed(3)
    delta = WeightDelta(name=name, layer=1, u=torch.randn(32, 2, generator=g), v=torch.randn(128, 2, generator=g))
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    patch = Patch(deltas=(delta,), requests=(req,), method="memit", hparams={}, model_fingerprint=fp, family="gpt2")
    with Ledger.open(tmp_path / "ledger", fp) as ledger:
        ledger.weights.ensure_base(name, hf_weight, Layout.IN_OUT)
        version = ledger.commit(patch, expected_head=0)
        full = ledger.weights.materialize(version)[name].t()              # vLLM orientation [32, 128]
    client = SidecarClient(SidecarConfig(checkpoint=str(ckpt), device="cpu", threads=1))
    try:
        ready = client.wait_ready()
        assert ready.family == "gpt2" and ready.fingerprint == fp
        client.open_ledger(str(tmp_path / "ledger"))
        synced = client.sync(version, tp_size=2)
        assert synced.active == (patch.digest,)
        assert synced.checksums == {(name, 0): tensor_sha256(full[:, :64]), (name, 1): tensor_sha256(full[:, 64:])}
        want_drift = float(torch.linalg.vector_norm(full.t() - hf_weight) / torch.linalg.vector_norm(hf_weight))
        assert synced.drift.keys() == {1} and synced.drift[1] == pytest.approx(want_drift, rel=1e-4)
        back = client.sync(0, tp_size=1, names=(name,))
        assert back.checksums == {(name, 0): tensor_sha256(hf_weight.t())} and back.drift == {1: 0.0}
        with pytest.raises(VersionNotFound):
            client.sync(99, tp_size=1)
        # A stopped sidecar: the call ends at its deadline, and the process is killed (not left stopped).
        import os
        import signal
        import time

        from editserve.engine.errors import SidecarTimeout

        pid = client.pid
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(SidecarTimeout, match="Sync ran past its deadline of 2 s") as e:
            client.sync(version, tp_size=1, timeout_s=2.0)
        assert 1.9 <= time.monotonic() - t0 < 30 and e.value.call == "Sync" and e.value.timeout_s == 2.0
        assert not client.alive
    finally:
        client.close()
    assert not client.alive
    with pytest.raises(SidecarError):
        client.sync(0, tp_size=1)


def test_probe_scores_for_the_gauges_from_gate_and_sidecar_reports():
    """The probe gauges take the gate's CounterFact fractions when the gate ran, else the
    sidecar's own scores; unmeasured values (absent, -1, NaN) are None (the gauge shows NaN)."""
    import math

    from editserve.engine.control import probe_scores

    gate = {"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood_after": 0.8, "canary_kl_mean": 0.012}
    assert probe_scores({"scores": {"efficacy": 0.0}, "canary_kl": 0.3, "gate": gate}) == (1.0, 0.5, 0.8, 0.012)
    assert probe_scores({"gate": {**gate, "paraphrase": -1.0, "neighbourhood_after": -1.0,
                                  "canary_kl_mean": math.nan}}) == (1.0, None, None, None)
    assert probe_scores({"scores": {"efficacy": 1.0, "neighbourhood": 0.5}, "canary_kl": 0.02}) == (1.0, None, 0.5, 0.02)
    assert probe_scores({"scores": {"efficacy": 0.5}}) == (0.5, None, None, None)


def test_base_copy_cache_is_bounded_lru(tmp_path):
    """The API server keeps at most `base_cache_bytes` of the ledger's base copies (least recently
    used first out); a copy larger than the whole bound is read but not kept."""
    from editserve.engine.control import ControlPlane, ControlSettings
    from editserve.engine.expected import ExpectedChecksums
    from editserve.ledger import Ledger

    fp = "f" * 64
    with Ledger.open(tmp_path / "ledger", fp) as ledger:
        for i in range(3):
            ledger.weights.ensure_base(f"w{i}", torch.full((64, 64), float(i)), Layout.OUT_IN)     # 16 KiB each
        ledger.weights.ensure_base("big", torch.zeros(256, 256), Layout.OUT_IN)                       # 256 KiB
        cache = ExpectedChecksums(tensor_parallel_size=2, base_cache_bytes=40 << 10, ledger=ledger)
        for name in ("w0", "w1", "w0", "w2"):
            assert torch.equal(cache.base(name)[0], ledger.weights.base_copy(name)[0])
        assert cache.cached_base_names == ["w0", "w2"] and cache.cached_base_bytes == 32 << 10
        assert cache.base("big")[0].shape == (256, 256) and "big" not in cache.cached_base_names
        assert cache.cached_base_bytes <= 40 << 10
        sums = cache.of([], ["w1"])
        assert sums == {("w1", 0): tensor_sha256(torch.full((64, 32), 1.0)), ("w1", 1): tensor_sha256(torch.full((64, 32), 1.0))}
        control = ControlPlane(None, ControlSettings(model=None, base_cache_bytes=1 << 20))
        assert control.expected.base_cache_bytes == 1 << 20


def test_one_meaning_of_a_probe_outcome():
    """The sidecar's report counts a probe as the gate and the evaluation do (new vs true target,
    mean per-token log-probability after the edit); a probe without a true target has no outcome."""
    from editserve.editing.scoring import fact_success
    from editserve.engine.sidecar.process import ProbePrompt, _probe_report

    assert fact_success("efficacy", -1.0, -2.0) and not fact_success("efficacy", -2.0, -1.0)
    assert fact_success("neighbourhood", -2.0, -1.0) and not fact_success("paraphrase", -1.0, -1.0)
    with pytest.raises(ValueError, match="unknown probe kind"):
        fact_success("canary", 0.0, 0.0)
    probes = [ProbePrompt("a", " x", " y", "efficacy"), ProbePrompt("b", " x", " y", "efficacy"),
              ProbePrompt("c", " x", None, "efficacy")]
    before = [(-3.0, -1.0), (-3.0, -1.0), (-3.0, None)]
    after = [(-0.5, -2.0), (-1.5, -1.0), (-0.1, None)]          # won, lost, more likely but no true target
    report = _probe_report(probes, before, after)
    assert report["scores"] == {"efficacy": 0.5}
    assert [r["success"] for r in report["probes"]] == [True, False, None]
