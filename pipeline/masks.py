"""Mask construction (SPEC §5): which heads and neurons to keep, from importance scores.

Two pools, heads [L, H] and neurons [L, F], each pruned at its own sparsity s in [0, 1).
Layer 0 (more generally `dense_layers`) is never pruned; s applies to the L_p *prunable* layers. How
many units go is `pipeline.units` (one definition for masks, ranking metrics and the benchmark): every
scope removes the same total, L_p · n_removed(U, s), where n_removed(U, s) = floor(s·U + 1/2) ≤ U − 1:

- `local`:  every prunable layer loses n_removed(U, s) of its lowest-scored units;
- `global`: the same total, the lowest units of all prunable layers ranked together (each layer
  keeps at least its best unit);
- `hybrid`: global, but every prunable layer keeps at least ceil(min_keep · U) (≥ 1) units, its best;
  where that floor makes the total impossible it is capped (`removal_counts` reports both figures).

The *effective* sparsity counts layer 0: removed / (L · U). Counts are fixed, so every token of a
contextual mask has the same effective sparsity. Scores may carry leading batch dims: [..., L, U] ->
keep mask [..., L, U] (bool). Higher score = more important. Exactly the counted number of units
is removed even with ties (ties are broken by index order of a stable sort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError
from pipeline.normalize import minmax
from pipeline.units import POOLS, SCOPES, layer_floor, n_removed, pool_removed, removed_total

NORMALIZE = ("minmax", "none")


class MaskError(UserError):
    """A bad mask parameter; the message names it."""


@dataclass(frozen=True)
class MaskSpec:
    """How masks are built: scope, sparsity per pool, hybrid floor, dense layers, score normalisation."""

    sparsity: dict[str, float] = field(default_factory=lambda: {"heads": 0.0, "neurons": 0.0})
    scope: str = "global"
    min_keep: float = 0.1  # hybrid: minimum fraction of each prunable layer kept
    dense_layers: tuple[int, ...] = (0,)
    normalize: str = "minmax"  # how raw (static / oracle) scores are made comparable across layers

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise MaskError(f"parameter evaluate.scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.normalize not in NORMALIZE:
            raise MaskError(
                f"parameter evaluate.normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}"
            )
        for pool, s in self.sparsity.items():
            if pool not in POOLS:
                raise MaskError(f"unknown unit pool {pool!r} (params: evaluate.pools); known: {', '.join(POOLS)}")
            if not 0.0 <= float(s) < 1.0:
                raise MaskError(f"sparsity must be in [0, 1) (params: evaluate.sparsities), got {s}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise MaskError(f"parameter evaluate.hybrid_min_keep must be in [0, 1], got {self.min_keep}")

    def s(self, pool: str) -> float:
        return float(self.sparsity.get(pool, 0.0))

    @property
    def is_dense(self) -> bool:
        return all(self.s(p) == 0.0 for p in POOLS)


def prunable_layers(n_layers: int, dense_layers: tuple[int, ...]) -> list[int]:
    return [l for l in range(n_layers) if l not in set(dense_layers)]


def removal_counts(
    n_layers: int,
    n_units: int,
    sparsity: float,
    scope: str,
    *,
    min_keep: float = 0.1,
    dense_layers: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """How many units are removed (`pipeline.units`): `removed` (actual total), `requested` (L_p ·
    n_removed(U, s), the same in every scope; larger than `removed` only where hybrid's floor caps it),
    `per_layer` (local only), and the effective sparsity of the actual total."""
    n_prunable = len(prunable_layers(n_layers, dense_layers))
    total = removed_total(n_prunable, n_units, sparsity, scope, min_keep)
    return {
        "removed": total,
        "requested": pool_removed(n_prunable, n_units, sparsity),
        "per_layer": n_removed(n_units, sparsity) if scope == "local" else None,
        "prunable_layers": n_prunable,
        "nominal": float(sparsity),
        "effective": total / float(n_layers * n_units),
    }


def normalize_scores(scores: Tensor, how: str = "minmax") -> Tensor:
    """[..., L, U] -> per layer min-max to [0, 1] (a constant layer -> 0), or unchanged for 'none'."""
    return scores if how == "none" else minmax(scores)


def keep_mask(
    scores: Tensor | np.ndarray,
    sparsity: float,
    scope: str = "global",
    *,
    min_keep: float = 0.1,
    dense_layers: tuple[int, ...] = (0,),
) -> Tensor:
    """Bool keep mask [..., L, U] from scores [..., L, U] (higher = keep)."""
    x = torch.as_tensor(scores).float()
    L, U = x.shape[-2], x.shape[-1]
    keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if sparsity <= 0.0:
        return keep
    counts = removal_counts(L, U, sparsity, scope, min_keep=min_keep, dense_layers=dense_layers)
    layers = prunable_layers(L, dense_layers)
    if not layers or counts["removed"] == 0:
        return keep
    idx = torch.tensor(layers, device=x.device)
    sub = x.index_select(-2, idx)  # [..., Lp, U]
    # nan scores go first; a real +inf becomes the largest finite value so the +inf guard below outranks it
    sub = torch.nan_to_num(sub, nan=-math.inf, posinf=torch.finfo(sub.dtype).max, neginf=-math.inf)
    if scope == "local":
        k = counts["per_layer"]
        order = torch.sort(sub, dim=-1, stable=True).indices[..., :k]
        sub_keep = torch.ones_like(sub, dtype=torch.bool).scatter(-1, order, False)
    else:
        flat = sub.flatten(-2)
        floor = layer_floor(U, scope, min_keep)  # protect each layer's best `floor` units
        top = torch.topk(sub, floor, dim=-1).indices
        guard = torch.zeros_like(sub, dtype=torch.bool).scatter(-1, top, True).flatten(-2)
        flat = flat.masked_fill(guard, math.inf)
        order = torch.sort(flat, dim=-1, stable=True).indices[..., : counts["removed"]]
        sub_keep = torch.ones_like(flat, dtype=torch.bool).scatter(-1, order, False).view(sub.shape)
    keep.index_copy_(-2, idx, sub_keep)
    return keep


def effective_sparsity(keep: Tensor) -> float:
    """Fraction of units removed in a keep mask [..., L, U] (all layers counted)."""
    return float(1.0 - keep.double().mean().item())


def static_masks(scores: dict[str, Any], spec: MaskSpec) -> dict[str, Tensor | None]:
    """{"heads": [L, H] bool or None (dense), "neurons": [L, F] bool or None} from static scores.

    A pool without scores (heads-only criteria have no neuron scores) or at sparsity 0 stays dense."""
    out: dict[str, Tensor | None] = {}
    for pool in POOLS:
        s = spec.s(pool)
        if s == 0.0 or scores.get(pool) is None:
            out[pool] = None
            continue
        x = normalize_scores(torch.as_tensor(np.asarray(scores[pool], dtype=np.float32)), spec.normalize)
        out[pool] = keep_mask(x, s, spec.scope, min_keep=spec.min_keep, dense_layers=spec.dense_layers)
    return out


def contextual_masks(scores: Tensor, pool: str, spec: MaskSpec, *, normalize: bool) -> Tensor | None:
    """Keep mask [..., L, U] of one pool from per-token / per-sequence scores [..., L, U]; None = dense."""
    s = spec.s(pool)
    if s == 0.0:
        return None
    x = normalize_scores(scores.float(), spec.normalize) if normalize else scores.float()
    return keep_mask(x, s, spec.scope, min_keep=spec.min_keep, dense_layers=spec.dense_layers)


def describe(spec: MaskSpec, n_layers: int, units: dict[str, int]) -> dict[str, Any]:
    """Nominal and effective sparsity of each pool, for the results table."""
    out: dict[str, Any] = {"scope": spec.scope, "dense_layers": list(spec.dense_layers)}
    for pool in POOLS:
        c = removal_counts(
            n_layers, units[pool], spec.s(pool), spec.scope, min_keep=spec.min_keep, dense_layers=spec.dense_layers
        )
        out[pool] = {
            "nominal": spec.s(pool),
            "effective": c["effective"],
            "removed": c["removed"],
            "requested": c["requested"],
            "total": n_layers * units[pool],
        }
    return out
