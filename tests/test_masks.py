"""Mask construction (SPEC §5): local / global / hybrid, layer 0 dense, nominal vs effective sparsity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.masks import (
    MaskError,
    MaskSpec,
    describe,
    effective_sparsity,
    keep_mask,
    normalize_scores,
    removal_counts,
    static_masks,
)

L, U = 4, 10


def _scores(seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, L, U, generator=g)


@pytest.mark.parametrize("scope", ["local", "global", "hybrid"])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_counts_layer0_dense_and_effective(scope, s):
    x = _scores()
    keep = keep_mask(x, s, scope, min_keep=0.2)
    assert keep.shape == x.shape and keep.dtype == torch.bool
    assert keep[0].all(), "layer 0 must stay dense"
    c = removal_counts(L, U, s, scope, min_keep=0.2)
    assert int((~keep).sum()) == c["removed"]
    assert math.isclose(effective_sparsity(keep), c["effective"])
    assert c["effective"] <= s + 1e-9  # layer 0 dense -> effective <= nominal
    assert keep[1:].sum(-1).min() >= 1  # every layer keeps a unit


def test_local_removes_lowest_per_layer():
    x = _scores()
    keep = keep_mask(x, 0.3, "local")
    for l in range(1, L):
        removed = x[l][~keep[l]]
        kept = x[l][keep[l]]
        assert len(removed) == 3 and removed.max() <= kept.min()


def test_global_ranks_across_layers():
    x = torch.zeros(L, U)
    x[1] = 0.1  # layer 1 is the least important everywhere
    x[2] = torch.linspace(0.5, 1.0, U)
    x[3] = 1.0
    keep = keep_mask(x, 0.3, "global")  # 0.3 * 30 = 9 units, all from layer 1
    assert (~keep[1]).sum() == 9 and keep[2:].all()


def test_hybrid_keeps_a_floor_per_layer():
    x = torch.zeros(L, U)
    x[1] = 0.01
    x[2:] = 1.0
    keep = keep_mask(x, 0.5, "hybrid", min_keep=0.3)
    assert keep[1].sum() >= 3  # ceil(0.3 * 10)
    assert int((~keep).sum()) == 15


def test_global_keeps_a_unit_per_layer_against_inf_scores():
    """A real +inf score must not outrank the guard that keeps each layer's best unit (before, the stable sort
    removed layer 1's guarded unit ahead of the other layers' +inf ones and emptied the layer)."""
    x = torch.full((L, U), math.inf)
    x[1] = torch.linspace(0.0, 0.5, U)
    for scope in ("global", "hybrid"):
        keep = keep_mask(x, 0.5, scope, min_keep=0.0)
        assert keep[1].sum() >= 1 and int((~keep).sum()) == removal_counts(L, U, 0.5, scope)["removed"]


def test_hybrid_without_a_floor_still_keeps_one_unit_per_layer():
    x = torch.ones(L, U)
    x[1] = 0.0
    keep = keep_mask(x, 0.5, "hybrid", min_keep=0.0)
    assert keep[1].sum() == 1 and int((~keep).sum()) == 15


def test_batched_contextual_masks_match_per_row():
    x = _scores(1, lead=(2, 3))
    keep = keep_mask(x, 0.5, "global")
    for b in range(2):
        for t in range(3):
            assert torch.equal(keep[b, t], keep_mask(x[b, t], 0.5, "global"))


def test_ties_remove_exact_count():
    keep = keep_mask(torch.ones(L, U), 0.5, "global")
    assert int((~keep).sum()) == 15


def test_normalize_minmax_per_layer():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    n = normalize_scores(x)
    assert torch.allclose(n[0], torch.tensor([0.0, 1.0, 0.5])) and (n[1] == 0).all()


def test_static_masks_missing_pool_stays_dense():
    spec = MaskSpec(sparsity={"heads": 0.5, "neurons": 0.5})
    m = static_masks({"heads": np.random.rand(L, U)}, spec)
    assert m["neurons"] is None and m["heads"] is not None
    d = describe(spec, L, {"heads": U, "neurons": 20})
    assert d["heads"]["nominal"] == 0.5 and d["heads"]["effective"] == pytest.approx(15 / 40)


def test_bad_spec_names_parameter():
    with pytest.raises(MaskError, match="evaluate.scope"):
        MaskSpec(scope="everywhere")
    with pytest.raises(MaskError, match="sparsities"):
        MaskSpec(sparsity={"heads": 1.0})
