"""Min-max normalisation over the last axis: the one definition behind the per-layer normalised scores
(aggregate's targets and static ranking, the masks' `normalize: minmax`) and the per-example predictor
inputs (`Predictor.normalise`, ridge)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def minmax(x: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """(x - min) / (max - min) over the last axis, in [0, 1]; a constant row -> 0. A tensor stays a tensor
    (its dtype and device), an array becomes float32."""
    if isinstance(x, Tensor):
        lo = x.amin(-1, keepdim=True)
        span = x.amax(-1, keepdim=True) - lo
        return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    a = np.asarray(x, dtype=np.float32)
    lo = a.min(-1, keepdims=True)
    span = a.max(-1, keepdims=True) - lo
    out = np.zeros_like(a)
    np.divide(a - lo, span, out=out, where=span > 0)
    return out
