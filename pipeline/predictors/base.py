"""The predictor interface shared by ShadowLLM and the DejaVu-style baselines (SPEC §6).

Callers always pass *raw* features; every predictor min-max normalises each feature vector per
example (to [0, 1]; a constant vector -> 0) inside its forward, identically in every prune mode.
Outputs are per-layer min-max-normalised importance estimates (the training targets' scale).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.predictors.mlp import StackedMLP


def minmax_features(x: Tensor) -> Tensor:
    """Per example (over the last dim) min-max to [0, 1]; a constant vector -> 0."""
    lo = x.amin(-1, keepdim=True)
    span = x.amax(-1, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


class Predictor(nn.Module):
    """Maps raw features to importance of heads [.., H] and neurons [.., F] of the layers in `layers`.

    Subclasses set `kind`, `input_kind` and implement `groups()`, `inputs()` and the two predict calls.
    `forward(x)` is the training view: x as returned by `inputs()` -> heads [B, len(layers), H],
    neurons [B, len(layers), F] for exactly `self.layers`."""

    kind: ClassVar[str]
    input_kind: ClassVar[str]  # "l0_heads" (layer-0 head outputs [.., H*D]) or "layer_input" ([.., E])

    def __init__(self, criterion: str, dims: dict[str, Any], *, hidden_heads: int, hidden_neurons: int,
                 rank_heads: int = 0, rank_neurons: int = 0):
        super().__init__()
        self.criterion = criterion
        self.dims = dict(dims)
        self.widths = {"hidden_heads": int(hidden_heads), "hidden_neurons": int(hidden_neurons),
                       "rank_heads": int(rank_heads), "rank_neurons": int(rank_neurons)}
        self.n_layers, self.n_heads, self.ffn_dim = dims["n_layers"], dims["n_heads"], dims["ffn_dim"]
        self.layers: list[int] = self.predicted_layers()
        g, in_dim, out_h, out_f = self.shape()
        self.heads = StackedMLP(g, in_dim, hidden_heads, out_h, rank_heads)
        self.neurons = StackedMLP(g, in_dim, hidden_neurons, out_f, rank_neurons)

    # ---- subclass hooks ----
    def predicted_layers(self) -> list[int]:
        raise NotImplementedError

    def shape(self) -> tuple[int, int, int, int]:
        """(groups, input width, head outputs per group, neuron outputs per group)."""
        raise NotImplementedError

    def inputs(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """The training/evaluation input rows from trace feature columns {"feat_l0": [N, H*D], "feat_layers": [N, L*E]}."""
        raise NotImplementedError

    # ---- common ----
    @property
    def in_dim(self) -> int:
        return self.heads.in_dim

    def predict_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{self.kind} predicts one layer at a time; use predict_layer")

    def predict_layer(self, l: int, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def n_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "criterion": self.criterion, "input_kind": self.input_kind,
                "widths": dict(self.widths), "dims": self.dims, "layers": list(self.layers),
                "n_params": self.n_params(), "bytes": self.n_bytes()}
