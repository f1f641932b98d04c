"""A plain fp32 reference decoder for the tests: unfolded weights, textbook norms, and sparsity applied the way
SPEC §5 defines it — zeroing a head's output before o_proj and a neuron's activation before down/fc2.

It shares nothing with the engine's kernels; only the random weights (`keep_raw=True`) and the prompt's KV
cache are the same. K/V are written for every head (dense semantics), which the engine matches whenever a
head it skips is never read later (static masks, or a single step).
"""

from __future__ import annotations

import math

import torch

from .kernels_ref import apply_rope, rope_tables
from .weights import ModelWeights


def _norm(x, w, b, kind, eps):
    if kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


class ReferenceDecoder:
    def __init__(self, weights: ModelWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float = 1e-5):
        self.w, self.s, self.eps = weights, weights.shape, eps
        self.kc, self.vc = k_cache.clone().float(), v_cache.clone().float()
        s = self.s
        self.rope = rope_tables(k_cache.shape[3], s.head_dim, s.rope_theta, k_cache.device) if s.rope else None

    def step(
        self,
        tok: torch.Tensor,
        pos: int,
        head_keep: torch.Tensor | None = None,
        neuron_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tok [B] -> logits [B, V]; head_keep [L, H] / neuron_keep [L, F] bool (None: dense)."""
        s, w = self.s, self.w
        H, KVH, d = s.heads, s.kv_heads, s.head_dim
        B = tok.shape[0]
        x = w.embed[tok].float()
        if w.pos_embed is not None:
            x = x + w.pos_embed[pos + 2].float()
        for l, lw in enumerate(w.layers):
            r = lw.raw
            hn = _norm(x, r["ln1_w"], r.get("ln1_b"), s.norm, self.eps)
            qkv = hn @ r["wqkv"].float().T
            if "bqkv" in r:
                qkv = qkv + r["bqkv"]
            q = qkv[:, : H * d].view(B, H, d)
            k = qkv[:, H * d : (H + KVH) * d].view(B, KVH, d)
            v = qkv[:, (H + KVH) * d :].view(B, KVH, d)
            if self.rope is not None:
                q = apply_rope(q, self.rope[0][pos], self.rope[1][pos])
                k = apply_rope(k, self.rope[0][pos], self.rope[1][pos])
            self.kc[l, :, :, pos] = k
            self.vc[l, :, :, pos] = v
            kk = self.kc[l, :, :, : pos + 1].repeat_interleave(H // KVH, dim=1)  # [B, H, T, d]
            vv = self.vc[l, :, :, : pos + 1].repeat_interleave(H // KVH, dim=1)
            att = torch.softmax(torch.einsum("bhd,bhtd->bht", q, kk) / math.sqrt(d), -1)
            o = torch.einsum("bht,bhtd->bhd", att, vv)
            if head_keep is not None:
                o = o * head_keep[l].to(o.dtype)[None, :, None]
            x = x + o.reshape(B, H * d) @ r["wo"].float().T
            if "bo" in r:
                x = x + r["bo"]
            hn = _norm(x, r["ln2_w"], r.get("ln2_b"), s.norm, self.eps)
            a = hn @ r["w1"].float().T
            if "b1" in r:
                a = a + r["b1"]
            if s.gated:
                a = torch.nn.functional.silu(a) * (hn @ r["w3"].float().T)
            else:
                a = torch.relu(a)
            if neuron_keep is not None:
                a = a * neuron_keep[l].to(a.dtype)[None, :]
            x = x + a @ r["w2T"].float()
            if "b2" in r:
                x = x + r["b2"]
        hn = _norm(x, w.raw["lnf_w"], w.raw.get("lnf_b"), s.norm, self.eps)
        return hn @ w.raw["lm_head"].float().T
