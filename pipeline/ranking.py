"""Ranking quality of predicted importance scores (SPEC §6): Spearman ρ and top-k recall.

All functions take per-example score arrays `pred`, `true` of shape [N, L, U] (examples, layers,
units) and return plain floats. Layer 0 is normally excluded by the caller (it always stays dense).

- `spearman_joint`: per example, ρ over all units of all given layers at once (the ranking that a
  *global* mask uses), then the mean over examples.
- `spearman_per_layer`: per example and layer, ρ over that layer's units (the ranking a *local*
  mask uses), then the mean over layers and examples.
- `topk_recall`: at sparsity s, the kept set is the top-k, with k the units a mask keeps at s
  (`pipeline.units`, the masks' own count): `scope='local'` ranks each layer and keeps
  k = n_kept(U, s) of it; `scope='global'` ranks all units of all given layers jointly and keeps
  k = L · n_kept(U, s), the total a global mask keeps over those layers (without its one-per-layer
  floor: recall scores the ranking). recall = |predicted kept ∩ true kept| / k, averaged over examples.
Rows whose true (or predicted) scores are constant have no defined ρ and are skipped (nan-mean).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.units import n_kept, pool_kept, sparsity_key


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..U along the last axis of [R, U], ties averaged (scipy `rankdata`'s 'average'), float64,
    on x's device: `numpy_ranks` on the CPU (faster there), `sorted_ranks` on an accelerator."""
    if x.device.type == "cpu":
        return torch.from_numpy(numpy_ranks(x.numpy()))
    return sorted_ranks(x)


def numpy_ranks(x: np.ndarray) -> np.ndarray:
    """`average_ranks` in numpy, float64, for [..., U]: one (unstable) argsort per row, then every run of equal
    sorted values gets the mean of its positions + 1 — scipy's 'average' ranks exactly (a row with a NaN: all
    NaN, as `rankdata`), ~25 % faster than `rankdata`, which sorts stably."""
    x = np.asarray(x)
    u = x.shape[-1]
    idx = np.argsort(x, axis=-1)
    srt = np.take_along_axis(x, idx, axis=-1)
    new_run = np.ones(srt.shape, dtype=bool)
    new_run[..., 1:] = srt[..., 1:] != srt[..., :-1]
    pos = np.arange(u)
    first = np.maximum.accumulate(np.where(new_run, pos, 0), axis=-1)
    run_end = np.ones(srt.shape, dtype=bool)
    run_end[..., :-1] = new_run[..., 1:]
    last = np.flip(np.minimum.accumulate(np.flip(np.where(run_end, pos, u - 1), -1), axis=-1), -1)
    out = np.empty(srt.shape, dtype=np.float64)
    np.put_along_axis(out, idx, (first + last) / 2.0 + 1.0, axis=-1)
    if np.issubdtype(x.dtype, np.floating):
        out[np.isnan(x).any(-1)] = np.nan  # as rankdata's nan_policy='propagate'
    return out


def sorted_ranks(x: Tensor) -> Tensor:
    """`average_ranks` in torch: one sort per row, then the first and last sorted position of every
    run of equal values (their mean + 1 is the average rank of the run)."""
    s, idx = torch.sort(x, dim=-1)
    u = x.shape[-1]
    pos = torch.arange(u, device=x.device).expand_as(s)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[..., 1:] = s[..., 1:] != s[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, pos, 0).cummax(-1).values
    last = torch.where(ends, pos, u - 1).flip(-1).cummin(-1).values.flip(-1)
    r = (first + last).double() / 2 + 1
    return torch.empty_like(r).scatter_(-1, idx, r)


def _centred_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of [R, U] -> (centred average ranks, their norms); a row with a non-finite value gets norm nan."""
    r = average_ranks(x)
    r -= r.mean(-1, keepdim=True)
    norm = r.square().sum(-1).sqrt()
    return r, torch.where(torch.isfinite(x).all(-1), norm, torch.nan)


def _rho(rp: Tensor, np_: Tensor, rt: Tensor, nt: Tensor) -> np.ndarray:
    denom = np_ * nt
    rho = (rp * rt).sum(-1) / denom
    return torch.where(denom > 0, rho, torch.nan).cpu().numpy()


def _as_tensor(x: np.ndarray | Tensor, device: str | torch.device | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device) if device is not None else t


def _rowwise_spearman(pred: np.ndarray | Tensor, true: np.ndarray | Tensor, device: str | None = None) -> np.ndarray:
    """ρ per row of two [R, U] arrays (average ranks for ties), ranked on `device` (default: where `true` is);
    nan where a row is constant or not finite."""
    true = _as_tensor(true, device)
    pred = _as_tensor(pred, true.device)
    return _rho(*_centred_ranks(pred), *_centred_ranks(true))


class Spearman:
    """Both ρ of `spearman_joint` and `spearman_per_layer` against fixed targets true [N, L, U], the
    targets' ranks computed once (model selection scores every epoch against the same slice)."""

    def __init__(self, true: np.ndarray | Tensor, device: str | torch.device | None = None):
        t = _as_tensor(true, device)
        self.shape, self.device = tuple(t.shape), t.device
        n, u = self.shape[0], self.shape[-1]
        self._joint = _centred_ranks(t.reshape(n, -1))
        self._layer = _centred_ranks(t.reshape(-1, u))

    def joint(self, pred: np.ndarray | Tensor) -> float:
        p = _as_tensor(pred, self.device)
        return _nanmean(_rho(*_centred_ranks(p.reshape(self.shape[0], -1)), *self._joint))

    def per_layer(self, pred: np.ndarray | Tensor) -> float:
        p = _as_tensor(pred, self.device)
        return _nanmean(_rho(*_centred_ranks(p.reshape(-1, self.shape[-1])), *self._layer))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def spearman_joint(pred: np.ndarray, true: np.ndarray, device: str | None = None) -> float:
    """Mean over examples of ρ over all units of all layers jointly. pred/true: [N, L, U]."""
    n = pred.shape[0]
    return _nanmean(_rowwise_spearman(pred.reshape(n, -1), true.reshape(n, -1), device))


def spearman_per_layer(pred: np.ndarray, true: np.ndarray, device: str | None = None) -> float:
    """Mean over examples and layers of the per-layer ρ. pred/true: [N, L, U]."""
    u = pred.shape[-1]
    return _nanmean(_rowwise_spearman(pred.reshape(-1, u), true.reshape(-1, u), device))


def n_keep(n_layers: int, n_units: int, sparsity: float, scope: str = "global") -> int:
    """k of the top-k recall over `n_layers` layers of `n_units`: per layer (`local`) n_kept(U, s),
    over all of them (`global`) L · n_kept(U, s) — what a mask of that scope keeps (`pipeline.units`)."""
    if scope == "local":
        return n_kept(n_units, sparsity)
    if scope == "global":
        return pool_kept(n_layers, n_units, sparsity)
    raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")


def _recall_rows(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    """Top-k recall per row of two [R, U] arrays."""
    top_p = np.argpartition(-pred, k - 1, axis=-1)[:, :k]
    top_t = np.argpartition(-true, k - 1, axis=-1)[:, :k]
    hit = np.zeros(pred.shape, dtype=bool)
    np.put_along_axis(hit, top_t, True, axis=-1)
    return np.take_along_axis(hit, top_p, axis=-1).sum(-1) / k


def topk_recall(pred: np.ndarray, true: np.ndarray, sparsity: float, scope: str = "global") -> float:
    """Mean recall of the true kept set at `sparsity`. pred/true: [N, L, U]; scope 'global' or 'local'."""
    k = n_keep(pred.shape[-2], pred.shape[-1], sparsity, scope)
    rows = pred.shape[0] if scope == "global" else -1  # global: one row per example; local: per example and layer
    cols = -1 if scope == "global" else pred.shape[-1]
    return float(_recall_rows(pred.reshape(rows, cols), true.reshape(rows, cols), k).mean())


def ranking_metrics(
    pred: np.ndarray, true: np.ndarray, sparsities: list[float], device: str | None = None
) -> dict[str, float]:
    """All ranking metrics for one unit pool ([N, L, U] arrays), flat names; ρ ranked on `device` (the same
    values on every device: exact average ranks)."""
    out = {
        "spearman_joint": spearman_joint(pred, true, device),
        "spearman_per_layer": spearman_per_layer(pred, true, device),
    }
    for s in sparsities:
        out[f"recall_global_{sparsity_key(s)}"] = topk_recall(pred, true, s, "global")
        out[f"recall_local_{sparsity_key(s)}"] = topk_recall(pred, true, s, "local")
    return out
