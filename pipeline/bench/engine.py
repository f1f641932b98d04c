"""Batch-B decode engine over random weights: one `step()` decodes one token per sequence.

Methods (SPEC §8):
- dense:     every unit, the same kernels without gathers.
- static:    fixed kept units per layer (no predictor).
- shadowllm: one predictor right after layer 0's attention (its input: layer 0's head outputs), top-k per
             layer for all later layers at once, on the device and inside the graph.
- dejavu:    per-layer look-ahead predictors: at the start of layer t-1, predict layer t from its input.
Layer 0 is dense in every sparse method. With a batch, each example's top-k is computed and the union kept.
With `overlap`, predictors run on a second stream inside the graph (ShadowLLM's alongside the rest of
layer 0, DejaVu's alongside layer t-1, as in DejaVu's asynchronous design) and join before the layer they
feed. The step issues only kernel launches and device-side copies, so it can be captured in a CUDA graph.
Every launch gets the configuration's `tiles` (pipeline/bench/tiles.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import backend as backend_mod
from . import plan as plan_mod
from .predictors import MLPPredictor, PredictorSpec, build_dejavu, build_shadowllm
from .sel import DENSE, index, unit_index, units
from .shapes import ModelShape
from .tiles import DEFAULT_TILES, Tiles
from .weights import ModelWeights, build

METHODS = ("dense", "static", "shadowllm", "dejavu")
_CHUNKS = 256


@dataclass(frozen=True)
class EngineConfig:
    """One measured configuration (the run's values come from `benchmark:` in params.yaml)."""

    method: str
    head_sparsity: float
    neuron_sparsity: float
    batch: int
    prompt_len: int
    gen_len: int
    shadowllm: PredictorSpec
    dejavu: PredictorSpec
    overlap: bool
    seed: int
    pdl: bool = True  # programmatic dependent launch of the layer kernels (Triton backend, sm_90+); ablations: off
    tiles: Tiles = DEFAULT_TILES  # the Triton tiles of every launch
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; one of {METHODS}")
        if not 1 <= self.batch <= 16:
            raise ValueError("batch must be in 1..16")


class DecodeEngine:
    def __init__(
        self,
        shape: ModelShape,
        cfg: EngineConfig,
        *,
        weights: ModelWeights | None = None,
        backend: str = "triton",
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        predictors: dict | None = None,
    ):
        self.shape, self.cfg, self.device, self.dtype = shape, cfg, torch.device(device), dtype
        self.k = backend_mod.get(backend)
        self.w = weights if weights is not None else build(shape, dtype=dtype, device=device, seed=cfg.seed)
        s, B, dev = shape, cfg.batch, self.device
        L, H, KVH, d, D, F = s.layers, s.heads, s.kv_heads, s.head_dim, s.hidden, s.ffn
        self.max_len = cfg.prompt_len + cfg.gen_len
        if s.family == "opt" and self.max_len > s.max_positions:
            raise ValueError("sequence longer than the learned position table")
        gen = torch.Generator(device=dev).manual_seed(cfg.seed + 7)
        # KV cache: the prompt's entries are random (prefill is not timed; the prompt only sets the context length)
        self.k_cache = torch.randn((L, B, KVH, self.max_len, d), generator=gen, device=dev, dtype=dtype)
        self.v_cache = torch.randn((L, B, KVH, self.max_len, d), generator=gen, device=dev, dtype=dtype)
        self.rope = self.k.rope_tables(self.max_len, d, s.rope_theta, dev) if s.rope else None
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
        self.tok = torch.randint(0, s.vocab, (B,), generator=gen, device=dev)
        self.tok0 = self.tok.clone()
        self.resid = torch.zeros(B, D, dtype=torch.float32, device=dev)
        self.qkv = torch.zeros(B, s.qkv_rows, dtype=dtype, device=dev)
        self.attn = torch.zeros(B, H * d, dtype=dtype, device=dev)
        self.h = torch.zeros(B, F, dtype=dtype, device=dev)
        # logits padded with -inf to _CHUNKS equal chunks: greedy sampling as a two-stage argmax (one row of 128 k
        # logits is a single-block reduction for torch.argmax: 38 µs on the H200, vs a few µs in two stages)
        self.vocab_pad = -(-s.vocab // _CHUNKS) * _CHUNKS
        self.logits_pad = torch.full((B, self.vocab_pad), float("-inf"), dtype=torch.float32, device=dev)
        self.logits = self.logits_pad[:, : s.vocab]
        self.tiles = cfg.tiles
        self.attn_work = self.k.attention_workspace(B, H, self.max_len, d, dev, tiles=self.tiles)
        method = cfg.method
        if method == "dense":
            self.plan = plan_mod.dense_plan(s, dev)
        elif method == "static":
            self.plan = plan_mod.static_plan(s, cfg.head_sparsity, cfg.neuron_sparsity, dev, seed=cfg.seed)
        else:
            self.plan = plan_mod.predicted_plan(s, cfg.head_sparsity, cfg.neuron_sparsity, dev)
        predictors = predictors or {}
        self.shadow: MLPPredictor | None = None
        self.dejavu: list[MLPPredictor | None] | None = None
        if method == "shadowllm":
            self.shadow = predictors.get("shadowllm") or build_shadowllm(s, cfg.shadowllm, device=dev, dtype=dtype)
            self._alloc_pred(cfg.shadowllm, L * H, L * F, rows=L - 1)
        elif method == "dejavu":
            self.dejavu = predictors.get("dejavu") or build_dejavu(s, cfg.dejavu, device=dev, dtype=dtype)
            self._alloc_pred(cfg.dejavu, H, F, rows=1)
            self.snap = torch.zeros_like(self.resid)
        # typical kept neurons per layer (tiling hint): k for one sequence, the expected union for a batch
        kf = self.plan.k_neurons
        exact = B == 1 or method == "static"
        self.expect_neurons = kf if exact else int(F * (1 - (1 - kf / F) ** B))
        self.bound_neurons = kf if exact else min(F, B * kf)  # the most a layer can keep (grid sizes)
        self.profiling = False
        # With DejaVu's predictors on a side stream, PDL is off: early-launched layer kernels would hold the SMs the
        # side stream needs (H200, Llama-3-8B at 50%: 4.19 ms/token with PDL, 3.59 ms without).
        self.pdl = cfg.pdl and not (method == "dejavu" and cfg.overlap)
        self.side = (
            torch.cuda.Stream(device=dev)
            if (dev.type == "cuda" and cfg.overlap and method in ("shadowllm", "dejavu"))
            else None
        )

    # ------------------------------------------------------------------ predictors
    def _alloc_pred(self, spec: PredictorSpec, n_h: int, n_f: int, rows: int) -> None:
        B, dev = self.cfg.batch, self.device
        self.p_hid = torch.zeros(B, spec.hidden_heads + spec.hidden_neurons, dtype=self.dtype, device=dev)
        self.p_hmid = torch.zeros(B, spec.rank_heads, dtype=self.dtype, device=dev) if spec.rank_heads else None
        self.p_mid = torch.zeros(B, spec.rank_neurons, dtype=self.dtype, device=dev) if spec.rank_neurons else None
        self.s_heads = torch.zeros(B, n_h, dtype=torch.float32, device=dev)
        self.s_neurons = torch.zeros(B, n_f, dtype=torch.float32, device=dev)
        self.union_h = torch.zeros(rows * self.shape.heads, dtype=torch.int32, device=dev)
        self.union_f = torch.zeros(rows * self.shape.ffn, dtype=torch.int32, device=dev)

    def _run_predictor(self, p: MLPPredictor, x: torch.Tensor, out_row0: int, n_rows: int, skip_first_row: bool):
        k, s, B, tiles = self.k, self.shape, self.cfg.batch, self.tiles
        hh = p.spec.hidden_heads
        k.row_gemv(x, p.first, self.p_hid, norm="minmax", eps=1e-6, act="relu", sel=DENSE, tile="pred", tiles=tiles)
        xh = self.p_hid[:, :hh]
        if p.head_mid is not None:
            k.row_gemv(xh, p.head_mid, self.p_hmid, sel=DENSE, tile="pred", tiles=tiles)
            xh = self.p_hmid
        k.row_gemv(xh, p.head_out, self.s_heads, sel=DENSE, tile="pred", tiles=tiles)
        xin = self.p_hid[:, hh:]
        if p.neuron_mid is not None:
            k.row_gemv(xin, p.neuron_mid, self.p_mid, sel=DENSE, tile="pred", tiles=tiles)
            xin = self.p_mid
        k.row_gemv(xin, p.neuron_out, self.s_neurons, sel=DENSE, tile="pred", tiles=tiles)
        r0 = 1 if skip_first_row else 0
        sh = self.s_heads.view(B, -1, s.heads)[:, r0 : r0 + n_rows]
        sn = self.s_neurons.view(B, -1, s.ffn)[:, r0 : r0 + n_rows]
        k.select_heads(
            sh,
            self.plan.k_heads,
            self.plan.qkv_mask,
            self.plan.head_idx,
            self.plan.head_count,
            out_row0=out_row0,
            kv_heads=s.kv_heads,
            union=self.union_h,
        )
        k.select_neurons(
            sn, self.plan.k_neurons, self.plan.ffn_idx, self.plan.ffn_count, out_row0=out_row0, union=self.union_f
        )

    def _fork(self):
        if self.side is None:
            return nullcontext()
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.side)

    def _join(self):
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)

    # ------------------------------------------------------------------ one decode step
    def reset(self) -> None:
        self.pos.fill_(self.cfg.prompt_len)
        self.tok.copy_(self.tok0)

    def _mark(self, label: str):
        """A named range for the profiler (profile.py): which part of the step each kernel belongs to."""
        return torch.profiler.record_function(label) if self.profiling else nullcontext()

    def step(self) -> None:
        k, s, cfg, w = self.k, self.shape, self.cfg, self.w
        L, H, KVH, d = s.layers, s.heads, s.kv_heads, s.head_dim
        method, mark, pdl, tiles = cfg.method, self._mark, self.pdl, self.tiles
        with mark("embed"):
            x = self.w.embed.index_select(0, self.tok).float()
            if w.pos_embed is not None:  # OPT's learned positions are offset by 2
                x = x + w.pos_embed.index_select(0, self.pos + 2).float()
            self.resid.copy_(x)
        pending = False
        for l in range(L):
            lw = w.layers[l]
            sparse = method != "dense" and l > 0
            if pending and method == "dejavu":
                self._join()  # layer l's plan must be ready
                pending = False
            if method == "dejavu" and l + 1 < L:
                with mark("predictor"):
                    self.snap.copy_(self.resid)
                    with self._fork():
                        self._run_predictor(self.dejavu[l + 1], self.snap, l + 1, 1, skip_first_row=False)
                pending = True
                if self.side is None:
                    pending = False
            if method == "shadowllm" and l == 1 and pending:
                self._join()
                pending = False
            qm = self.plan.qkv_mask[l]
            with mark("qkv"):
                k.row_gemv(
                    self.resid,
                    lw.qkv,
                    self.qkv,
                    norm=s.norm,
                    eps=cfg.eps,
                    sel=units(qm, d) if sparse else DENSE,
                    tile="qkv",
                    pdl=pdl,
                    tiles=tiles,
                )
            with mark("attention"):
                k.attention_decode(
                    self.qkv,
                    self.k_cache[l],
                    self.v_cache[l],
                    self.pos,
                    qm,
                    self.attn,
                    heads=H,
                    kv_heads=KVH,
                    head_dim=d,
                    rope=self.rope,
                    work=self.attn_work,
                    pdl=pdl,
                    tiles=tiles,
                )
            if method == "shadowllm" and l == 0:
                with mark("predictor"), self._fork():
                    self._run_predictor(self.shadow, self.attn, 1, L - 1, skip_first_row=True)
                pending = self.side is not None
            with mark("o"):
                hsel = unit_index(self.plan.head_idx[l], self.plan.head_count[l : l + 1], d) if sparse else None
                k.row_gemv(
                    self.attn, lw.o, self.resid, sel=DENSE, ksel=hsel, accumulate=True, tile="o", pdl=pdl, tiles=tiles
                )
            fsel = (
                index(self.plan.ffn_idx[l], self.plan.ffn_count[l : l + 1], self.expect_neurons, self.bound_neurons)
                if sparse
                else DENSE
            )
            with mark("mlp_in"):
                if s.gated:
                    k.row_gemv(
                        self.resid,
                        lw.w1,
                        self.h,
                        lin2=lw.w3,
                        norm=s.norm,
                        eps=cfg.eps,
                        act="silu_gate",
                        sel=fsel,
                        pdl=pdl,
                        tiles=tiles,
                    )
                else:
                    k.row_gemv(
                        self.resid, lw.w1, self.h, norm=s.norm, eps=cfg.eps, act="relu", sel=fsel, pdl=pdl, tiles=tiles
                    )
            with mark("mlp_out"):
                k.col_gemv_add(self.h, lw.w2T, self.resid, sel=fsel, pdl=pdl, tiles=tiles)
        if pending:
            self._join()
        with mark("lm_head"):
            k.row_gemv(
                self.resid,
                w.lm_head,
                self.logits,
                norm=s.norm,
                eps=cfg.eps,
                sel=DENSE,
                tile="head",
                pdl=pdl,
                tiles=tiles,
            )
        with mark("sample"):
            B = cfg.batch
            best, where = self.logits_pad.view(B, _CHUNKS, -1).max(dim=-1)
            chunk = best.argmax(dim=-1, keepdim=True)
            self.tok.copy_((chunk * (self.vocab_pad // _CHUNKS) + where.gather(1, chunk)).squeeze(1))
            self.pos.add_(1)

    # ------------------------------------------------------------------ accounting
    def _predictors(self) -> list:
        if self.shadow is not None:
            return [self.shadow]
        return [p for p in (self.dejavu or []) if p is not None]

    def predictor_bytes(self) -> int:
        return sum(p.nbytes() for p in self._predictors())

    def predictor_params(self) -> int:
        return sum(p.nparams() for p in self._predictors())
