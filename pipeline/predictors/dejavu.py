"""DejaVu-style baselines: one small MLP per layer (heads and neurons), fed with a residual-stream
hidden state at the last token.

- `dejavu`: layer l's predictor reads layer l's own input (synchronous; all L layers).
- `dejavu_lookahead`: layer l's predictor reads layer l-1's input (DejaVu's asynchronous design),
  so layer 0 has no predictor (it stays dense anyway); layers 1..L-1.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from pipeline.predictors.base import Predictor, registered


@registered
class DejaVuPredictor(Predictor):
    kind = "dejavu"
    input_kind = "layer_input"
    feature_column = "feat_layers"
    offset = 0  # the predictor of layer l reads the input of layer l - offset

    def predicted_layers(self) -> list[int]:
        return list(range(self.offset, self.n_layers))

    def shape(self) -> tuple[int, int, int, int]:
        return len(self.layers), self.dims["hidden"], self.n_heads, self.ffn_dim

    def source_layers(self) -> list[int]:
        """The layer whose input feeds each predicted layer, aligned with `layers`."""
        return [l - self.offset for l in self.layers]

    def inputs(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """[N, L*E] layer inputs -> [N, len(layers), E], row g = input of layer layers[g] - offset."""
        rows = feats[self.feature_column]
        x = rows.reshape(len(rows), self.n_layers, self.dims["hidden"])
        return x[:, self.source_layers()]

    def _group(self, l: int) -> int:
        if l not in self.layers:
            raise ValueError(
                f"{self.kind} has no predictor for layer {l} (predicts layers {self.layers[0]}..{self.layers[-1]})"
            )
        return l - self.offset

    def predict_layer(self, l: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., E] raw input hidden state of layer l - offset -> heads [..., H], neurons [..., F] of layer l."""
        g = self._group(l)
        z = self.normalise(x, g)
        return self.heads.group(g, z), self.neurons.group(g, z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, len(layers), E] (from `inputs`) -> heads [B, len(layers), H], neurons [B, len(layers), F]."""
        z = self.normalise(x)
        return self.heads(z), self.neurons(z)


@registered
class DejaVuLookahead(DejaVuPredictor):
    kind = "dejavu_lookahead"
    offset = 1
