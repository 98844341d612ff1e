"""AlphaEdit (null-space-constrained editing) on tiny random models and on random matrices:
the update lies in the range of P, keeps preserved keys' outputs, satisfies the least-squares
normal equations, is deterministic, and the preserved-keys state is a pure value."""

from __future__ import annotations

import pytest
import torch

from editserve.editing import EditRequest, apply_patch, remove_patch
from editserve.editing.alphaedit import PreservedKeys, alphaedit_factors
from editserve.editing.corpus import load_corpus
from editserve.editing.edit import compute_edit, compute_patch
from editserve.editing.model import fingerprint
from editserve.editing.nullspace import cached_null_space, null_space, null_space_use
from editserve.editing.stats import layer_stats, stats_key
from editserve.editing.hparams import StatsParams
from editserve.errors import InvalidRequestError
from tests.tiny import TEXT, tiny_model, tiny_tokenizer

STATS = {"n_tokens": 200, "seq_len": 20}
FAST = {"stats": STATS, "prefixes": {"n_prefixes": 0},
        "value": {"max_steps": 30, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}}
LAYERS = [1, 2]
REQS = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome"),
        EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English")]
LATER = [EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new=" piano")]


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(TEXT * 3))
    return load_corpus(f)


def _random_problem(seed=0, d_in=24, d_out=16, n=3, n_p=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3, d_in, dtype=torch.float64)
    cov = x.T @ x / 200
    return (cov, torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g),
            torch.randn(d_in, n_p, generator=g, dtype=torch.float64))


def test_null_space_is_a_projection_onto_small_eigen_directions():
    cov, *_ = _random_problem()
    evals = torch.linalg.eigvalsh(cov)
    thr = float(evals[9] + evals[10]) / 2                     # keeps exactly the 10 smallest (not on an eigenvalue:
    #                                                           another solver may round evals[10] below it)
    proj = null_space(cov, thr)
    p = proj.p
    assert proj.kept == 10 and p.dtype == torch.float64
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T, atol=1e-12)
    assert abs(torch.trace(p).item() - 10) < 1e-8
    # ordinary keys' energy in range(P) is the kept eigenvalues' share
    assert abs(torch.trace(p @ cov).item() / torch.trace(cov).item() - proj.kept_energy) < 1e-8
    with pytest.raises(InvalidRequestError, match="nullspace_threshold"):
        null_space(cov, -1.0)


def test_null_space_use_counts_the_directions_committed_keys_take():
    """Keys inside range(P) take one direction each while their energy there exceeds the bound; keys
    ordinary text already uses (outside range(P)) take none; past m keys every direction is taken."""
    cov, *_ = _random_problem()
    evals, evecs = torch.linalg.eigh(cov)
    proj = null_space(cov, float(evals[10]))                  # range(P): the 10 smallest eigen-directions
    inside, outside = evecs[:, :10], evecs[:, 10:]            # [24, 10], [24, 14]
    g = torch.Generator().manual_seed(3)
    keys = inside[:, :4] @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 0.5], dtype=torch.float64))   # energies 25, 16, 9, .25
    use = null_space_use(proj, keys, bound=1.0)
    assert (use.directions, use.committed_keys, use.taken) == (10, 4, 3) and use.ratio == pytest.approx(0.3)
    assert null_space_use(proj, keys, bound=20.0).taken == 1
    # keys outside range(P) cost AlphaEdit nothing: no direction taken, however large
    far = outside[:, :5] * 100.0
    assert null_space_use(proj, far, bound=1.0).taken == 0
    # more keys than d_in (the K Kᵀ branch) fill range(P) and never count more than its m directions
    many = torch.randn(24, 60, generator=g, dtype=torch.float64) * 10
    full = null_space_use(proj, many, bound=1.0)
    assert full.taken == 10 and full.ratio == 1.0 and full.committed_keys == 60
    assert null_space_use(proj, None, bound=1.0).taken == 0 and null_space_use(proj, keys[:, :0], 1.0).ratio == 0.0
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(InvalidRequestError, match="bound"):
            null_space_use(proj, keys, bound=bad)
    with pytest.raises(InvalidRequestError, match="d_in=5"):
        null_space_use(proj, torch.ones(5, 2, dtype=torch.float64), bound=1.0)


def test_factors_normal_equations_range_and_preservation():
    cov, k1, r, kp = _random_problem()
    p = null_space(cov, float(torch.linalg.eigvalsh(cov)[12])).p
    alpha = 0.5
    u, v = alphaedit_factors(p, k1, r, kp @ kp.T, alpha)
    d = (u.double() @ v.double().T)                           # [d_out, d_in]
    assert u.dtype == torch.float32 and v.dtype == torch.float32 and u.shape[1] == v.shape[1] == 3
    assert torch.allclose(d @ p, d, atol=1e-5)                # lies in the range of P
    k = k1.double().T
    m = kp @ kp.T + k @ k.T
    lhs = d @ (m + alpha * torch.eye(m.shape[0], dtype=torch.float64)) @ p
    rhs = r.double().T @ k.T @ p
    assert torch.allclose(lhs, rhs, atol=1e-4 * rhs.abs().max()), (lhs - rhs).abs().max()   # normal equations
    # preserved keys: the projected update barely moves them compared with the new keys
    d0 = alphaedit_factors(p, k1, r, torch.zeros_like(m), alpha)
    d0 = d0[0].double() @ d0[1].double().T
    moved_p = (d @ kp).norm() / kp.norm()
    assert moved_p < 0.5 * (d0 @ kp).norm() / kp.norm()       # the K_p term protects them
    with pytest.raises(InvalidRequestError, match="alpha"):
        alphaedit_factors(p, k1, r, m, 0.0)


def test_factors_with_covariance_penalty():
    """λ > 0: still in range(P), satisfies D(M + λC + αI)P = R K₁ᵀ P; with P = I, no preserved keys and
    α → 0 it is MEMIT's update R K₁ᵀ(λC + K₁K₁ᵀ)⁻¹; λ = 0 is the paper's update."""
    from editserve.editing.memit import memit_factors

    cov, k1, r, kp = _random_problem()
    p = null_space(cov, float(torch.linalg.eigvalsh(cov)[12])).p
    alpha, lam = 0.5, 30.0
    u, v = alphaedit_factors(p, k1, r, kp @ kp.T, alpha, cov, lam)
    d = u.double() @ v.double().T
    assert torch.allclose(d @ p, d, atol=1e-5)
    k = k1.double().T
    m = kp @ kp.T + k @ k.T + lam * cov
    lhs = d @ (m + alpha * torch.eye(m.shape[0], dtype=torch.float64)) @ p
    rhs = r.double().T @ k.T @ p
    assert torch.allclose(lhs, rhs, atol=1e-4 * rhs.abs().max())
    # the penalty moves ordinary keys (C-weighted) less than the paper's update does
    u0, v0 = alphaedit_factors(p, k1, r, kp @ kp.T, alpha)
    d0 = u0.double() @ v0.double().T
    assert torch.trace(d @ cov @ d.T) < torch.trace(d0 @ cov @ d0.T)
    assert torch.equal(u0, alphaedit_factors(p, k1, r, kp @ kp.T, alpha, cov, 0.0)[0])
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    ua, va = alphaedit_factors(eye, k1, r, torch.zeros_like(cov), 1e-9, cov, lam)
    um, vm = memit_factors(cov, k1, r, lam)
    assert torch.allclose(ua.double() @ va.double().T, um.double() @ vm.double().T, atol=1e-4)
    with pytest.raises(InvalidRequestError, match="cov_weight"):
        alphaedit_factors(p, k1, r, m, alpha, cov, -1.0)
    with pytest.raises(InvalidRequestError, match="covariance"):
        alphaedit_factors(p, k1, r, m, alpha, None, 1.0)


def test_factors_with_per_prompt_keys():
    """keys="per_prompt": D(K_pK_pᵀ + (1/m)Σ_j k_j k_jᵀ + λC + αI)P = R K̄ᵀ P with K̄ the mean key — the
    minimiser of the mean over prompts of ‖D k_j − r‖² (plus the same penalties) over D = DP; with one
    prompt per request it is the mean-key update; it fits a prompt whose key differs from the others
    better than the mean-key update does."""
    cov, _, r, kp = _random_problem()
    g = torch.Generator().manual_seed(1)
    pk = torch.randn(3, 4, cov.shape[0], generator=g)                      # [n, m, d_in]
    pk[:, 0] = torch.randn(3, cov.shape[0], generator=g) * 3               # the bare prompt's key differs
    k1 = pk.mean(1)
    p = null_space(cov, float(torch.linalg.eigvalsh(cov)[18])).p
    alpha, lam = 0.5, 3.0
    u, v = alphaedit_factors(p, k1, r, kp @ kp.T, alpha, cov, lam, prompt_keys=pk)
    d = u.double() @ v.double().T
    assert torch.allclose(d @ p, d, atol=1e-5)
    flat = pk.double().reshape(-1, pk.shape[-1])
    m = kp @ kp.T + flat.T @ flat / pk.shape[1] + lam * cov
    lhs = d @ (m + alpha * torch.eye(m.shape[0], dtype=torch.float64)) @ p
    rhs = r.double().T @ k1.double() @ p
    assert torch.allclose(lhs, rhs, atol=1e-4 * rhs.abs().max())
    um, vm = alphaedit_factors(p, k1, r, kp @ kp.T, alpha, cov, lam)
    dm = um.double() @ vm.double().T

    def misfit(delta):                                                     # mean over prompts of ‖D k_j − r‖²
        return float(((torch.einsum("oi,nmi->nmo", delta, pk.double()) - r.double()[:, None]) ** 2).sum(-1).mean())
    assert misfit(d) < misfit(dm)
    one = k1[:, None, :]
    uo, vo = alphaedit_factors(p, k1, r, kp @ kp.T, alpha, cov, lam, prompt_keys=one)
    assert torch.allclose(uo.double() @ vo.double().T, dm, atol=1e-6)


def _threshold(model, tok, corpus, frac=0.6):
    """An eigenvalue threshold keeping ~`frac` of each edited layer's directions on the tiny model."""
    stats, _ = layer_stats(model, tok, LAYERS, corpus, fingerprint(model), StatsParams(**STATS), progress=False)
    return max(float(torch.quantile(torch.linalg.eigvalsh(s.cov.double()), frac)) for s in stats.values()), stats


def test_end_to_end_range_state_determinism(env):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    thr, stats = _threshold(model, tok, env)
    hp = {**FAST, "nullspace_threshold": thr, "alpha": 1.0}
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = compute_edit(model, tok, REQS, method="alphaedit", layers=LAYERS, hparams=hp, corpus=env)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters()), "computing must not change the model"
    patch = res.patch
    assert patch.method == "alphaedit" and [d.layer for d in patch.deltas] == LAYERS
    assert all(d.rank == len(REQS) and d.u.dtype == torch.float32 for d in patch.deltas)
    fp = fingerprint(model)
    for d in patch.deltas:
        proj = cached_null_space(stats[d.layer].cov, thr, d.layer, fp, stats_key(env, d.layer, StatsParams(**STATS), torch.float32))
        assert 0 < proj.kept < stats[d.layer].cov.shape[0]
        dense = d.dense().double()
        assert torch.allclose(dense @ proj.p, dense, atol=1e-5 * dense.abs().max())
    # the state: one block per layer, tagged with the patch digest, [d_in, n]
    assert res.preserved.tags == (patch.digest,) and res.preserved.layers == tuple(LAYERS)
    assert all(b.keys.shape == (48, len(REQS)) for b in res.preserved.blocks)
    # how much of each layer's null space the state takes: its keys, against the same projection
    from editserve.editing.lifelong import null_space_uses
    uses = null_space_uses(model, tok, res.preserved, env, hp)
    assert sorted(uses) == LAYERS
    for layer, use in uses.items():
        proj = cached_null_space(stats[layer].cov, thr, layer, fp, stats_key(env, layer, StatsParams(**STATS), torch.float32))
        want = null_space_use(proj, res.preserved.keys(layer), bound=1.0)       # α + λ·t: α 1, λ 0 here
        assert (use.directions, use.committed_keys, use.taken) == (proj.kept, len(REQS), want.taken) == (proj.kept, 2, 2)
    # the bound is the settings' α + λ·t: an α no key's energy reaches takes nothing
    assert {u.taken for u in null_space_uses(model, tok, res.preserved, env, {**hp, "alpha": 1e9}).values()} == {0}
    # deterministic: same inputs, same bytes
    again = compute_edit(model, tok, REQS, method="alphaedit", layers=LAYERS, hparams=hp, corpus=env)
    assert again.patch.digest == patch.digest
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(again.preserved.blocks, res.preserved.blocks))
    # the edit works
    from editserve.editing.scoring import target_nll
    before = target_nll(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])
    apply_patch(model, patch)
    after = target_nll(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])
    assert (after < before - 0.05).all(), (before, after)

    # a later edit with the state carried moves the first edit's keys far less than without it
    second = compute_edit(model, tok, LATER, method="alphaedit", layers=LAYERS, hparams=hp, corpus=env,
                          preserved=res.preserved)
    blind = compute_patch(model, tok, LATER, method="alphaedit", layers=LAYERS, hparams=hp, corpus=env)
    for with_state, without in zip(second.patch.deltas, blind.deltas):
        kp = res.preserved.for_patch(patch.digest).blocks[LAYERS.index(with_state.layer)].keys
        rel = (with_state.dense() @ kp).norm() / (with_state.dense().norm() * kp.norm())
        rel_blind = (without.dense() @ kp).norm() / (without.dense().norm() * kp.norm())
        assert rel < 0.5 * rel_blind, (with_state.layer, rel, rel_blind)
    # the new state holds both patches' blocks; rollback to the first version selects exactly res.preserved
    assert second.preserved.tags == (patch.digest, second.patch.digest)
    back = second.preserved.select([patch.digest])
    assert all(torch.equal(a.keys, b.keys) and a.tag == b.tag and a.layer == b.layer
               for a, b in zip(back.blocks, res.preserved.blocks))
    assert len(back.blocks) == len(res.preserved.blocks)
    # export / import round trip
    rt = PreservedKeys.from_tensors(second.preserved.tensors())
    assert [(b.tag, b.layer) for b in rt.blocks] == [(b.tag, b.layer) for b in second.preserved.blocks]
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(rt.blocks, second.preserved.blocks))
    remove_patch(model, patch)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_rome_and_memit_record_keys_and_bad_state(env):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    res = compute_edit(model, tok, REQS[:1], method="rome", layers=[1], hparams=FAST, corpus=env)
    assert res.preserved.layers == (1,) and res.preserved.blocks[0].keys.shape == (128, 1)
    res2 = compute_edit(model, tok, REQS, method="memit", layers=[1, 2], hparams={**FAST, "cov_weight": 1.0},
                        corpus=env, preserved=res.preserved)
    assert res2.preserved.tags == (res.patch.digest, res2.patch.digest)
    assert res2.preserved.n_keys(1) == 3 and res2.preserved.n_keys(2) == 2
    with pytest.raises(InvalidRequestError, match="PreservedKeys"):
        compute_edit(model, tok, REQS[:1], method="rome", layers=[1], hparams=FAST, corpus=env, preserved={"a": 1})
    with pytest.raises(InvalidRequestError, match="alpha"):
        compute_edit(model, tok, REQS[:1], method="alphaedit", layers=[1], hparams={**FAST, "alpha": -1}, corpus=env)


def test_per_prompt_keys_are_what_the_state_preserves(env):
    """keys="per_prompt": the state records every prompt's key (bare and prefixed, m per request) scaled by
    1/√m — the second moment the fit used — so a consolidation keeps the edit's output on the bare prompt's
    key, which the mean key alone does not (a per-prompt default broke a fact in the 30-commit consolidation)."""
    from editserve.editing.consolidate import consolidate_layer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    thr, stats = _threshold(model, tok, env)
    m = 3                                                             # the bare prompt and 2 prefixed copies
    hp = {**FAST, "prefixes": {"n_prefixes": m - 1}, "nullspace_threshold": thr, "alpha": 1.0}
    mean = compute_edit(model, tok, REQS, method="alphaedit", layers=LAYERS, hparams=hp, corpus=env)
    per = compute_edit(model, tok, REQS, method="alphaedit", layers=LAYERS, hparams={**hp, "keys": "per_prompt"},
                       corpus=env)
    assert all(b.keys.shape == (48, len(REQS)) for b in mean.preserved.blocks)
    assert all(b.keys.shape == (48, len(REQS) * m) for b in per.preserved.blocks)
    assert per.preserved.n_keys(LAYERS[0]) == len(REQS) * m
    # request-major columns; at the first layer (no earlier update in effect) they average to the mean keys
    cols = per.preserved.keys(LAYERS[0]).double().reshape(48, len(REQS), m)          # [d_in, n, m]
    assert torch.allclose(cols.sum(-1) / m ** 0.5, mean.preserved.keys(LAYERS[0]).double(), atol=1e-5)
    # consolidation on the recorded keys keeps the output on every prompt's key, the bare one included
    layer = LAYERS[-1]
    delta = next(d for d in per.patch.deltas if d.layer == layer).dense()
    keys = per.preserved.keys(layer)                                                   # [d_in, n·m]
    bare = keys.reshape(48, len(REQS), m)[:, :, 0] * m ** 0.5                          # [d_in, n]
    mean_keys = keys.reshape(48, len(REQS), m).sum(-1) / m ** 0.5
    kept = consolidate_layer(delta, keys, stats[layer].cov, layer)
    only_mean = consolidate_layer(delta, mean_keys, stats[layer].cov, layer)
    want = delta.double() @ bare.double()

    def off(c):
        return float(((c.u.double() @ c.v.double().T @ bare.double()) - want).norm() / want.norm())

    assert off(kept) < 1e-4, off(kept)
    assert off(only_mean) > 10 * max(off(kept), 1e-4), (off(only_mean), off(kept))
