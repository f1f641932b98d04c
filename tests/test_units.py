"""Units kept / removed at a sparsity (SPEC §5, issue 9 item 6): one definition, the same count in every scope,
in the masks, the ranking metrics and the decode benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import masks, ranking
from pipeline.bench import plan as bench_plan
from pipeline.units import layer_floor, n_kept, n_removed, pool_removed, removed_total

# (layers incl. the dense layer 0, units per layer): SmolLM2-135M heads and neurons, the mask tests' toy pool,
# odd and tiny layers
POOLS = [(30, 9), (30, 1536), (4, 10), (5, 7), (3, 3), (2, 1)]
SPARSITIES = [0.1, 0.3, 0.5, 0.7, 0.9, 0.95]


def test_n_removed_rounds_half_up_and_never_empties_a_layer():
    assert n_removed(9, 0.5) == 5 and n_kept(9, 0.5) == 4  # 4.5 -> 5 (Python's round() gave 4)
    assert n_removed(9, 0.3) == 3 and n_removed(9, 0.7) == 6  # 2.7 -> 3, 6.3 -> 6
    assert n_removed(1536, 0.3) == 461 and n_removed(1536, 0.7) == 1075
    assert n_removed(10, 0.15) == 2  # 1.5 -> 2
    assert n_removed(45, 0.7) == 32  # 31.5 as written, although the float product 0.7 * 45 is 31.499999999999996
    assert n_removed(10, 0.25) == 3  # 2.5 -> 3 (round() gave 2)
    assert n_removed(10, 0.0) == 0 and n_kept(10, 0.0) == 10
    assert n_removed(10, 0.96) == 9 and n_kept(3, 0.99) == 1 and n_kept(1, 0.9) == 1
    for n in range(1, 40):
        for s in np.linspace(0.0, 0.99, 34):
            assert 1 <= n_kept(n, s) <= n and n_kept(n, s) + n_removed(n, s) == n


def test_bad_sparsity_and_units_are_errors():
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            n_removed(9, s)
    with pytest.raises(ValueError, match="at least one unit"):
        n_kept(0, 0.5)
    with pytest.raises(ValueError, match="scope"):
        layer_floor(9, "everywhere")


@pytest.mark.parametrize("n_layers,n_units", POOLS)
@pytest.mark.parametrize("s", SPARSITIES)
def test_every_scope_removes_the_same_total(n_layers, n_units, s):
    """local, global and hybrid at the same nominal sparsity remove the same number of units (before: SmolLM2
    heads at 0.5 lost 116 locally and 130 globally)."""
    want = (n_layers - 1) * n_removed(n_units, s)
    got = {scope: masks.removal_counts(n_layers, n_units, s, scope, min_keep=0.0)["removed"] for scope in masks.SCOPES}
    assert got == {scope: want for scope in masks.SCOPES}
    eff = {
        scope: masks.removal_counts(n_layers, n_units, s, scope, min_keep=0.0)["effective"] for scope in masks.SCOPES
    }
    assert len(set(eff.values())) == 1


def test_smollm2_heads_at_half():
    d = {scope: masks.removal_counts(30, 9, 0.5, scope)["removed"] for scope in masks.SCOPES}
    assert d == {"local": 145, "global": 145, "hybrid": 145}  # 29 layers × 5 of 9


@pytest.mark.parametrize("n_units", [1, 2, 3, 7, 9, 10, 48, 1536])
@pytest.mark.parametrize("s", [0.0] + SPARSITIES)
def test_masks_ranking_and_benchmark_keep_the_same_count(n_units, s):
    """One layer's kept count is the same for the accuracy masks, the training recall and the decode benchmark;
    the global recall's k is the total a global mask keeps over the same layers."""
    k = n_kept(n_units, s)
    local = masks.removal_counts(2, n_units, s, "local")
    assert n_units - local["per_layer"] == k
    assert ranking.n_keep(1, n_units, s, "local") == k
    assert bench_plan.kept(n_units, s) == k
    lp = 29
    glob = masks.removal_counts(lp + 1, n_units, s, "global")
    assert ranking.n_keep(lp, n_units, s, "global") == lp * n_units - glob["removed"] == lp * k


@pytest.mark.parametrize("n_layers,n_units", [(29, 9), (3, 10), (4, 7)])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_recall_k_is_what_the_mask_keeps(n_layers, n_units, s):
    """Behaviourally: with the prediction reversed, top-k recall is max(0, 2k - n) / k, so it reveals the k the
    recall used; that k must be what keep_mask keeps from the same layers (no dense layer here)."""
    rng = np.random.default_rng(0)
    true = rng.random((2, n_layers, n_units))
    for scope in ("local", "global"):
        keep = masks.keep_mask(torch.from_numpy(true), s, scope, dense_layers=())
        k = int(keep[0].sum()) if scope == "global" else int(keep[0, 0].sum())
        n = n_layers * n_units if scope == "global" else n_units
        assert ranking.topk_recall(-true, true, s, scope) == pytest.approx(max(0, 2 * k - n) / k), scope


@pytest.mark.parametrize("n_layers,n_units", [(4, 10), (30, 9), (6, 7)])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("min_keep", [0.0, 0.1, 0.5, 1.0])
def test_keep_mask_removes_what_removal_counts_says(n_layers, n_units, s, min_keep):
    """For every scope the mask removes exactly the counted total; hybrid's floor can only lower it, and then
    `requested` keeps the asked-for figure and `effective` the real one."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, n_layers, n_units, generator=g)
    x[0, 1] = 0.0  # one example with a whole layer at the bottom (the floor binds) ...
    x[1] = 1.0  # ... and one all ties
    for scope in masks.SCOPES:
        c = masks.removal_counts(n_layers, n_units, s, scope, min_keep=min_keep)
        keep = masks.keep_mask(x, s, scope, min_keep=min_keep)
        removed = (~keep).flatten(1).sum(1)
        assert (removed == c["removed"]).all(), (scope, removed.tolist(), c)
        assert c["requested"] == (n_layers - 1) * n_removed(n_units, s)
        assert c["removed"] == removed_total(n_layers - 1, n_units, s, scope, min_keep) <= c["requested"]
        if scope != "hybrid":
            assert c["removed"] == c["requested"]
        assert keep[:, 1:].sum(-1).min() >= layer_floor(n_units, scope, min_keep)
        assert c["effective"] == pytest.approx(c["removed"] / (n_layers * n_units))


def test_hybrid_cap_is_reported():
    spec = masks.MaskSpec(sparsity={"heads": 0.7, "neurons": 0.0}, scope="hybrid", min_keep=0.5)
    d = masks.describe(spec, 4, {"heads": 10, "neurons": 20})
    assert d["heads"]["requested"] == 21 and d["heads"]["removed"] == 15  # each layer keeps 5 of 10, not 3
    assert d["heads"]["effective"] == pytest.approx(15 / 40)
    assert pool_removed(3, 10, 0.7) == 21


def test_sparsity_key_is_the_one_metric_spelling():
    from pipeline.units import sparsity_key

    assert [sparsity_key(s) for s in (0.0, 0.05, 0.3, 0.5, 0.7, 0.125)] == ["s00", "s05", "s30", "s50", "s70", "s12.5"]


def test_minmax_is_one_rule_for_arrays_and_tensors():
    import numpy as np
    import torch

    from pipeline.normalize import minmax

    x = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    want = np.array([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]], dtype=np.float32)  # a constant row -> 0
    assert np.array_equal(minmax(x), want)
    assert torch.equal(minmax(torch.from_numpy(x)), torch.from_numpy(want))
    assert minmax(torch.from_numpy(x).double()).dtype == torch.float64
