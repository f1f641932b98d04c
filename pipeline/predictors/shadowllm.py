"""ShadowLLM: one predictor fed with the layer-0 head outputs (pre-o_proj, one token) that predicts
the importance of every head and neuron of every layer at once: E0 -> hidden -> (L*H) for heads,
a second MLP E0 -> hidden [-> rank] -> (L*F) for neurons."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from pipeline.predictors.base import Predictor, registered


@registered
class ShadowLLMPredictor(Predictor):
    kind = "shadowllm"
    input_kind = "l0_heads"
    feature_column = "feat_l0"

    def predicted_layers(self) -> list[int]:
        return list(range(self.n_layers))

    def shape(self) -> tuple[int, int, int, int]:
        in_dim = self.dims["n_heads"] * self.dims["head_dim"]
        return 1, in_dim, self.n_layers * self.n_heads, self.n_layers * self.ffn_dim

    def inputs(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return feats[self.feature_column]

    def predict_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., H*D] raw layer-0 head outputs -> heads [..., L, H], neurons [..., L, F]."""
        z = self.normalise(x.unsqueeze(-2))  # [..., 1, in]
        heads = self.heads(z).squeeze(-2).unflatten(-1, (self.n_layers, self.n_heads))
        neurons = self.neurons(z).squeeze(-2).unflatten(-1, (self.n_layers, self.ffn_dim))
        return heads, neurons

    def predict_layer(self, l: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Layer l's slice of predict_all (x is still the layer-0 output)."""
        heads, neurons = self.predict_all(x)
        return heads[..., l, :], neurons[..., l, :]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.predict_all(x)
