"""The compiled PyTorch dense baseline (issue 14 item 4): the plain decoder of a `ModelShape` in stock PyTorch ops,
a static KV cache and one token per step, under `torch.compile(mode="reduce-overhead")` (CUDA graphs) — the
recipe gpt-fast made the reference for fast PyTorch decoding, written here from its idea, not its code.

It reads the engine's own weights (`ModelWeights`, the pre-norm gains folded into the next matrix), so it moves
exactly the bytes the dense engine moves: a norm without gain followed by W·diag(γ) is the textbook layer, a
LayerNorm's β is the folded bias W·β. Ops per layer: norm, one q/k/v GEMV, RoPE, cache write (`index_copy_`
at the step's position, a device tensor, so one graph serves every step), SDPA over the whole cache with a
position mask (GQA through `enable_gqa`), o GEMV, norm, gate/up (or fc1), activation, down. What it does not
do: skip anything (it is the dense baseline), fuse across ops beyond what inductor does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernels_ref import apply_rope, rope_tables
from .weights import ModelWeights


class CompiledDense:
    """`step(tok [B] long, pos [1] long) -> logits [B, V]` over a static cache [L, B, KVH, max_len, d]."""

    def __init__(self, weights: ModelWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float = 1e-5):
        self.w, self.s, self.eps = weights, weights.shape, eps
        self.kc, self.vc = k_cache.clone(), v_cache.clone()
        self.max_len = k_cache.shape[3]
        dev = k_cache.device
        self.rope = rope_tables(self.max_len, self.s.head_dim, self.s.rope_theta, dev) if self.s.rope else None
        self.positions = torch.arange(self.max_len, device=dev)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.s.norm == "rms":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            y = F.layer_norm(xf, (xf.shape[-1],), eps=self.eps)
        return y.to(x.dtype)

    @staticmethod
    def _linear(x: torch.Tensor, lin) -> torch.Tensor:
        y = F.linear(x, lin.w)
        return y if lin.bias is None else y + lin.bias.to(y.dtype)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        s, w = self.s, self.w
        H, KVH, d = s.heads, s.kv_heads, s.head_dim
        B = tok.shape[0]
        x = w.embed[tok]
        if w.pos_embed is not None:
            x = x + w.pos_embed[pos + 2]
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        cs = (self.rope[0].index_select(0, pos), self.rope[1].index_select(0, pos)) if self.rope else None
        for l, lw in enumerate(w.layers):
            qkv = self._linear(self._norm(x), lw.qkv)
            q = qkv[:, : H * d].view(B, H, d)
            k = qkv[:, H * d : (H + KVH) * d].view(B, KVH, d)
            v = qkv[:, (H + KVH) * d :].view(B, KVH, d)
            if cs is not None:
                q, k = apply_rope(q, cs[0], cs[1]).to(x.dtype), apply_rope(k, cs[0], cs[1]).to(x.dtype)
            self.kc[l].index_copy_(2, pos, k.unsqueeze(2).to(self.kc.dtype))
            self.vc[l].index_copy_(2, pos, v.unsqueeze(2).to(self.vc.dtype))
            o = F.scaled_dot_product_attention(
                q.unsqueeze(2), self.kc[l], self.vc[l], attn_mask=mask, enable_gqa=KVH != H
            )  # [B, H, 1, d]
            x = x + self._linear(o.reshape(B, H * d).to(x.dtype), lw.o)
            h = self._norm(x)
            a = self._linear(h, lw.w1)
            a = F.silu(a) * self._linear(h, lw.w3) if s.gated else torch.relu(a)
            y = a @ lw.w2T.w
            x = x + (y if lw.w2T.bias is None else y + lw.w2T.bias.to(y.dtype))
        return self._linear(self._norm(x), w.lm_head).float()

    def compiled(
        self, mode: str | None = "reduce-overhead", backend: str = "inductor"
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`step` under torch.compile (fullgraph: a graph break would silently leave Python in the timed loop;
        backend "eager" traces without code generation, as the CPU test does)."""
        return torch.compile(self.step, mode=mode, backend=backend, fullgraph=True)


def time_compiled(
    weights: ModelWeights,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prompt_len: int,
    gen_len: int,
    *,
    warmup: int = 8,
    mode: str | None = "reduce-overhead",
    backend: str = "inductor",
) -> list[float]:
    """Per-token milliseconds of `gen_len` compiled steps from position `prompt_len`, after `warmup` untimed steps
    (compilation and graph capture happen there): CUDA events on a GPU, the host clock on a CPU (the tests)."""
    import time

    base = CompiledDense(weights, k_cache, v_cache)
    fn = base.compiled(mode, backend)
    dev = k_cache.device
    cuda = dev.type == "cuda"
    tok = torch.zeros(k_cache.shape[1], dtype=torch.long, device=dev)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=dev)
    for _ in range(warmup):
        fn(tok, pos)
    if cuda:
        torch.cuda.synchronize()
    out = []
    for i in range(gen_len):
        pos.fill_(prompt_len + i)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            logits = fn(tok, pos)
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            logits = fn(tok, pos)
            out.append((time.perf_counter() - t) * 1e3)
        tok = logits.argmax(-1)
    return out


def measure_compiled(
    weights: ModelWeights,
    batch: int,
    prompt_len: int,
    gen_len: int,
    warmup: int,
    *,
    seed: int = 0,
    mode: str | None = "reduce-overhead",
    backend: str = "inductor",
) -> dict[str, float]:
    """The baseline's timing summary (`timing.summarize`) at one batch: a random prompt cache of `prompt_len`
    entries (prefill is not timed, as in the engine) in a static cache of prompt_len + gen_len positions."""
    from .timing import summarize

    s, dev = weights.shape, weights.embed.device
    g = torch.Generator(device=dev).manual_seed(seed)
    shape = (s.layers, batch, s.kv_heads, prompt_len + gen_len, s.head_dim)
    kc = torch.randn(shape, generator=g, device=dev, dtype=weights.embed.dtype)
    vc = torch.randn(shape, generator=g, device=dev, dtype=weights.embed.dtype)
    times = time_compiled(weights, kc, vc, prompt_len, gen_len, warmup=warmup, mode=mode, backend=backend)
    del kc, vc
    return summarize(times)
