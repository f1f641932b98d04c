"""The predictor interface shared by ShadowLLM and the DejaVu-style baselines (SPEC §6).

Callers always pass *raw* features; every predictor normalises them inside its forward, identically
in every prune mode: first each feature vector per example by min-max (to [0, 1]; a constant vector
-> 0), then each feature by the training rows' mean and standard deviation of those min-max values
(buffers `in_mean`, `in_std`, saved with the weights; identity until `set_standardisation`).

The per-feature step is there because min-max alone leaves the input dominated by a few channels:
layer-0 head outputs and residual streams have per-channel offsets far larger than their
per-example variation, so every min-max vector looks alike and the MLP learned little in a few
hundred steps (measurements in docs/train.md).

Outputs are importance estimates in the training targets' space (per-layer min-max scores, or a
transform of them that is monotone per example — `targets.TARGET_TRANSFORMS`); callers only rank them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.normalize import minmax
from pipeline.params import Section, at_least
from pipeline.predictors.mlp import StackedMLP
from pipeline.registry import Registry


@dataclass(frozen=True)
class PredictorWidths(Section):
    """The widths of a predictor's two MLPs (`train.widths.<kind>`; a saved predictor's `config.json`
    `widths`): in -> hidden (ReLU) -> [rank, linear; 0 = full-rank output] -> out, heads and neurons."""

    hidden_heads: int = at_least(1)
    hidden_neurons: int = at_least(1)
    rank_heads: int = at_least(0)
    rank_neurons: int = at_least(0)


minmax_features = minmax  # per example, over the features (pipeline.normalize)


class Predictor(nn.Module):
    """Maps raw features to importance of heads [.., H] and neurons [.., F] of the layers in `layers`.

    Subclasses set `kind`, `input_kind`, `feature_column`, implement `predicted_layers()`, `shape()`,
    `inputs()` and the predict calls, and are registered with `@registered` (that is all a new kind
    needs). `forward(x)` is the training view: x as returned by `inputs()` -> heads [B, len(layers), H],
    neurons [B, len(layers), F] for exactly `self.layers`."""

    kind: ClassVar[str]
    input_kind: ClassVar[str]  # "l0_heads" (layer-0 head outputs [.., H*D]) or "layer_input" ([.., E])
    feature_column: ClassVar[str]  # the trace column `inputs()` reads: "feat_l0" or "feat_layers"

    def __init__(
        self,
        criterion: str,
        dims: dict[str, Any],
        *,
        hidden_heads: int,
        hidden_neurons: int,
        rank_heads: int,
        rank_neurons: int,
    ):
        super().__init__()
        self.criterion = criterion
        self.dims = dict(dims)
        self.widths = {
            "hidden_heads": int(hidden_heads),
            "hidden_neurons": int(hidden_neurons),
            "rank_heads": int(rank_heads),
            "rank_neurons": int(rank_neurons),
        }
        self.n_layers, self.n_heads, self.ffn_dim = dims["n_layers"], dims["n_heads"], dims["ffn_dim"]
        self.layers: list[int] = self.predicted_layers()
        g, in_dim, out_h, out_f = self.shape()
        self.heads = StackedMLP(g, in_dim, hidden_heads, out_h, rank_heads)
        self.neurons = StackedMLP(g, in_dim, hidden_neurons, out_f, rank_neurons)
        self.register_buffer("in_mean", torch.zeros(g, in_dim))
        self.register_buffer("in_std", torch.ones(g, in_dim))

    # ---- subclass hooks ----
    def predicted_layers(self) -> list[int]:
        raise NotImplementedError

    def shape(self) -> tuple[int, int, int, int]:
        """(groups, input width, head outputs per group, neuron outputs per group)."""
        raise NotImplementedError

    def inputs(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """The training/evaluation input rows from trace feature columns
        {"feat_l0": [N, H*D], "feat_layers": [N, L*E]}."""
        raise NotImplementedError

    # ---- common ----
    def normalise(self, x: Tensor, g: int | None = None) -> Tensor:
        """Raw features -> the MLP input: per-example min-max, then per-feature standardisation.
        x [..., G, in] (training view) when g is None, else x [..., in] for group g alone."""
        mean, std = (self.in_mean, self.in_std) if g is None else (self.in_mean[g], self.in_std[g])
        return (minmax_features(x) - mean) / std

    @torch.no_grad()
    def set_standardisation(self, x: np.ndarray) -> None:
        """Per-feature mean/std of the min-max inputs of rows x (training view [N, G, in] or, for one
        group, [N, in]); a feature with (near) zero spread keeps std 1."""
        z = minmax_features(torch.from_numpy(np.ascontiguousarray(x)).double())
        z = z.reshape(len(z), *self.in_mean.shape)
        std = z.std(0, unbiased=False)
        self.in_mean.copy_(z.mean(0).to(self.in_mean))
        self.in_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).to(self.in_std))

    def predict_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{self.kind} predicts one layer at a time; use predict_layer")

    def predict_layer(self, l: int, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def n_params(self) -> int:
        """Trained parameters plus the standardisation buffers (they are read at every prediction)."""
        return sum(p.numel() for p in self.parameters()) + self.in_mean.numel() + self.in_std.numel()

    def n_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters()) + sum(
            b.numel() * b.element_size() for b in (self.in_mean, self.in_std)
        )

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "criterion": self.criterion,
            "input_kind": self.input_kind,
            "widths": dict(self.widths),
            "dims": self.dims,
            "layers": list(self.layers),
            "n_params": self.n_params(),
            "bytes": self.n_bytes(),
        }


PREDICTORS: Registry[type[Predictor]] = Registry("predictor kind")


def registered(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: make `cls` a predictor kind, by its `kind` (`PREDICTORS`, `build`, `train.kinds`)."""
    PREDICTORS.register(cls.kind, cls)
    return cls
