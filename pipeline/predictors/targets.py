"""The predictors' target transforms (`train.target_transform`): each monotone per example, so rankings are kept.

`none` leaves the scores as they are, `log` spreads the bulk of heavy-tailed scores (`log_targets`), `rank`
replaces them by their per-example rank over all units (`rank_targets`). Used by the recipe
(`pipeline.predictors.fit`), the ridge baseline and the `train:` params' validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipeline.ranking import numpy_ranks

LOG_EPS = 1e-3  # `log` transform: log1p(y / eps); fisher neuron targets have median ~1e-3 (issue 9)


def _identity(y: np.ndarray) -> np.ndarray:
    return np.asarray(y, dtype=np.float32)


def log_targets(y: np.ndarray) -> np.ndarray:
    """log1p(y / eps) / log1p(1 / eps): [0, 1] -> [0, 1], elementwise increasing; spreads the bulk of
    heavy-tailed scores (fisher) that MSE on raw values ignores."""
    return (np.log1p(np.asarray(y, dtype=np.float64) / LOG_EPS) / math.log1p(1 / LOG_EPS)).astype(np.float32)


def rank_targets(y: np.ndarray) -> np.ndarray:
    """[N, G, U] -> per example, the rank of each unit among *all* units of all G layers (ties
    averaged), scaled to [0, 1]. Monotone per example across layers, so both the joint (global) and
    the per-layer (local) ranking of every example are exactly those of y."""
    n = len(y)
    flat = np.asarray(y).reshape(n, -1)
    r = (numpy_ranks(flat) - 1) / max(1, flat.shape[-1] - 1)
    return r.reshape(y.shape).astype(np.float32)


TARGET_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": _identity,
    "log": log_targets,
    "rank": rank_targets,
}
