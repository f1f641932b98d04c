"""Training and held-out evaluation of one predictor (SPEC §6).

MSE on per-layer min-max targets (heads and neurons losses added, each a mean), AdamW, a cosine
learning-rate schedule over all steps, a seeded train/validation split, a seeded initialisation and
batch order. Evaluation excludes layer 0 (always dense) so that every kind is scored on the same units.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.predictors.base import Predictor
from pipeline.ranking import ranking_metrics, spearman_joint


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation split -> (train rows, validation rows), each sorted; at least one row each."""
    if n < 2:
        raise ValueError(f"need at least 2 examples to split into train and validation, have {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def predict(pred: Predictor, x: np.ndarray, batch_size: int = 256, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Training-view outputs for rows x -> heads [N, len(layers), H], neurons [N, len(layers), F]."""
    pred.eval()
    hs, ns = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h, n = pred(torch.from_numpy(x[i:i + batch_size]).to(device))
            hs.append(h.float().cpu().numpy())
            ns.append(n.float().cpu().numpy())
    return np.concatenate(hs), np.concatenate(ns)


def _adamw(pred: Predictor, settings: FitSettings) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (several times faster on CPU for large predictors)."""
    try:
        return torch.optim.AdamW(pred.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(pred.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _loss(pred: Predictor, x: Tensor, yh: Tensor, yn: Tensor) -> Tensor:
    h, n = pred(x)
    return F.mse_loss(h, yh) + F.mse_loss(n, yn)


def fit(pred: Predictor, x: np.ndarray, y_heads: np.ndarray, y_neurons: np.ndarray, train: np.ndarray,
        val: np.ndarray, settings: FitSettings,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train `pred` in place on rows `train`; targets already restricted to `pred.layers`.

    Returns one record per epoch: epoch, lr, train_loss, val_loss, val Spearman (joint) of heads and neurons."""
    dev = torch.device(settings.device)
    pred.to(dev)
    X = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    YH = torch.from_numpy(np.ascontiguousarray(y_heads)).to(dev)
    YN = torch.from_numpy(np.ascontiguousarray(y_neurons)).to(dev)
    tr = torch.from_numpy(train).to(dev)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    opt = _adamw(pred, settings)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(settings.seed)
    curves = []
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        pred.train()
        order = tr[torch.randperm(len(tr), generator=gen).to(dev)]
        total = 0.0
        for i in range(0, len(order), settings.batch_size):
            b = order[i:i + settings.batch_size]
            loss = _loss(pred, X[b], YH[b], YN[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        rec = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": total / len(train),
               "seconds": time.perf_counter() - t0}
        rec.update(validate(pred, x[val], y_heads[val], y_neurons[val], settings.device))
        curves.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    return curves


CURVE_RHO_ROWS = 64


def validate(pred: Predictor, x: np.ndarray, y_heads: np.ndarray, y_neurons: np.ndarray, device: str = "cpu") -> dict[str, float]:
    """The per-epoch curve values: validation loss (all validation rows) and joint Spearman over the
    predictor's layers on the first CURVE_RHO_ROWS validation rows (ranking is the slow part; the
    final metrics of `evaluate` use every row)."""
    ph, pn = predict(pred, x, device=device)
    loss = float(((ph - y_heads) ** 2).mean() + ((pn - y_neurons) ** 2).mean())
    r = slice(0, CURVE_RHO_ROWS)
    return {"val_loss": loss, "val_spearman_heads": spearman_joint(ph[r], y_heads[r]),
            "val_spearman_neurons": spearman_joint(pn[r], y_neurons[r])}


def evaluate(pred: Predictor, x: np.ndarray, y_heads: np.ndarray, y_neurons: np.ndarray,
             sparsities: list[float], device: str = "cpu") -> dict[str, Any]:
    """Held-out ranking metrics over layers 1..L-1; y_* are full [N, L, U] targets.

    Returns {"heads": {...}, "neurons": {...}} with spearman_joint (all units of layers 1..L-1 ranked
    together, per example), spearman_per_layer (mean of per-layer ρ) and recall_{global,local}_s<s>."""
    ph, pn = predict(pred, x, device=device)
    keep = [i for i, l in enumerate(pred.layers) if l >= 1]
    layers = [pred.layers[i] for i in keep]
    return {"heads": ranking_metrics(ph[:, keep], y_heads[:, layers], sparsities),
            "neurons": ranking_metrics(pn[:, keep], y_neurons[:, layers], sparsities)}


def evaluate_train_mean(y_heads: np.ndarray, y_neurons: np.ndarray, train: np.ndarray, val: np.ndarray,
                        sparsities: list[float]) -> dict[str, Any]:
    """The no-predictor reference: the mean training target (a static ranking) used as the prediction
    for every held-out example, scored exactly like `evaluate` (layers 1..L-1). A predictor is only
    contextual to the extent that it beats this."""
    out = {}
    for unit, y in (("heads", y_heads), ("neurons", y_neurons)):
        true = y[val][:, 1:]
        mean = y[train][:, 1:].mean(0, keepdims=True)
        out[unit] = ranking_metrics(np.broadcast_to(mean, true.shape), true, sparsities)
    return out
