"""Ridge regression on a predictor's own input: the linear baseline reported beside every predictor.

Same features (the predictor's normalised input: per-example min-max, then its per-feature
standardisation), same targets (after the recipe's target transform), same rows (fitted on the fit
rows, α chosen on the selection slice by `fit.selection_score`), scored held out like the predictor.
One linear map per predictor group (ShadowLLM: one for all layers; DejaVu: one per layer), an
unpenalised intercept, closed form through the SVD of the centred fit features (n rows < features
is fine: the solution lives in the row space), one α per unit pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.predictors.base import Predictor, minmax_features
from pipeline.predictors.fit import FitResult, evaluated, selection_score
from pipeline.predictors.targets import TARGET_TRANSFORMS
from pipeline.ranking import Spearman
from pipeline.units import POOLS

if TYPE_CHECKING:
    from pipeline.predictors.params import TrainParams


@dataclass
class _Group:
    """One group's ridge solution for every α, kept factorised: pred(z) = ((z - mu) V) diag(s/(s²+α)) Uᵀ Yc + ym."""

    mu: np.ndarray  # [d]
    v: np.ndarray  # [d, r]
    s: np.ndarray  # [r]
    uty: np.ndarray  # [r, U]
    ym: np.ndarray  # [U]

    @classmethod
    def solve(cls, z: np.ndarray, y: np.ndarray) -> _Group:
        mu, ym = z.mean(0), y.mean(0)
        u, s, vt = np.linalg.svd(z - mu, full_matrices=False)
        return cls(mu=mu, v=vt.T, s=s, uty=u.T @ (y - ym), ym=ym)

    def predict(self, z: np.ndarray, alpha: float) -> np.ndarray:
        return ((z - self.mu) @ self.v * (self.s / (self.s**2 + alpha))) @ self.uty + self.ym


def _features(pred: Predictor, x: np.ndarray) -> np.ndarray:
    """The predictor's normalised input, always [N, G, in] (float64)."""
    mean, std = pred.in_mean.detach().cpu().double(), pred.in_std.detach().cpu().double()
    z = minmax_features(torch.from_numpy(np.ascontiguousarray(x)).double().reshape(len(x), *mean.shape))
    return ((z - mean) / std).numpy()


class Ridge:
    """Fit with `Ridge.fit(...)`, then `predict(x)` -> heads, neurons in `pred`'s training-view shapes."""

    def __init__(
        self,
        pred: Predictor,
        groups: dict[str, list[_Group]],
        alpha: dict[str, float],
        scores: dict[str, dict[float, float]],
    ):
        self.pred, self.groups, self.alpha, self.scores = pred, groups, alpha, scores

    @classmethod
    def fit(
        cls,
        pred: Predictor,
        x: np.ndarray,
        y_heads: np.ndarray,
        y_neurons: np.ndarray,
        result: FitResult,
        settings: TrainParams,
        transformed: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Ridge:
        """`pred` after `fit.fit` (its standardisation set); `result` gives the fit rows and selection slice;
        `transformed` as for `fit.fit` (the targets after the transform, every row)."""
        transform = TARGET_TRANSFORMS[settings.target_transform]
        if transformed is None:
            transformed = (transform(y_heads[result.fit_rows]), transform(y_neurons[result.fit_rows]))
        else:
            transformed = (transformed[0][result.fit_rows], transformed[1][result.fit_rows])
        z = _features(pred, x)
        zf, zs = z[result.fit_rows], z[result.select_rows]
        keep = evaluated(pred)
        groups, alpha, scores = {}, {}, {}
        for unit, y, t in (("heads", y_heads, transformed[0]), ("neurons", y_neurons, transformed[1])):
            t = t.astype(np.float64)
            shape = t.shape[1:]  # [len(layers), U]
            g = zf.shape[1]
            t = t.reshape(len(t), g, -1)  # ShadowLLM: all layers in its one group
            groups[unit] = [_Group.solve(zf[:, i], t[:, i]) for i in range(g)]
            true = Spearman(y[result.select_rows][:, keep], settings.device)
            scores[unit] = {}
            for a in settings.ridge_alphas:
                p = np.stack([grp.predict(zs[:, i], a) for i, grp in enumerate(groups[unit])], 1).reshape(
                    len(zs), *shape
                )
                scores[unit][a] = selection_score(p[:, keep], true)
            alpha[unit] = max(settings.ridge_alphas, key=lambda a, u=unit: scores[u][a])
        return cls(pred, groups, alpha, scores)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = _features(self.pred, x)
        shapes = {
            "heads": (len(self.pred.layers), self.pred.n_heads),
            "neurons": (len(self.pred.layers), self.pred.ffn_dim),
        }
        out = []
        for unit in POOLS:
            p = np.stack([grp.predict(z[:, i], self.alpha[unit]) for i, grp in enumerate(self.groups[unit])], 1)
            out.append(p.reshape(len(z), *shapes[unit]).astype(np.float32))
        return out[0], out[1]
