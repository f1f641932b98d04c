"""Sparsity plans: which heads and neurons each layer keeps, in device buffers the kernels read.

- `qkv_mask` [L, H + 2·KVH] int32: kept q heads, then kept kv heads (twice: k and v). A kv head is kept iff any
  q head of its group is kept (GQA). Row 0 (layer 0) is always all ones: layer 0 stays dense (SPEC §5).
- `head_idx` [L, H] int32 + `head_count` [L] int32: ascending kept q heads of each layer (the o-projection
  gathers their input columns).
- `ffn_idx` [L, F] int32 + `ffn_count` [L] int32: ascending kept neurons of each layer.
The predictors' selection kernels rewrite rows 1…L-1 in place every step; static plans are filled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.units import n_kept

from .shapes import ModelShape

# Units each pruned layer keeps out of n at a sparsity: the one definition, n − floor(s·n + 1/2) and at least 1,
# which the accuracy masks and the ranking recall use too (`pipeline.units`).
kept = n_kept


@dataclass
class Plan:
    qkv_mask: torch.Tensor
    head_idx: torch.Tensor
    head_count: torch.Tensor
    ffn_idx: torch.Tensor
    ffn_count: torch.Tensor
    k_heads: int
    k_neurons: int

    def host_masks(self, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
        """(head keep [L, H] bool, neuron keep [L, F] bool) on the CPU."""
        qm = self.qkv_mask.cpu()
        heads = qm[:, : shape.heads] != 0
        idx, cnt = self.ffn_idx.cpu(), self.ffn_count.cpu()
        neurons = torch.zeros(shape.layers, shape.ffn, dtype=torch.bool)
        for l in range(shape.layers):
            neurons[l, idx[l, : int(cnt[l])].long()] = True
        return heads, neurons


def dense_plan(shape: ModelShape, device) -> Plan:
    L, H, KVH, F = shape.layers, shape.heads, shape.kv_heads, shape.ffn
    return Plan(
        torch.ones(L, H + 2 * KVH, dtype=torch.int32, device=device),
        torch.arange(H, dtype=torch.int32, device=device).repeat(L, 1).contiguous(),
        torch.full((L,), H, dtype=torch.int32, device=device),
        torch.arange(F, dtype=torch.int32, device=device).repeat(L, 1).contiguous(),
        torch.full((L,), F, dtype=torch.int32, device=device),
        H,
        F,
    )


def set_layer(plan: Plan, shape: ModelShape, layer: int, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    """Write one layer's kept heads (bool [H]) and neurons (bool [F]) into the plan."""
    kv = heads.view(shape.kv_heads, shape.group_size).any(1)
    plan.qkv_mask[layer] = torch.cat([heads, kv, kv]).to(torch.int32).to(plan.qkv_mask.device)
    hz = torch.nonzero(heads).flatten().to(torch.int32)
    plan.head_idx[layer, : hz.numel()] = hz.to(plan.head_idx.device)
    plan.head_count[layer] = hz.numel()
    nz = torch.nonzero(neurons).flatten().to(torch.int32)
    plan.ffn_idx[layer, : nz.numel()] = nz.to(plan.ffn_idx.device)
    plan.ffn_count[layer] = nz.numel()


def static_plan(shape: ModelShape, head_sparsity: float, neuron_sparsity: float, device, seed: int = 0) -> Plan:
    """Fixed random kept units per layer (≥ 1), layer 0 dense. Latency does not depend on which units."""
    plan = dense_plan(shape, device)
    plan.k_heads, plan.k_neurons = kept(shape.heads, head_sparsity), kept(shape.ffn, neuron_sparsity)
    gen = torch.Generator().manual_seed(seed)
    for l in range(1, shape.layers):
        h = torch.zeros(shape.heads, dtype=torch.bool)
        h[torch.randperm(shape.heads, generator=gen)[: plan.k_heads]] = True
        n = torch.zeros(shape.ffn, dtype=torch.bool)
        n[torch.randperm(shape.ffn, generator=gen)[: plan.k_neurons]] = True
        set_layer(plan, shape, l, h, n)
    return plan


def predicted_plan(shape: ModelShape, head_sparsity: float, neuron_sparsity: float, device) -> Plan:
    """A plan whose rows 1… are written by the predictors' selection kernels on every step."""
    plan = dense_plan(shape, device)
    plan.k_heads, plan.k_neurons = kept(shape.heads, head_sparsity), kept(shape.ffn, neuron_sparsity)
    return plan


def per_sequence_plan(shape: ModelShape, neuron_sparsity: float, batch: int, device, seed: int = 0) -> Plan:
    """GRIFFIN's static per-sequence neurons: each sequence keeps its own k neurons per layer, chosen once (in the
    benchmark a fixed random draw per sequence; latency does not depend on which), the plan keeps their union over
    the batch; heads all kept, layer 0 dense. Within the union every sequence uses every kept neuron (the reads
    are the same as with each sequence's own set zeroed; the outputs are not)."""
    plan = dense_plan(shape, device)
    plan.k_neurons = kept(shape.ffn, neuron_sparsity)
    gen = torch.Generator().manual_seed(seed)
    heads = torch.ones(shape.heads, dtype=torch.bool)
    for l in range(1, shape.layers):
        n = torch.zeros(shape.ffn, dtype=torch.bool)
        for _ in range(batch):
            n[torch.randperm(shape.ffn, generator=gen)[: plan.k_neurons]] = True
        set_layer(plan, shape, l, heads, n)
    return plan
