"""Scoring one batch: forward + activation-only backward (+ a Hessian-vector product for grasp) with the
unit-capture hooks, every requested criterion's per-example scores and the predictor features at the
feature position. `collect` writes these rows to traces; the evaluation oracle scores gold sequences
with the same code."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline import criteria as crit
from pipeline.data.tokenize import keep_last
from pipeline.features import context_position, text_position
from pipeline.hooks import UnitCapture, embeddings_require_grad
from pipeline.models.adapters import Layout
from pipeline.traces import head_col, neuron_col


class NonFiniteError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sequence:
    """One tokenised calibration example. The loss covers the last `n_target` tokens."""

    id: str
    task: str
    input_ids: tuple[int, ...]
    n_target: int
    text: bool = False  # plain text: every token after the first is a target (pipeline.features)

    def __post_init__(self):
        if not 0 < self.n_target < len(self.input_ids):
            raise ValueError(f"{self.id}: n_target {self.n_target} must be in [1, {len(self.input_ids) - 1}]")

    @property
    def feature_pos(self) -> int:
        """Where the predictor features are read (`pipeline.features`: the last context token)."""
        n = len(self.input_ids)
        return text_position(n) if self.text else context_position(n, self.n_target)


def mc_sequence(
    ex_id: str, task: str, ctx: list[int], cont: list[int], max_tokens: int, *, bos_id: int | None = None
) -> Sequence:
    """Context + gold continuation, truncated from the left to `max_tokens` (the target is kept).

    `bos_id` (set when the model's BOS policy is on): a sequence starting with it keeps the BOS at
    position 0 and is cut after it, as evaluation's `_prepare` does (`keep_last`)."""
    ids = keep_last(list(ctx) + list(cont), max_tokens, bos_id=bos_id)
    return Sequence(ex_id, task, tuple(ids), min(len(cont), len(ids) - 1))


def text_sequence(ex_id: str, task: str, ids: list[int]) -> Sequence:
    """Plain text: every token after the first is a target (under the BOS policy the first token of a
    window is the BOS, so then every text token is one)."""
    return Sequence(ex_id, task, tuple(ids), len(ids) - 1, text=True)


@dataclass(frozen=True)
class ScoreSettings:
    """What `score_batch` computes: these criteria's scores, and each layer's input when `layer_inputs`."""

    criteria: tuple[str, ...]
    layer_inputs: bool

    def __post_init__(self):
        for c in self.criteria:
            crit.get(c)


def pad_batch(seqs: Seq[Sequence], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, real-token mask and next-token labels (-100 outside the targets)."""
    T = max(len(s.input_ids) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        valid[b, :n] = True
        start = n - s.n_target  # first target token
        labels[b, start - 1 : n - 1] = ids[b, start:n]
    return ids.to(device), valid.to(device), labels.to(device)


# The attention kernels a backward may use. cuDNN's is left out: its backward returns NaN dQ whenever an explicit
# mask is passed and the padded length is 64 mod 128 (torch >= 2.11 on H100/H200, pytorch/pytorch#196678; it
# stopped the first bf16 Qwen2.5 collect at a HellaSwag batch padded to 448). Flash, memory-efficient and math are
# clean on the same inputs.
GRAD_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def grad_attention_kernels(need_grad: bool, need_hvp: bool = False):
    """The SDPA backends for a pass that will be differentiated: only "math" for a double backward (grasp; the
    fused kernels lack one), no cuDNN for a single one, any for a forward-only pass."""
    if need_hvp:
        return sdpa_kernel([SDPBackend.MATH])
    if need_grad:
        return sdpa_kernel(list(GRAD_SDPA_BACKENDS))
    return nullcontext()


def _at(x: Tensor, pos: Tensor) -> Tensor:
    """x [B, T, ...] at one position per row, pos [B] -> [B, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


def score_batch(model: nn.Module, layout: Layout, seqs: Seq[Sequence], settings: ScoreSettings) -> dict[str, Any]:
    """Scores and predictor features for one batch; arrays are numpy [B, K]."""
    device = next(model.parameters()).device
    ids, valid, labels = pad_batch(seqs, device)
    chosen = [crit.get(c) for c in settings.criteria]
    need_grad = any(c.needs_grad for c in chosen)
    need_hvp = any(c.needs_hvp for c in chosen)
    kernels = grad_attention_kernels(need_grad, need_hvp)
    # a graph only where a criterion differentiates (the oracle scores every gold sequence forward-only)
    grad_mode = torch.enable_grad() if need_grad else torch.no_grad()
    with UnitCapture(model, layout, layer_inputs=settings.layer_inputs) as cap, grad_mode, kernels:
        grad_hooks = embeddings_require_grad(model) if need_grad else None
        try:
            logits = model(input_ids=ids, attention_mask=valid.long(), use_cache=False).logits
        finally:
            if grad_hooks is not None:
                grad_hooks.remove()
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        n_target = (labels >= 0).sum(1)
        loss = ce.sum(1) / n_target
        raw = cap.raw()
        grads: list[Tensor | None] = [None] * len(raw)
        hvps: list[Tensor | None] = [None] * len(raw)
        if need_grad:
            grads = list(torch.autograd.grad(loss.sum(), raw, create_graph=need_hvp))
            if need_hvp:
                z = sum((g * g.detach()).sum() for g in grads)
                hvps = list(torch.autograd.grad(z, raw))
                grads = [g.detach() for g in grads]
    _check_finite(seqs, loss, grads)
    L = layout.n_layers
    pos = torch.tensor([s.feature_pos for s in seqs], dtype=torch.long)

    def units(view, tensors: list[Tensor | None], offset: int) -> Tensor | None:
        """All layers' units side by side: heads [B, T, L·H, D], neurons [B, T, L·F] (float32)."""
        if tensors[offset] is None:
            return None
        return torch.cat([view(t.detach()).float() for t in tensors[offset : offset + L]], dim=2)

    scores: dict[str, Tensor] = {}
    with torch.no_grad():
        for view, offset, column, pick in (
            (cap.heads, 0, head_col, lambda c: c.heads),
            (cap.neurons, L, neuron_col, lambda c: c.neurons),
        ):
            unit = crit.UnitBatch(
                a=units(view, list(raw), offset),
                g=units(view, grads, offset),
                valid=valid,
                hg=units(view, hvps, offset),
                labels=labels,
            )
            for c in chosen:
                if pick(c) is not None:
                    scores[column(c.name)] = pick(c)(unit)
    out: dict[str, Any] = {
        "example_id": [s.id for s in seqs],
        "task": [s.task for s in seqs],
        "n_tokens": np.array([len(s.input_ids) for s in seqs], dtype=np.int32),
        "n_target": np.array([s.n_target for s in seqs], dtype=np.int32),
        "loss": loss.detach().float().cpu().numpy(),
        "feat_pos": np.array([s.feature_pos for s in seqs], dtype=np.int32),
        "feat_l0": _at(cap.heads(raw[0].detach()), pos).flatten(1).float().cpu().numpy(),
    }
    if settings.layer_inputs:
        feats = torch.stack([_at(h, pos) for h in cap.layer_inputs], 1)  # [B, L, E]
        out["feat_layers"] = feats.flatten(1).float().cpu().numpy()
    for name, value in scores.items():
        out[name] = value.cpu().numpy()
    return out


def _check_finite(seqs: Seq[Sequence], loss: Tensor, grads: list[Tensor | None]) -> None:
    bad = ~torch.isfinite(loss)
    for g in grads:
        if g is not None:
            bad |= ~torch.isfinite(g.reshape(loss.shape[0], -1)).all(1)
    if bad.any():
        ids = [seqs[i].id for i in torch.nonzero(bad).flatten().tolist()]
        raise NonFiniteError(f"non-finite loss or gradient for example(s) {', '.join(ids)}")
