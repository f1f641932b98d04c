"""Predictor shapes for the latency benchmark (random weights; SPEC §6 for what they compute).

- ShadowLLM: one predictor fed with layer 0's head outputs (pre-o_proj, E = H·d), min-max normalised per
  example: E → hidden_heads [→ rank_heads] → L·H (heads) and E → hidden_neurons [→ rank_neurons] → L·F
  (neurons). Both first layers read the same input and run as one matrix.
- DejaVu: per sparse layer t ≥ 1, an MLP fed with the input (residual stream) of layer t-1 (look-ahead):
  D → hidden_heads → H and D → hidden_neurons → F, first layers fused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .shapes import ModelShape
from .weights import Linear


@dataclass(frozen=True)
class PredictorSpec:
    """Widths, named as in `train.widths` (pipeline/predictors/mlp.py: in -> hidden (ReLU) -> [rank] -> out)."""

    hidden_heads: int
    hidden_neurons: int
    rank_neurons: int = 0  # 0: full-rank output layer
    rank_heads: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> PredictorSpec:
        unknown = set(d) - {"hidden_heads", "hidden_neurons", "rank_heads", "rank_neurons"}
        if unknown:
            raise ValueError(f"unknown predictor width keys {sorted(unknown)}")
        return cls(
            int(d["hidden_heads"]),
            int(d["hidden_neurons"]),
            int(d.get("rank_neurons", 0) or 0),
            int(d.get("rank_heads", 0) or 0),
        )

    def to_dict(self) -> dict:
        return {
            "hidden_heads": self.hidden_heads,
            "hidden_neurons": self.hidden_neurons,
            "rank_heads": self.rank_heads,
            "rank_neurons": self.rank_neurons,
        }


@dataclass
class MLPPredictor:
    first: Linear  # [hidden_heads + hidden_neurons, E], min-max input, ReLU
    head_mid: Linear | None  # [rank_heads, hidden_heads]
    head_out: Linear  # [n_head_scores, rank_heads or hidden_heads]
    neuron_mid: Linear | None  # [rank_neurons, hidden_neurons]
    neuron_out: Linear  # [n_neuron_scores, rank_neurons or hidden_neurons]
    spec: PredictorSpec

    def linears(self) -> list[Linear]:
        return [
            x for x in (self.first, self.head_mid, self.head_out, self.neuron_mid, self.neuron_out) if x is not None
        ]

    def nbytes(self) -> int:
        return sum(x.w.numel() * x.w.element_size() for x in self.linears())

    def nparams(self) -> int:
        return sum(x.w.numel() for x in self.linears())


def _mlp(E: int, n_heads: int, n_neurons: int, spec: PredictorSpec, gen, device, dtype) -> MLPPredictor:
    def lin(n, k, rowsum=False, bias=True):
        w = torch.randn((n, k), generator=gen, device=device, dtype=dtype).mul_(k**-0.5)
        b = torch.randn((n,), generator=gen, device=device, dtype=torch.float32).mul_(0.1) if bias else None
        return Linear(w, b, w.sum(dim=1, dtype=torch.float32) if rowsum else None)

    first = lin(spec.hidden_heads + spec.hidden_neurons, E, rowsum=True)
    hmid = lin(spec.rank_heads, spec.hidden_heads, bias=False) if spec.rank_heads else None
    nmid = lin(spec.rank_neurons, spec.hidden_neurons, bias=False) if spec.rank_neurons else None
    return MLPPredictor(
        first,
        hmid,
        lin(n_heads, spec.rank_heads or spec.hidden_heads),
        nmid,
        lin(n_neurons, spec.rank_neurons or spec.hidden_neurons),
        spec,
    )


def build_shadowllm(shape: ModelShape, spec: PredictorSpec, *, device, dtype, seed: int = 1) -> MLPPredictor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return _mlp(
        shape.heads * shape.head_dim, shape.layers * shape.heads, shape.layers * shape.ffn, spec, gen, device, dtype
    )


def build_dejavu(shape: ModelShape, spec: PredictorSpec, *, device, dtype, seed: int = 2) -> list[MLPPredictor | None]:
    """Index t holds the predictor for layer t (None for layer 0, which stays dense)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return [None] + [
        _mlp(shape.hidden, shape.heads, shape.ffn, spec, gen, device, dtype) for _ in range(1, shape.layers)
    ]


def _out(n_out: int, hidden: int, rank: int) -> int:
    return rank * hidden + n_out * rank if rank else n_out * hidden


def shadowllm_bytes(shape: ModelShape, spec: PredictorSpec, elem: int = 2) -> int:
    E, L = shape.heads * shape.head_dim, shape.layers
    n = (spec.hidden_heads + spec.hidden_neurons) * E
    n += _out(L * shape.heads, spec.hidden_heads, spec.rank_heads) + _out(
        L * shape.ffn, spec.hidden_neurons, spec.rank_neurons
    )
    return n * elem


def dejavu_bytes(shape: ModelShape, spec: PredictorSpec, elem: int = 2) -> int:
    per = (spec.hidden_heads + spec.hidden_neurons) * shape.hidden
    per += _out(shape.heads, spec.hidden_heads, spec.rank_heads) + _out(
        shape.ffn, spec.hidden_neurons, spec.rank_neurons
    )
    return per * (shape.layers - 1) * elem
