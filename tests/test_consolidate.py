"""Consolidation maths (editing/consolidate.py) on random data: the re-solved update keeps the
outputs on the committed keys, is the least-penalised update that does, and refuses what it
cannot consolidate. The SmolLM2 stream check is in test_lifelong_smollm2.py."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.consolidate import (
    ConsolidateParams,
    consolidate,
    consolidate_layer,
    edit_prices,
    resolve_without,
)
from editserve.errors import InvalidRequestError, PatchMismatchError

D_OUT, D_IN = 24, 40


def _setup(n_keys: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, D_IN, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2.0, D_IN, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]                                              # anisotropic C [d_in, d_in]
    keys = torch.randn(D_IN, n_keys, generator=g, dtype=torch.float64)
    # an accumulated update: what the keys need plus drift in directions no key needs
    delta = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) * 0.3
    return delta, keys, cov


def _penalty(d: torch.Tensor, cov: torch.Tensor, ridge: float) -> float:
    a = cov + ridge * float(torch.trace(cov)) / cov.shape[0] * torch.eye(cov.shape[0], dtype=torch.float64)
    return float(torch.trace(d @ a @ d.T))


@pytest.mark.parametrize("ridge", [0.01, 0.1, 10.0])
def test_outputs_on_committed_keys_are_kept_and_the_penalty_drops(ridge):
    delta, keys, cov = _setup(n_keys=7)
    r = consolidate_layer(delta, keys, cov, layer=3, params=ConsolidateParams(ridge=ridge))
    new = r.u.double() @ r.v.double().T
    assert r.u.dtype == torch.float32 and r.v.dtype == torch.float32 and r.u.shape == (D_OUT, 7) and r.v.shape == (D_IN, 7)
    torch.testing.assert_close(new @ keys, delta @ keys, rtol=1e-4, atol=1e-4)
    assert r.penalty_after < 0.5 * r.penalty_before
    assert r.penalty_before == pytest.approx(_penalty(delta, cov, ridge), rel=1e-9)
    assert r.penalty_after == pytest.approx(_penalty(new, cov, ridge), rel=1e-4)


def test_it_is_the_least_penalised_update_with_those_outputs():
    delta, keys, cov = _setup(n_keys=5, seed=1)
    r = consolidate_layer(delta, keys, cov, layer=0)
    best = r.u.double() @ r.v.double().T
    g = torch.Generator().manual_seed(2)
    # any other feasible update: best + E with E K = 0 (E's rows in the orthogonal complement of span K)
    q, _ = torch.linalg.qr(keys, mode="complete")
    complement = q[:, keys.shape[1]:]                                        # [d_in, d_in − N]
    for _ in range(5):
        e = torch.randn(D_OUT, complement.shape[1], generator=g, dtype=torch.float64) @ complement.T * 0.01
        torch.testing.assert_close((best + e) @ keys, best @ keys)
        assert _penalty(best + e, cov, 0.1) > _penalty(best, cov, 0.1)


def test_an_update_the_keys_fully_explain_comes_back_unchanged():
    _, keys, cov = _setup(n_keys=6, seed=3)
    a = cov + 0.1 * float(torch.trace(cov)) / D_IN * torch.eye(D_IN, dtype=torch.float64)
    # ΔW = V (KᵀA⁻¹K)⁻¹KᵀA⁻¹ is already the minimiser: consolidating it again changes nothing
    v = torch.randn(D_OUT, 6, dtype=torch.float64)
    ak = torch.linalg.solve(a, keys)
    minimal = v @ torch.linalg.solve(keys.T @ ak, ak.T)
    r = consolidate_layer(minimal, keys, cov, layer=1)
    torch.testing.assert_close(r.u.double() @ r.v.double().T, minimal, rtol=1e-4, atol=1e-5)


def test_edit_prices_are_what_the_least_penalised_update_saves_without_each_edit():
    delta, keys, cov = _setup(n_keys=6, seed=5)
    p = edit_prices(delta, keys, cov, layer=2)
    assert p.total == pytest.approx(consolidate_layer(delta, keys, cov, layer=2).penalty_after, rel=1e-6)
    for j in range(keys.shape[1]):
        others = torch.cat([keys[:, :j], keys[:, j + 1:]], dim=1)
        without = consolidate_layer(delta, others, cov, layer=2).penalty_after
        alone = consolidate_layer(delta, keys[:, j:j + 1], cov, layer=2).penalty_after
        assert float(p.marginal[j]) == pytest.approx(p.total - without, rel=1e-4)
        assert float(p.alone[j]) == pytest.approx(alone, rel=1e-4)
    assert (p.marginal > 0).all() and (p.alone > 0).all()


def test_resolving_without_some_keys_keeps_the_others_and_zeroes_those():
    """`resolve_without`: the kept keys' outputs as the consolidated update gives them, zero on the
    dropped keys, the least-penalised such update; with nothing dropped it is `consolidate_layer`."""
    delta, keys, cov = _setup(n_keys=9, seed=5)
    cons = consolidate_layer(delta, keys, cov, layer=2)
    c = cons.u.double() @ cons.v.double().T
    dropped = torch.zeros(9, dtype=torch.bool)
    dropped[[1, 6, 7]] = True
    r = resolve_without(c, keys, dropped, cov, layer=2)
    new = r.u.double() @ r.v.double().T
    assert r.n_keys == 6 and r.u.dtype == torch.float32
    torch.testing.assert_close(new @ keys[:, ~dropped], c @ keys[:, ~dropped], rtol=1e-4, atol=1e-4)
    assert float((new @ keys[:, dropped]).abs().max()) <= 1e-4 * float((c @ keys[:, dropped]).abs().max())
    # the least penalised update with those outputs: any other is new + E with E K = 0
    q, _ = torch.linalg.qr(keys, mode="complete")
    complement = q[:, keys.shape[1]:]
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        e = torch.randn(D_OUT, complement.shape[1], generator=g, dtype=torch.float64) @ complement.T * 0.01
        assert _penalty(new + e, cov, 0.1) > _penalty(new, cov, 0.1)
    same = resolve_without(c, keys, torch.zeros(9, dtype=torch.bool), cov, layer=2)
    torch.testing.assert_close(same.u.double() @ same.v.double().T, c, rtol=1e-4, atol=1e-5)
    with pytest.raises(PatchMismatchError, match="bool mask over the 9 keys"):
        resolve_without(c, keys, torch.zeros(8, dtype=torch.bool), cov, layer=2)


def test_repeated_keys_are_solved():
    delta, keys, cov = _setup(n_keys=4, seed=4)
    twice = torch.cat([keys, keys[:, :2]], dim=1)                         # the same subject edited twice
    r = consolidate_layer(delta, twice, cov, layer=2)
    assert torch.isfinite(r.u).all() and torch.isfinite(r.v).all()
    torch.testing.assert_close(r.u.double() @ r.v.double().T @ keys, delta @ keys, rtol=1e-3, atol=1e-3)


def _closed_form(delta: torch.Tensor, basis: torch.Tensor, cov: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """ΔW B (BᵀA⁻¹B)⁻¹ BᵀA⁻¹ for independent columns B: the least-penalised update keeping ΔW B."""
    a = cov + ridge * float(torch.trace(cov)) / cov.shape[0] * torch.eye(cov.shape[0], dtype=torch.float64)
    ab = torch.linalg.solve(a, basis)
    return delta @ basis @ torch.linalg.solve(basis.T @ ab, ab.T)


def test_more_keys_than_the_layer_has_dimensions_are_bounded_by_the_layer():
    """A long ledger: N = 300 committed keys spanning 30 directions of d_in = 40. The result is the
    closed form on 30 independent keys (the N×N system is singular), every key keeps its output, and
    the factors have rank ≤ d_out = 24 however many keys there are (re-factored, not truncated)."""
    delta, _, cov = _setup(n_keys=1, seed=6)
    g = torch.Generator().manual_seed(7)
    basis = torch.randn(D_IN, 30, generator=g, dtype=torch.float64)
    keys = basis @ torch.randn(30, 300, generator=g, dtype=torch.float64)        # [d_in, 300], rank 30
    r = consolidate_layer(delta, keys, cov, layer=4)
    assert r.n_keys == 300 and r.u.shape == (D_OUT, D_OUT) and r.v.shape == (D_IN, D_OUT)
    new = r.u.double() @ r.v.double().T
    torch.testing.assert_close(new, _closed_form(delta, basis, cov), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new @ keys, delta @ keys, rtol=1e-4, atol=1e-3)
    assert r.penalty_after < r.penalty_before
    # keys spanning the whole input space pin the update down: it comes back as it was
    full = torch.randn(D_IN, 100, generator=g, dtype=torch.float64)
    again = consolidate_layer(delta, full, cov, layer=4)
    assert again.n_keys == 100 and again.u.shape[1] == D_OUT
    torch.testing.assert_close(again.u.double() @ again.v.double().T, delta, rtol=1e-4, atol=1e-5)
    assert again.penalty_after == pytest.approx(again.penalty_before, rel=1e-5)


def test_the_basis_solve_is_the_closed_form_on_independent_keys():
    delta, keys, cov = _setup(n_keys=9, seed=8)
    r = consolidate_layer(delta, keys, cov, layer=0)
    assert r.u.shape == (D_OUT, 9) and r.n_keys == 9
    torch.testing.assert_close(r.u.double() @ r.v.double().T, _closed_form(delta, keys, cov), rtol=1e-4, atol=1e-5)
    with pytest.raises(PatchMismatchError, match="layer 0: the committed keys are all zero"):
        consolidate_layer(delta, torch.zeros(D_IN, 3, dtype=torch.float64), cov, layer=0)


def test_refusals_name_the_layer_or_value():
    delta, keys, cov = _setup(n_keys=3)
    with pytest.raises(PatchMismatchError, match=r"layer\(s\) \[4\]"):
        consolidate({2: delta, 4: delta}, {2: keys}, {2: cov, 4: cov})
    with pytest.raises(PatchMismatchError, match="statistics for layer"):
        consolidate({2: delta}, {2: keys}, {})
    with pytest.raises(PatchMismatchError, match="layer 2: need committed keys"):
        consolidate_layer(delta, keys[:, :0], cov, layer=2)
    with pytest.raises(PatchMismatchError, match="d_in=40"):
        consolidate_layer(delta, keys, cov[:10, :10], layer=2)
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(InvalidRequestError, match="ridge"):
            ConsolidateParams(ridge=bad)


def _layers(n_keys: int, n_layers: int = 3, seed: int = 5):
    """Per-layer (ΔW, K, C) for the same n_keys edits at n_layers layers; C differs by layer."""
    out = {}
    for i in range(n_layers):
        delta, keys, cov = _setup(n_keys, seed=seed + i)
        out[i + 1] = (delta, keys, cov * (1.0 + i))                          # later layers: larger statistics
    return out


def test_across_layers_keeps_the_summed_outputs_at_a_lower_total_penalty():
    lay = _layers(n_keys=6)
    deltas, keys, covs = ({l: t[j] for l, t in lay.items()} for j in range(3))
    joint = consolidate(deltas, keys, covs, ConsolidateParams(across_layers=True))
    each = consolidate(deltas, keys, covs, ConsolidateParams())
    new = {l: r.u.double() @ r.v.double().T for l, r in joint.items()}
    torch.testing.assert_close(sum(new[l] @ keys[l] for l in lay), sum(deltas[l] @ keys[l] for l in lay),
                               rtol=1e-4, atol=1e-4)
    # it relaxes the per-layer constraint, so it costs no more than the per-layer solve, and less here
    assert sum(r.penalty_after for r in joint.values()) < sum(r.penalty_after for r in each.values())
    for l, r in joint.items():
        assert r.penalty_after == pytest.approx(_penalty(new[l], covs[l], 0.1), rel=1e-4)


def test_across_layers_is_the_least_penalised_split():
    lay = _layers(n_keys=4, seed=9)
    deltas, keys, covs = ({l: t[j] for l, t in lay.items()} for j in range(3))
    joint = consolidate(deltas, keys, covs, ConsolidateParams(across_layers=True))
    best = {l: r.u.double() @ r.v.double().T for l, r in joint.items()}
    total = sum(_penalty(best[l], covs[l], 0.1) for l in lay)
    g = torch.Generator().manual_seed(10)
    for _ in range(5):
        # another feasible split: move E K₁ from layer 1 to layer 2 (E₂ K₂ = −E₁ K₁)
        e1 = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) * 0.01
        e2 = -(e1 @ keys[1]) @ torch.linalg.pinv(keys[2])
        moved = {**best, 1: best[1] + e1, 2: best[2] + e2}
        torch.testing.assert_close(sum(moved[l] @ keys[l] for l in lay), sum(best[l] @ keys[l] for l in lay))
        assert sum(_penalty(moved[l], covs[l], 0.1) for l in lay) > total


def test_across_layers_refuses_keys_of_different_edits():
    lay = _layers(n_keys=3)
    deltas, keys, covs = ({l: t[j] for l, t in lay.items()} for j in range(3))
    keys[2] = keys[2][:, :2]
    with pytest.raises(PatchMismatchError, match="same edits' keys at every layer"):
        consolidate(deltas, keys, covs, ConsolidateParams(across_layers=True))
    with pytest.raises(InvalidRequestError, match="across_layers"):
        ConsolidateParams(across_layers="yes")


def test_edit_keys_line_up_patches_of_different_layer_sets():
    from editserve.editing.alphaedit import KeyBlock, PreservedKeys

    g = torch.Generator().manual_seed(11)
    k = {name: torch.randn(D_IN, n, generator=g) for name, n in (("a1", 2), ("a2", 2), ("r5", 1))}
    state = PreservedKeys((KeyBlock("alpha", 1, k["a1"]), KeyBlock("alpha", 2, k["a2"]), KeyBlock("rome", 2, k["r5"])))
    keys = state.edit_keys([1, 2])
    assert keys[1].shape == keys[2].shape == (D_IN, 3)
    torch.testing.assert_close(keys[1], torch.cat([k["a1"], torch.zeros(D_IN, 1)], dim=1))   # ROME: no layer-1 key
    torch.testing.assert_close(keys[2], torch.cat([k["a2"], k["r5"]], dim=1))
    # the one-layer edit is carried by its layer alone, and the summed outputs are kept
    deltas = {1: torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64),
              2: torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)}
    _, _, cov = _setup(n_keys=1)
    joint = consolidate(deltas, keys, {1: cov, 2: cov}, ConsolidateParams(across_layers=True))
    new = {layer: r.u.double() @ r.v.double().T for layer, r in joint.items()}
    torch.testing.assert_close(sum(new[layer] @ keys[layer].double() for layer in (1, 2)),
                               sum(deltas[layer] @ keys[layer].double() for layer in (1, 2)), rtol=1e-4, atol=1e-4)
    uneven = PreservedKeys((KeyBlock("alpha", 1, k["a1"]), KeyBlock("alpha", 2, k["r5"])))
    with pytest.raises(PatchMismatchError, match="cannot be lined up"):
        uneven.edit_keys([1, 2])
    with pytest.raises(PatchMismatchError, match=r"layer\(s\) \[3\]"):
        state.edit_keys([1, 3])
