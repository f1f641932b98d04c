"""Predictor shapes for the latency benchmark (random weights; SPEC §6 for what they compute).

- ShadowLLM: one predictor fed with layer 0's head outputs (pre-o_proj, E = H·d), min-max normalised per
  example: E → head_hidden → L·H (heads) and E → neuron_hidden [→ neuron_rank] → L·F (neurons). Both first
  layers read the same input and run as one matrix.
- DejaVu: per sparse layer t ≥ 1, an MLP fed with the input (residual stream) of layer t-1 (look-ahead):
  D → head_hidden → H and D → neuron_hidden → F, first layers fused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .shapes import ModelShape
from .weights import Linear


@dataclass(frozen=True)
class PredictorSpec:
    head_hidden: int
    neuron_hidden: int
    neuron_rank: int = 0          # 0: full-rank output layer

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorSpec":
        return cls(int(d["head_hidden"]), int(d["neuron_hidden"]), int(d.get("neuron_rank", 0) or 0))


@dataclass
class MLPPredictor:
    first: Linear                 # [head_hidden + neuron_hidden, E], min-max input, ReLU
    head_out: Linear              # [n_head_scores, head_hidden]
    neuron_mid: Linear | None     # [rank, neuron_hidden]
    neuron_out: Linear            # [n_neuron_scores, rank or neuron_hidden]
    spec: PredictorSpec

    def linears(self) -> list[Linear]:
        return [x for x in (self.first, self.head_out, self.neuron_mid, self.neuron_out) if x is not None]

    def nbytes(self) -> int:
        return sum(x.w.numel() * x.w.element_size() for x in self.linears())

    def nparams(self) -> int:
        return sum(x.w.numel() for x in self.linears())


def _mlp(E: int, n_heads: int, n_neurons: int, spec: PredictorSpec, gen, device, dtype) -> MLPPredictor:
    def lin(n, k, rowsum=False):
        w = torch.randn((n, k), generator=gen, device=device, dtype=dtype).mul_(k ** -0.5)
        b = torch.randn((n,), generator=gen, device=device, dtype=torch.float32).mul_(0.1)
        return Linear(w, b, w.sum(dim=1, dtype=torch.float32) if rowsum else None)
    first = lin(spec.head_hidden + spec.neuron_hidden, E, rowsum=True)
    mid = lin(spec.neuron_rank, spec.neuron_hidden) if spec.neuron_rank else None
    return MLPPredictor(first, lin(n_heads, spec.head_hidden), mid,
                        lin(n_neurons, spec.neuron_rank or spec.neuron_hidden), spec)


def build_shadowllm(shape: ModelShape, spec: PredictorSpec, *, device, dtype, seed: int = 1) -> MLPPredictor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return _mlp(shape.heads * shape.head_dim, shape.layers * shape.heads, shape.layers * shape.ffn, spec, gen,
                device, dtype)


def build_dejavu(shape: ModelShape, spec: PredictorSpec, *, device, dtype, seed: int = 2) -> list[MLPPredictor | None]:
    """Index t holds the predictor for layer t (None for layer 0, which stays dense)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return [None] + [_mlp(shape.hidden, shape.heads, shape.ffn, spec, gen, device, dtype)
                     for _ in range(1, shape.layers)]


def shadowllm_bytes(shape: ModelShape, spec: PredictorSpec, elem: int = 2) -> int:
    E, L = shape.heads * shape.head_dim, shape.layers
    n = (spec.head_hidden + spec.neuron_hidden) * E + L * shape.heads * spec.head_hidden
    n += (spec.neuron_rank * spec.neuron_hidden + L * shape.ffn * spec.neuron_rank) if spec.neuron_rank \
        else L * shape.ffn * spec.neuron_hidden
    return n * elem


def dejavu_bytes(shape: ModelShape, spec: PredictorSpec, elem: int = 2) -> int:
    per = (spec.head_hidden + spec.neuron_hidden) * shape.hidden + shape.heads * spec.head_hidden
    per += (spec.neuron_rank * spec.neuron_hidden + shape.ffn * spec.neuron_rank) if spec.neuron_rank \
        else shape.ffn * spec.neuron_hidden
    return per * (shape.layers - 1) * elem
