"""Ranking quality of predicted importance scores (SPEC §6): Spearman ρ and top-k recall.

All functions take per-example score arrays `pred`, `true` of shape [N, L, U] (examples, layers,
units) and return plain floats. Layer 0 is normally excluded by the caller (it always stays dense).

- `spearman_joint`: per example, ρ over all units of all given layers at once (the ranking that a
  *global* mask uses), then the mean over examples.
- `spearman_per_layer`: per example and layer, ρ over that layer's units (the ranking a *local*
  mask uses), then the mean over layers and examples.
- `topk_recall`: at sparsity s, the kept set is the top-k, with k the units a mask keeps at s
  (`pipeline.units`, the masks' own count): `pool='local'` ranks each layer and keeps
  k = n_kept(U, s) of it; `pool='global'` ranks all units of all given layers jointly and keeps
  k = L · n_kept(U, s), the total a global mask keeps over those layers (without its one-per-layer
  floor: recall scores the ranking). recall = |predicted kept ∩ true kept| / k, averaged over examples.
Rows whose true (or predicted) scores are constant have no defined ρ and are skipped (nan-mean).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from pipeline.units import n_kept, pool_kept


def _rowwise_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """ρ per row of two [R, U] arrays (average ranks for ties); nan where a row is constant."""
    rp = rankdata(pred, axis=-1).astype(np.float64)
    rt = rankdata(true, axis=-1).astype(np.float64)
    rp -= rp.mean(-1, keepdims=True)
    rt -= rt.mean(-1, keepdims=True)
    denom = np.sqrt((rp * rp).sum(-1) * (rt * rt).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rp * rt).sum(-1) / denom
    rho[denom == 0] = np.nan
    return rho


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def spearman_joint(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over examples of ρ over all units of all layers jointly. pred/true: [N, L, U]."""
    n = pred.shape[0]
    return _nanmean(_rowwise_spearman(pred.reshape(n, -1), true.reshape(n, -1)))


def spearman_per_layer(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over examples and layers of the per-layer ρ. pred/true: [N, L, U]."""
    u = pred.shape[-1]
    return _nanmean(_rowwise_spearman(pred.reshape(-1, u), true.reshape(-1, u)))


def n_keep(n_layers: int, n_units: int, sparsity: float, pool: str = "global") -> int:
    """k of the top-k recall over `n_layers` layers of `n_units`: per layer (`local`) n_kept(U, s),
    over all of them (`global`) L · n_kept(U, s) — what a mask of that scope keeps (`pipeline.units`)."""
    if pool == "local":
        return n_kept(n_units, sparsity)
    if pool == "global":
        return pool_kept(n_layers, n_units, sparsity)
    raise ValueError(f"pool must be 'global' or 'local', got {pool!r}")


def _recall_rows(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    """Top-k recall per row of two [R, U] arrays."""
    top_p = np.argpartition(-pred, k - 1, axis=-1)[:, :k]
    top_t = np.argpartition(-true, k - 1, axis=-1)[:, :k]
    hit = np.zeros(pred.shape, dtype=bool)
    np.put_along_axis(hit, top_t, True, axis=-1)
    return np.take_along_axis(hit, top_p, axis=-1).sum(-1) / k


def topk_recall(pred: np.ndarray, true: np.ndarray, sparsity: float, pool: str = "global") -> float:
    """Mean recall of the true kept set at `sparsity`. pred/true: [N, L, U]; pool 'global' or 'local'."""
    k = n_keep(pred.shape[-2], pred.shape[-1], sparsity, pool)
    rows = pred.shape[0] if pool == "global" else -1  # global: one row per example; local: per example and layer
    cols = -1 if pool == "global" else pred.shape[-1]
    return float(_recall_rows(pred.reshape(rows, cols), true.reshape(rows, cols), k).mean())


def ranking_metrics(pred: np.ndarray, true: np.ndarray, sparsities: list[float]) -> dict[str, float]:
    """All ranking metrics for one unit pool ([N, L, U] arrays), flat names."""
    out = {"spearman_joint": spearman_joint(pred, true), "spearman_per_layer": spearman_per_layer(pred, true)}
    for s in sparsities:
        out[f"recall_global_s{s:g}"] = topk_recall(pred, true, s, "global")
        out[f"recall_local_s{s:g}"] = topk_recall(pred, true, s, "local")
    return out
