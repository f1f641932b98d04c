"""Training and held-out evaluation of one predictor (SPEC §6), and its two baselines.

The recipe (`TrainParams`, params.yaml `train:`; measurements behind it in docs/train.md):
- the training rows are split once more (seeded) into *fit* rows and a *selection* slice; the
  held-out rows (`train.val_fraction`) are never seen by training or by any choice made in it;
- input standardisation: per-feature mean/std of the min-max inputs over the fit rows, stored in the
  predictor (`Predictor.set_standardisation`), applied in its forward;
- targets optionally transformed (`pipeline.predictors.targets`, monotone per example so rankings are kept);
- the output layer starts at the fit rows' mean target with zero weights (epoch 0 = the static
  train-mean ranking), MSE (heads and neurons losses added, each a mean), AdamW, a cosine
  learning-rate schedule over all steps, seeded initialisation and batch order;
- best-epoch selection, separately for the heads and the neurons MLP (they share nothing): the
  epoch (0 included) with the best `selection_score` on the selection slice.
Baselines, scored exactly like the predictor: the train mean (`evaluate_train_mean`) and ridge
regression on the predictor's own normalised input (`pipeline.predictors.ridge`).
Evaluation excludes layer 0 (always dense) so that every kind is scored on the same units.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pipeline.predictors.base import Predictor
from pipeline.predictors.targets import TARGET_TRANSFORMS
from pipeline.ranking import Spearman, ranking_metrics
from pipeline.units import POOLS

if TYPE_CHECKING:
    from pipeline.predictors.params import TrainParams


@dataclass
class FitResult:
    curves: list[dict[str, float]]
    best_epoch: dict[str, int]
    best_score: dict[str, float]
    fit_rows: np.ndarray
    select_rows: np.ndarray
    seconds: float = 0.0


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation split -> (train rows, validation rows), each sorted; at least one row each."""
    if n < 2:
        raise ValueError(f"need at least 2 examples to split into train and validation, have {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def selection_split(train: np.ndarray, settings: TrainParams) -> tuple[np.ndarray, np.ndarray]:
    """The training rows -> (fit rows, selection slice), seeded (seed + 1: independent of the held-out split)."""
    fit_i, sel_i = split_indices(len(train), settings.select_fraction, settings.seed + 1)
    return train[fit_i], train[sel_i]


def evaluated(pred: Predictor) -> list[int]:
    """Indices into `pred.layers` of the layers that are scored (layer 0 always stays dense)."""
    return [i for i, l in enumerate(pred.layers) if l >= 1]


def selection_score(p: np.ndarray, target: Spearman) -> float:
    """What model selection maximises: the mean of the joint (global-mask) and the per-layer
    (local-mask) Spearman ρ, both over examples; p [N, L, U] over the evaluated layers, `target` the
    selection slice's true scores (their ranks computed once)."""
    return 0.5 * (target.joint(p) + target.per_layer(p))


def predict(
    pred: Predictor, x: np.ndarray, batch_size: int = 256, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Training-view outputs for rows x -> heads [N, len(layers), H], neurons [N, len(layers), F]."""
    pred.eval()
    hs, ns = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h, n = pred(torch.from_numpy(x[i : i + batch_size]).to(device))
            hs.append(h.float().cpu().numpy())
            ns.append(n.float().cpu().numpy())
    return np.concatenate(hs), np.concatenate(ns)


def _adamw(pred: Predictor, settings: TrainParams) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (several times faster on CPU for large predictors)."""
    try:
        return torch.optim.AdamW(pred.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(pred.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _loss(pred: Predictor, x: Tensor, yh: Tensor, yn: Tensor) -> Tensor:
    h, n = pred(x)
    return torch.nn.functional.mse_loss(h, yh) + torch.nn.functional.mse_loss(n, yn)


def _snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(
    pred: Predictor,
    x: np.ndarray,
    y_heads: np.ndarray,
    y_neurons: np.ndarray,
    train: np.ndarray,
    settings: TrainParams,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    transformed: tuple[np.ndarray, np.ndarray] | None = None,
) -> FitResult:
    """Train `pred` in place on the training rows `train` (targets: per-layer min-max scores already
    restricted to `pred.layers`) and leave it at its best epoch, per pool, on the selection slice.

    Returns the curves — one record per epoch from 0 (the starting point): epoch, lr, train_loss (fit
    rows), val_loss and val_spearman_{heads,neurons} (joint ρ, the *selection slice*, never the
    held-out rows), seconds — and the chosen epochs. `transformed`: the targets after `train.target_transform`
    when the caller has them already (the transform is per example, so it may cover every row)."""
    t_start = time.perf_counter()
    fit_rows, sel_rows = selection_split(train, settings)
    transform = TARGET_TRANSFORMS[settings.target_transform]
    th, tn = transformed if transformed is not None else (transform(y_heads), transform(y_neurons))
    dev = torch.device(settings.device)
    if settings.standardize:
        pred.set_standardisation(x[fit_rows])
    pred.heads.start_at(torch.from_numpy(th[fit_rows].mean(0)))
    pred.neurons.start_at(torch.from_numpy(tn[fit_rows].mean(0)))
    pred.to(dev)
    X = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    YH = torch.from_numpy(np.ascontiguousarray(th)).to(dev)
    YN = torch.from_numpy(np.ascontiguousarray(tn)).to(dev)
    tr = torch.from_numpy(fit_rows).to(dev)
    steps_per_epoch = math.ceil(len(fit_rows) / settings.batch_size)
    opt = _adamw(pred, settings)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(settings.seed)
    keep = evaluated(pred)
    sel_true = {
        "heads": Spearman(y_heads[sel_rows][:, keep], settings.device),
        "neurons": Spearman(y_neurons[sel_rows][:, keep], settings.device),
    }
    best = {u: (-math.inf, 0, None) for u in POOLS}  # (score, epoch, state)
    curves = []
    for epoch in range(settings.epochs + 1):
        t0 = time.perf_counter()
        if epoch == 0:
            ph, pn = predict(pred, x[fit_rows], device=settings.device)
            total = float(((ph - th[fit_rows]) ** 2).mean() + ((pn - tn[fit_rows]) ** 2).mean()) * len(fit_rows)
        else:
            pred.train()
            order = tr[torch.randperm(len(tr), generator=gen).to(dev)]
            total = 0.0
            for i in range(0, len(order), settings.batch_size):
                b = order[i : i + settings.batch_size]
                loss = _loss(pred, X[b], YH[b], YN[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(b)
        ph, pn = predict(pred, x[sel_rows], device=settings.device)
        rec = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": total / len(fit_rows),
            "val_loss": float(((ph - th[sel_rows]) ** 2).mean() + ((pn - tn[sel_rows]) ** 2).mean()),
        }
        for unit, p in (("heads", ph), ("neurons", pn)):
            p, target = p[:, keep], sel_true[unit]
            rec[f"val_spearman_{unit}"] = target.joint(p)
            score = 0.5 * (rec[f"val_spearman_{unit}"] + target.per_layer(p))
            rec[f"val_score_{unit}"] = score
            if score > best[unit][0]:
                best[unit] = (score, epoch, _snapshot(getattr(pred, unit)))
        rec["seconds"] = time.perf_counter() - t0
        curves.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    for unit in POOLS:
        getattr(pred, unit).load_state_dict(best[unit][2])
    return FitResult(
        curves=curves,
        best_epoch={u: best[u][1] for u in POOLS},
        best_score={u: float(best[u][0]) for u in POOLS},
        fit_rows=fit_rows,
        select_rows=sel_rows,
        seconds=time.perf_counter() - t_start,
    )


def evaluate(
    pred: Predictor,
    x: np.ndarray,
    y_heads: np.ndarray,
    y_neurons: np.ndarray,
    sparsities: list[float],
    device: str = "cpu",
) -> dict[str, Any]:
    """Held-out ranking metrics over layers 1..L-1; y_* are full [N, L, U] targets.

    Returns {"heads": {...}, "neurons": {...}} with spearman_joint (all units of layers 1..L-1 ranked
    together, per example), spearman_per_layer (mean of per-layer ρ) and recall_{global,local}_s<s>."""
    ph, pn = predict(pred, x, device=device)
    return score_predictions(pred, ph, pn, y_heads, y_neurons, sparsities, device)


def score_predictions(
    pred: Predictor,
    ph: np.ndarray,
    pn: np.ndarray,
    y_heads: np.ndarray,
    y_neurons: np.ndarray,
    sparsities: list[float],
    device: str | None = None,
) -> dict[str, Any]:
    """`evaluate`'s metrics for predictions ph/pn [N, len(pred.layers), U] (from any model) against
    full [N, L, U] targets, ρ ranked on `device`."""
    keep = evaluated(pred)
    layers = [pred.layers[i] for i in keep]
    return {
        "heads": ranking_metrics(ph[:, keep], y_heads[:, layers], sparsities, device),
        "neurons": ranking_metrics(pn[:, keep], y_neurons[:, layers], sparsities, device),
    }


def evaluate_train_mean(
    y_heads: np.ndarray,
    y_neurons: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    sparsities: list[float],
    device: str | None = None,
) -> dict[str, Any]:
    """The no-predictor reference: the mean training target (a static ranking) used as the prediction
    for every held-out example, scored exactly like `evaluate` (layers 1..L-1). A predictor is only
    contextual to the extent that it beats this."""
    out = {}
    for unit, y in (("heads", y_heads), ("neurons", y_neurons)):
        true = y[val][:, 1:]
        mean = y[train][:, 1:].mean(0, keepdims=True)
        out[unit] = ranking_metrics(np.broadcast_to(mean, true.shape), true, sparsities, device)
    return out
