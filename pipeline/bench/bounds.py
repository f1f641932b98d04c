"""Bytes a decode step reads, and the bandwidth bound of SPEC §8.

Decode is memory-bound: time ≈ bytes read / HBM bandwidth. Counted per step (one token for each of the B
sequences): the weight rows the plan keeps (q/k/v of kept heads and kept kv groups, o of kept heads,
gate/up/down or fc1/fc2 of kept neurons), the LM head, the predictor weights, and the KV cache the kept heads
read (mean context over the generation). Biases, norms and activations are under 0.1% and left out.
The speedup bound over dense is dense_bytes / bytes = 1 / (1 − f·s + p) (f·s: the share of dense bytes the
skipped units own; p: predictor bytes over dense bytes).
"""

from __future__ import annotations

import torch

from .shapes import ModelShape


def step_bytes(
    shape: ModelShape,
    head_keep: torch.Tensor,
    neuron_keep: torch.Tensor,
    *,
    batch: int,
    context: float,
    predictor_bytes: int = 0,
    elem: int = 2,
) -> dict[str, float]:
    """head_keep [L, H] bool, neuron_keep [L, F] bool -> bytes by part for one decode step."""
    s = shape
    D, d = s.hidden, s.head_dim
    q_heads = head_keep.sum(1).double()
    kv_heads = head_keep.view(s.layers, s.kv_heads, s.group_size).any(2).sum(1).double()
    neurons = neuron_keep.sum(1).double()
    qkv = ((q_heads + 2 * kv_heads) * d * D).sum().item() * elem
    o = (q_heads * d * D).sum().item() * elem
    mlp_in = (neurons * D * (2 if s.gated else 1)).sum().item() * elem
    mlp_out = (neurons * D).sum().item() * elem
    head = s.vocab * D * elem
    kv = (kv_heads * 2 * d).sum().item() * context * batch * elem
    total = qkv + o + mlp_in + mlp_out + head + kv + predictor_bytes
    return {
        "attn_bytes": qkv + o,
        "mlp_bytes": mlp_in + mlp_out,
        "lm_head_bytes": head,
        "kv_bytes": kv,
        "predictor_bytes": float(predictor_bytes),
        "total_bytes": total,
        "qkv_bytes": qkv,
        "o_bytes": o,
        "mlp_in_bytes": mlp_in,
        "mlp_out_bytes": mlp_out,
    }


def dense_bytes(shape: ModelShape, *, batch: int, context: float) -> dict[str, float]:
    return step_bytes(
        shape,
        torch.ones(shape.layers, shape.heads, dtype=torch.bool),
        torch.ones(shape.layers, shape.ffn, dtype=torch.bool),
        batch=batch,
        context=context,
    )


def bound(total_bytes: float, dense_total: float, copy_gbps: float) -> dict[str, float]:
    """Bandwidth-bound time (ms) at the measured copy bandwidth, and the speedup bound over dense."""
    return {"bound_ms": total_bytes / (copy_gbps * 1e9) * 1e3, "speedup_bound": dense_total / total_bytes}
