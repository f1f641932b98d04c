"""Random weights for a `ModelShape`, laid out for the decode engine.

Layout choices (all matrices row-major, one *unit* = a set of contiguous rows):
- q, k and v are one matrix `wqkv` [(H + 2·KVH)·d, D]: head h owns rows h·d…h·d+d-1 (q), then the kv heads.
- o stays row-major (`wo` [D, H·d]): a kept head owns a contiguous 2·d-byte segment of every row, which the row
  kernel gathers (no atomics). down/fc2 is stored **transposed** (`w2T` [F, D]) so a kept neuron is a whole
  contiguous row there (a kept neuron of row-major W2 would be a scattered 2-byte column).
- The pre-norm's gain is folded into the following matrix (W' = W·diag(γ)); a LayerNorm's β becomes a bias
  (W·β), and its mean term needs the row sums c = W'·1. Kernels then normalise in the same pass that reads W.
  `keep_raw=True` also keeps the unfolded tensors for the reference model in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .shapes import ModelShape


@dataclass
class Linear:
    """A (possibly folded) weight with the per-row extras the kernels need."""

    w: torch.Tensor  # [N, K]
    bias: torch.Tensor | None = None  # fp32 [N]
    rowsum: torch.Tensor | None = None  # fp32 [N] (only for LayerNorm / min-max input normalisation)


@dataclass
class LayerWeights:
    qkv: Linear
    o: Linear  # w: [D, H·d]; bias: [D]
    w1: Linear  # gate or fc1, [F, D]
    w3: Linear | None  # up, [F, D] (gated only)
    w2T: Linear  # [F, D]; bias: [D]
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    gamma1: torch.Tensor | None = None  # fp32 [D]: the attention pre-norm's gain (folded into qkv; TEAL's criterion)
    gamma2: torch.Tensor | None = None  # fp32 [D]: the MLP pre-norm's gain (folded into w1/w3)


@dataclass
class ColLayer:
    """One layer's matrices transposed for the input-sparse (column) kernels: row i of each is input channel i's
    column of the linear, contiguous, so a dropped channel skips one whole row. Built from the folded weights."""

    qkvT: Linear  # [D, (H + 2·KVH)·d]; bias [(H + 2·KVH)·d]
    oT: Linear  # [H·d, D]; bias [D]
    w13T: Linear  # [D, 2F]: gate columns 0…F-1, up columns F…2F-1 (gated; else fc1 [D, F])
    w2T: Linear  # [F, D] (the row layout's own, shared)


@dataclass
class ModelWeights:
    shape: ModelShape
    layers: list[LayerWeights]
    embed: torch.Tensor  # [V, D]
    pos_embed: torch.Tensor | None  # [P + 2, D] (OPT)
    lm_head: Linear  # folded with the final norm
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    _cols: list[ColLayer] | None = field(default=None, repr=False)

    def col_layers(self) -> list[ColLayer]:
        """The transposed matrices of every layer (built once, then cached: one more copy of q/k/v, o, gate/up)."""
        if self._cols is None:
            cols = []
            for lw in self.layers:
                w13 = lw.w1.w if lw.w3 is None else torch.cat([lw.w1.w, lw.w3.w], 0)
                b13 = lw.w1.bias if lw.w3 is None or lw.w1.bias is None else torch.cat([lw.w1.bias, lw.w3.bias])
                cols.append(
                    ColLayer(
                        Linear(lw.qkv.w.t().contiguous(), lw.qkv.bias),
                        Linear(lw.o.w.t().contiguous(), lw.o.bias),
                        Linear(w13.t().contiguous(), b13),
                        lw.w2T,
                    )
                )
            self._cols = cols
        return self._cols

    def matrix_bytes(self) -> int:
        total = self.lm_head.w.numel() * self.lm_head.w.element_size()
        for lw in self.layers:
            for lin in (lw.qkv, lw.o, lw.w1, lw.w3, lw.w2T):
                if lin is not None:
                    total += lin.w.numel() * lin.w.element_size()
        return total


def _randn(shape, gen, device, dtype, scale):
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if dtype == torch.float32 else dtype)
    return t.mul_(scale)


def fold(
    w: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm: str,
    *,
    inplace: bool,
) -> Linear:
    """Fold a pre-norm (γ, β) into the next matrix: returns W·diag(γ), bias W·β + b, and row sums if needed."""
    b = None
    if beta is not None:
        b = w.float() @ beta.float()
    if bias is not None:
        b = bias.float() if b is None else b + bias.float()
    wf = w.mul_(gamma.to(w.dtype)) if inplace else w * gamma.to(w.dtype)
    rowsum = wf.sum(dim=1, dtype=torch.float32) if norm in ("ln", "minmax") else None
    return Linear(wf, b, rowsum)


def build(
    shape: ModelShape,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    keep_raw: bool = False,
) -> ModelWeights:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    D, F, H, d = shape.hidden, shape.ffn, shape.heads, shape.head_dim
    s_in, s_ff = D**-0.5, F**-0.5
    ln = shape.norm == "ln"

    def vec(n, mean=0.0, scale=0.1):
        return _randn((n,), gen, device, torch.float32, scale).add_(mean)

    layers = []
    for _ in range(shape.layers):
        raw: dict[str, torch.Tensor] = {}
        g1, g2 = vec(D, 1.0), vec(D, 1.0)
        be1, be2 = (vec(D), vec(D)) if ln else (None, None)
        wqkv = _randn((shape.qkv_rows, D), gen, device, dtype, s_in)
        bqkv = vec(shape.qkv_rows) if shape.qkv_bias else None
        wo = _randn((D, H * d), gen, device, dtype, (H * d) ** -0.5)
        bo = vec(D) if shape.o_bias else None
        w1 = _randn((F, D), gen, device, dtype, s_in)
        b1 = vec(F) if shape.mlp_bias else None
        w3 = _randn((F, D), gen, device, dtype, s_in) if shape.gated else None
        w2T = _randn((F, D), gen, device, dtype, s_ff)
        b2 = vec(D) if shape.mlp_bias else None
        if keep_raw:
            raw = {
                k: v.clone()
                for k, v in dict(
                    ln1_w=g1,
                    ln1_b=be1,
                    wqkv=wqkv,
                    bqkv=bqkv,
                    wo=wo,
                    bo=bo,
                    ln2_w=g2,
                    ln2_b=be2,
                    w1=w1,
                    b1=b1,
                    w3=w3,
                    w2T=w2T,
                    b2=b2,
                ).items()
                if v is not None
            }
        norm = shape.norm
        layers.append(
            LayerWeights(
                qkv=fold(wqkv, g1, be1, bqkv, norm, inplace=not keep_raw),
                o=Linear(wo, bo),
                w1=fold(w1, g2, be2, b1, norm, inplace=not keep_raw),
                w3=fold(w3, g2, be2, None, norm, inplace=not keep_raw) if w3 is not None else None,
                w2T=Linear(w2T, b2),
                raw=raw,
                gamma1=g1,
                gamma2=g2,
            )
        )
    embed = _randn((shape.vocab, D), gen, device, dtype, 1.0)
    pos_embed = _randn((shape.max_positions + 2, D), gen, device, dtype, 0.1) if shape.family == "opt" else None
    gf = vec(D, 1.0)
    bf = vec(D) if ln else None
    head = embed if shape.tied_embeddings else _randn((shape.vocab, D), gen, device, dtype, s_in)
    raw_m: dict[str, torch.Tensor] = {}
    if keep_raw:
        raw_m = {k: v.clone() for k, v in dict(lnf_w=gf, lnf_b=bf, lm_head=head).items() if v is not None}
    # A tied head is folded into a copy (the embedding itself must stay unfolded).
    lm_head = fold(head, gf, bf, None, shape.norm, inplace=not keep_raw and not shape.tied_embeddings)
    return ModelWeights(shape, layers, embed, pos_embed, lm_head, raw_m)
