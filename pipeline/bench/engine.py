"""Batch-B decode engine over random weights: one `step()` decodes one token per sequence.

Methods (SPEC §8):
- dense:     every unit, the same kernels without gathers.
- static:    fixed kept units per layer (no predictor).
- shadowllm: one predictor right after layer 0's attention (its input: layer 0's head outputs), top-k per
             layer for all later layers at once, on the device and inside the graph.
- dejavu:    per-layer look-ahead predictors: at the start of layer t-1, predict layer t from its input.
- teal:      every linear's input channels with |x| ≤ t dropped (one calibrated t per tensor and layer: q/k/v share
             the attention input's, gate/up the MLP input's); input-sparse column GEMVs, the test fused in them.
- wina:      the same kernels; per token and linear, the top-k input channels by |x_i|·‖W[:, i]‖₂ (q, k, v and
             gate, up each their own column norms), as a per-sequence threshold from one selection launch each.
- cats:      gate dense; neurons with |silu(gate)| ≤ t (calibrated per layer) skip their up row and down column.
- griffin:   a static per-sequence neuron set (fixed random top-k per sequence, union over the batch), attention
             dense: the static path for neurons.
docs/thresholds.md defines the four on the evaluation side; the engine applies the same selection rules.
Layer 0 is dense in every sparse method. With a batch, each example's top-k is computed and the union kept.
With `overlap`, predictors run on a second stream inside the graph (ShadowLLM's alongside the rest of
layer 0, DejaVu's alongside layer t-1, as in DejaVu's asynchronous design) and join before the layer they
feed. The step issues only kernel launches and device-side copies, so it can be captured in a CUDA graph.
Every launch gets the configuration's `tiles` (pipeline/bench/tiles.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import pairwise

import torch

from . import backend as backend_mod
from . import bounds
from . import plan as plan_mod
from .predictors import MLPPredictor, PredictorSpec, build_dejavu, build_shadowllm
from .sel import DENSE, index, unit_index, units
from .shapes import ModelShape
from .tiles import DEFAULT_TILES, Tiles
from .weights import ModelWeights, build

_CHUNKS = 256
_ROLES = ("attn_in", "o_in", "mlp_in", "down_in")  # the thresholded inputs of a layer (column methods, CATS: down)


@dataclass(frozen=True)
class Method:
    """What a method does to a decode step, as properties the engine and the run read (never its name)."""

    name: str
    plan: str  # kept heads/neurons: "dense" | "static" (fixed) | "predicted" (per step) | "per_sequence" (fixed)
    predictor: str | None = None  # "shadowllm" | "dejavu"
    inputs: str | None = None  # input channels of every linear: "threshold" (calibrated) | "topk" (per token)
    gated_neurons: bool = False  # neurons by |act(gate)| against a calibrated threshold (gate read dense)
    prunes_heads: bool = True  # False: attention dense whatever the heads sparsity

    @property
    def columns(self) -> bool:
        """Input-sparse column GEMVs on every linear (the transposed weights)."""
        return self.inputs is not None

    @property
    def calibrated(self) -> bool:
        return self.inputs == "threshold" or self.gated_neurons

    @property
    def counted(self) -> bool:
        """Bytes read come from the kernels' device counters (data-dependent reads), not from the plan."""
        return self.columns or self.gated_neurons

    @property
    def skips(self) -> str:
        """What its sparsity skips (as `MethodSpec.skips` on the evaluation side): the byte-share rule."""
        if self.columns:
            return "inputs"
        if self.gated_neurons:
            return "gated_neurons"
        return "none" if self.plan == "dense" else "units"

    def unsupported(self, shape: ModelShape) -> str | None:
        """Why the engine cannot run it on `shape` (None: it can)."""
        if (self.columns or self.gated_neurons) and shape.norm != "rms":
            return f"{self.name}: the thresholded paths need an RMSNorm model (LayerNorm's β is folded into biases)"
        if self.gated_neurons and not shape.gated:
            return f"{self.name}: needs a gated MLP"
        return None

    def sparsities(self, sparsity: float) -> tuple[float, float]:
        """(heads, neurons) sparsity at one grid value."""
        return (sparsity if self.prunes_heads else 0.0, sparsity)


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dense", plan="dense"),
        Method("static", plan="static"),
        Method("shadowllm", plan="predicted", predictor="shadowllm"),
        Method("dejavu", plan="predicted", predictor="dejavu"),
        Method("teal", plan="dense", inputs="threshold"),
        Method("wina", plan="dense", inputs="topk"),
        Method("cats", plan="dense", gated_neurons=True, prunes_heads=False),
        Method("griffin", plan="per_sequence", prunes_heads=False),
    )
}
METHODS = tuple(REGISTRY)


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

    @property
    def spec(self) -> Method:
        return REGISTRY[self.method]

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
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
        spec = self.spec = cfg.spec
        why = spec.unsupported(s)
        if why:
            raise ValueError(why)
        hs, ns = (cfg.head_sparsity if spec.prunes_heads else 0.0), cfg.neuron_sparsity
        if spec.plan == "dense":
            self.plan = plan_mod.dense_plan(s, dev)
        elif spec.plan == "static":
            self.plan = plan_mod.static_plan(s, hs, ns, dev, seed=cfg.seed)
        elif spec.plan == "per_sequence":
            self.plan = plan_mod.per_sequence_plan(s, ns, B, dev, seed=cfg.seed)
        else:
            self.plan = plan_mod.predicted_plan(s, hs, ns, dev)
        predictors = predictors or {}
        self.shadow: MLPPredictor | None = None
        self.dejavu: list[MLPPredictor | None] | None = None
        if spec.predictor == "shadowllm":
            self.shadow = predictors.get("shadowllm") or build_shadowllm(s, cfg.shadowllm, device=dev, dtype=dtype)
            self._alloc_pred(cfg.shadowllm, L * H, L * F, rows=L - 1)
        elif spec.predictor == "dejavu":
            self.dejavu = predictors.get("dejavu") or build_dejavu(s, cfg.dejavu, device=dev, dtype=dtype)
            self._alloc_pred(cfg.dejavu, H, F, rows=1)
            self.snap = torch.zeros_like(self.resid)
        # typical kept neurons per layer (tiling hint): k for one sequence, the expected union for a batch; a plan
        # filled once (static, per-sequence) has its exact counts on the host
        kf = self.plan.k_neurons
        if spec.plan in ("static", "per_sequence", "dense"):
            kmax = int(self.plan.ffn_count.max())
            self.expect_neurons = self.bound_neurons = kmax
        else:
            exact = B == 1
            self.expect_neurons = kf if exact else int(F * (1 - (1 - kf / F) ** B))
            self.bound_neurons = kf if exact else min(F, B * kf)  # the most a layer can keep (grid sizes)
        self.profiling = False
        # With DejaVu's predictors on a side stream, PDL is off: early-launched layer kernels would hold the SMs the
        # side stream needs (H200, Llama-3-8B at 50%: 4.19 ms/token with PDL, 3.59 ms without).
        self.pdl = cfg.pdl and not (spec.predictor == "dejavu" and cfg.overlap)
        self.side = (
            torch.cuda.Stream(device=dev)
            if (dev.type == "cuda" and cfg.overlap and spec.predictor is not None)
            else None
        )
        self._calibrating = False
        self.n_steps = torch.zeros(1, dtype=torch.int32, device=dev)  # steps since `reset_counts` (device side)
        self.reads = torch.zeros(len(_ROLES), 3, dtype=torch.int32, device=dev)  # W^T rows read, per role/segment
        if spec.counted:
            self._alloc_thresholded()
        if spec.calibrated:
            self.calibrate()

    # ------------------------------------------------------------------ thresholded methods (teal, wina, cats)
    def _alloc_thresholded(self) -> None:
        s, B, dev, spec = self.shape, self.cfg.batch, self.device, self.spec
        L, H, KVH, d, D, F = s.layers, s.heads, s.kv_heads, s.head_dim, s.hidden, s.ffn
        # thresholds [L, role, segment, B]; -1 keeps every channel (layer 0, sparsity 0: every score is >= 0)
        self.thr = torch.full((L, len(_ROLES), 3, B), -1.0, dtype=torch.float32, device=dev)
        ones = {n: torch.ones(1, n, dtype=torch.float32, device=dev) for n in {D, H * d, F}}
        self.segs: dict[str, tuple[int, ...]] = {r: () for r in _ROLES}
        self.crit: list[dict[str, torch.Tensor]] = []
        if spec.columns:
            self.cols = self.w.col_layers()
            # per layer: the fp32 sums of q/k/v and [gate | up], zeroed once per step (one memset)
            self.acc = torch.zeros(L, B, s.qkv_rows + 2 * F, dtype=torch.float32, device=dev)
            if spec.inputs == "topk":  # each linear its own column norms: q, k, v and gate, up are segments
                self.segs = {"attn_in": (H * d, (H + KVH) * d), "o_in": (), "mlp_in": (F,), "down_in": ()}
        else:  # cats: the dense gate and CATS' up outputs
            self.gbuf = torch.zeros(B, F, dtype=torch.float32, device=dev)
            self.hbuf = torch.zeros(B, F, dtype=torch.float32, device=dev)
        for l in range(L):
            lw = self.w.layers[l]
            if spec.inputs == "threshold":  # the linear's input is x̂·γ for a normed input: |x̂_i|·|γ_i| > t
                c = {
                    "attn_in": lw.gamma1.abs().float().view(1, D).contiguous(),
                    "o_in": ones[H * d],
                    "mlp_in": lw.gamma2.abs().float().view(1, D).contiguous(),
                    "down_in": ones[F],
                }
            elif spec.inputs == "topk":  # |x_i|·‖W[:, i]‖₂ = |x̂_i|·‖W'[:, i]‖₂ with W' = W·diag(γ) (folded)
                cl = self.cols[l]

                def norms(wt, bounds):
                    return torch.stack([wt[:, a:b].float().norm(dim=1) for a, b in pairwise(bounds)])

                c = {
                    "attn_in": norms(cl.qkvT.w, (0, H * d, (H + KVH) * d, s.qkv_rows)),
                    "o_in": norms(cl.oT.w, (0, D)),
                    "mlp_in": norms(cl.w13T.w, (0, F, 2 * F)),
                    "down_in": norms(cl.w2T.w, (0, D)),
                }
            else:
                c = {"down_in": ones[F]}
            self.crit.append(c)

    def _role_sparsity(self, role: str) -> float:
        return self.cfg.head_sparsity if role in ("attn_in", "o_in") else self.cfg.neuron_sparsity

    def _calibrate_role(self, l: int, role: str, score: torch.Tensor) -> None:
        """Forward-order calibration (thresholds.md): this tensor's threshold = the value below which the target
        share of its scores (|input|·criterion scale over the calibration batch) lies; dropped iff score ≤ t."""
        if not self._calibrating or l == 0:
            return
        flat = score.flatten().float()
        m = round(self._role_sparsity(role) * flat.numel())
        t = flat.kthvalue(m).values.item() if m > 0 else -1.0
        self.thr[l, _ROLES.index(role)].fill_(t)

    def calibrate(self, seed: int | None = None) -> None:
        """Thresholds of `teal` (every linear input) and `cats` (the gate activation) from one eager step over a
        calibration draw (random tokens at the prompt's position), in forward order: each tensor is calibrated on
        the input the already-thresholded layers before it produce. Then the state is reset."""
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 11 if seed is None else seed)
        self.thr[1:].fill_(-1.0)
        self.reset()
        self.tok.copy_(torch.randint(0, self.shape.vocab, self.tok.shape, generator=gen, device=self.device))
        self._calibrating = True
        try:
            self.step()
        finally:
            self._calibrating = False
        self.reset()
        self.reset_counts()

    def reset_counts(self) -> None:
        self.reads.zero_()
        self.n_steps.zero_()

    def _rms_score(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x.abs() * c * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.cfg.eps)

    def _thr_args(self, l: int, role: str) -> dict:
        return dict(
            crit=self.crit[l][role],
            thr=self.thr[l, _ROLES.index(role)],
            count=self.reads[_ROLES.index(role)],
            ge=self.spec.inputs == "topk",
            segs=self.segs[role],
        )

    def _topk(self, l: int, role: str, x: torch.Tensor, mode: str) -> None:
        """WINA: this step's per-sequence thresholds of one linear input (k-th largest score per segment)."""
        if self.spec.inputs != "topk" or l == 0:
            return
        c = self.crit[l][role]
        k = plan_mod.kept(c.shape[1], self._role_sparsity(role))
        self.k.kth_threshold(x, c, k, self.thr[l, _ROLES.index(role), : c.shape[0]], mode=mode)

    def _layer_columns(self, l: int) -> None:
        """One layer of `teal` / `wina`: four input-sparse column GEMVs around the dense attention."""
        k, s, cfg, mark, pdl, tiles = self.k, self.shape, self.cfg, self._mark, self.pdl, self.tiles
        F = s.ffn
        cl, eps = self.cols[l], cfg.eps
        qkv, gu = self.acc[l, :, : s.qkv_rows], self.acc[l, :, s.qkv_rows :]
        calibrated = self.spec.calibrated  # teal's thresholds are on the normed input, wina's top-k on the raw one
        with mark("qkv"):
            if self._calibrating:  # scores as the kernel forms them: |x|·c·rstd
                self._calibrate_role(l, "attn_in", self._rms_score(self.resid, self.crit[l]["attn_in"][0]))
            self._topk(l, "attn_in", self.resid, "rms")
            k.thr_col_gemv(
                self.resid, cl.qkvT, qkv, mode="rms", norm_thr=calibrated, eps=eps, pdl=pdl, tiles=tiles,
                **self._thr_args(l, "attn_in"),
            )  # fmt: skip
        with mark("attention"):
            self._attention(l, qkv, self.plan.qkv_mask[l], pdl, tiles)
        with mark("o"):
            if self._calibrating:
                self._calibrate_role(l, "o_in", self.attn.float().abs() * self.crit[l]["o_in"][0])
            self._topk(l, "o_in", self.attn, "plain")
            k.thr_col_gemv(
                self.attn, cl.oT, self.resid, mode="plain", pdl=pdl, tiles=tiles, **self._thr_args(l, "o_in")
            )
        with mark("mlp_in"):
            if self._calibrating:
                self._calibrate_role(l, "mlp_in", self._rms_score(self.resid, self.crit[l]["mlp_in"][0]))
            self._topk(l, "mlp_in", self.resid, "rms")
            k.thr_col_gemv(
                self.resid, cl.w13T, gu, mode="rms", norm_thr=calibrated, eps=eps, pdl=pdl, tiles=tiles,
                **self._thr_args(l, "mlp_in"),
            )  # fmt: skip
        with mark("mlp_out"):
            if self._calibrating:
                g, u = gu[:, :F], gu[:, F:]
                self._calibrate_role(l, "down_in", (g / (1.0 + torch.exp(-g)) * u).abs() * self.crit[l]["down_in"][0])
            self._topk(l, "down_in", gu, "gated")
            k.thr_col_gemv(gu, cl.w2T, self.resid, mode="gated", pdl=pdl, tiles=tiles, **self._thr_args(l, "down_in"))

    def _mlp_cats(self, l: int) -> None:
        """CATS: dense gate, then up rows and down columns of the neurons with |silu(gate)| > t only."""
        k, s, cfg, mark, pdl, tiles = self.k, self.shape, self.cfg, self._mark, self.pdl, self.tiles
        lw = self.w.layers[l]
        with mark("mlp_in"):
            k.row_gemv(self.resid, lw.w1, self.gbuf, norm=s.norm, eps=cfg.eps, sel=DENSE, pdl=pdl, tiles=tiles)
            if self._calibrating:
                g = self.gbuf
                self._calibrate_role(l, "down_in", (g / (1.0 + torch.exp(-g))).abs())
            k.row_gemv(
                self.resid, lw.w3, self.hbuf, norm=s.norm, eps=cfg.eps, act="gate_thresh", sel=DENSE, pdl=pdl,
                tiles=tiles, gate=self.gbuf, gate_thr=self.thr[l, _ROLES.index("down_in"), 0, :1],
            )  # fmt: skip
        with mark("mlp_out"):
            k.thr_col_gemv(
                self.gbuf, lw.w2T, self.resid, mode="cats", x2=self.hbuf, pdl=pdl, tiles=tiles,
                **self._thr_args(l, "down_in"),
            )  # fmt: skip

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

    def _attention(self, l: int, qkv: torch.Tensor, qkv_mask: torch.Tensor, pdl: bool, tiles: Tiles) -> None:
        """Layer l's decode attention over its cache, into `self.attn` (both step paths)."""
        s = self.shape
        self.k.attention_decode(
            qkv,
            self.k_cache[l],
            self.v_cache[l],
            self.pos,
            qkv_mask,
            self.attn,
            heads=s.heads,
            kv_heads=s.kv_heads,
            head_dim=s.head_dim,
            rope=self.rope,
            work=self.attn_work,
            pdl=pdl,
            tiles=tiles,
        )

    def _mark(self, label: str):
        """A named range for the profiler (profile.py): which part of the step each kernel belongs to."""
        return torch.profiler.record_function(label) if self.profiling else nullcontext()

    def step(self) -> None:
        k, s, cfg, w, spec = self.k, self.shape, self.cfg, self.w, self.spec
        L, d = s.layers, s.head_dim
        mark, pdl, tiles = self._mark, self.pdl, self.tiles
        sparse_plan = spec.plan != "dense"
        dejavu, shadowllm = spec.predictor == "dejavu", spec.predictor == "shadowllm"
        self.n_steps.add_(1)
        if spec.columns:
            self.acc.zero_()  # the column kernels' fp32 sums (q/k/v, gate/up) accumulate atomically
        with mark("embed"):
            x = self.w.embed.index_select(0, self.tok).float()
            if w.pos_embed is not None:  # OPT's learned positions are offset by 2
                x = x + w.pos_embed.index_select(0, self.pos + 2).float()
            self.resid.copy_(x)
        pending = False
        for l in range(L):
            lw = w.layers[l]
            sparse = sparse_plan and l > 0
            if spec.columns:
                self._layer_columns(l)
                continue
            if pending and dejavu:
                self._join()  # layer l's plan must be ready
                pending = False
            if dejavu and l + 1 < L:
                with mark("predictor"):
                    self.snap.copy_(self.resid)
                    with self._fork():
                        self._run_predictor(self.dejavu[l + 1], self.snap, l + 1, 1, skip_first_row=False)
                pending = True
                if self.side is None:
                    pending = False
            if shadowllm and l == 1 and pending:
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
                    sel=units(qm, d) if sparse and spec.prunes_heads else DENSE,
                    tile="qkv",
                    pdl=pdl,
                    tiles=tiles,
                )
            with mark("attention"):
                self._attention(l, self.qkv, qm, pdl, tiles)
            if shadowllm and l == 0:
                with mark("predictor"), self._fork():
                    self._run_predictor(self.shadow, self.attn, 1, L - 1, skip_first_row=True)
                pending = self.side is not None
            with mark("o"):
                hsel = (
                    unit_index(self.plan.head_idx[l], self.plan.head_count[l : l + 1], d)
                    if sparse and spec.prunes_heads
                    else None
                )
                k.row_gemv(
                    self.attn, lw.o, self.resid, sel=DENSE, ksel=hsel, accumulate=True, tile="o", pdl=pdl, tiles=tiles
                )
            fsel = (
                index(self.plan.ffn_idx[l], self.plan.ffn_count[l : l + 1], self.expect_neurons, self.bound_neurons)
                if sparse
                else DENSE
            )
            if spec.gated_neurons:
                self._mlp_cats(l)
                continue
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

    def weight_bytes(self) -> dict[str, float]:
        """Weight bytes one step reads, by part (mean over the steps since `reset_counts` for the methods whose
        reads depend on the data; the plan's kept units otherwise): qkv, o, mlp_in, mlp_out, lm_head, total."""
        s, e = self.shape, self.w.lm_head.w.element_size()
        H, KVH, d, D, F, L = s.heads, s.kv_heads, s.head_dim, s.hidden, s.ffn, s.layers
        head = s.vocab * D * e
        if not self.spec.counted:
            hk, nk = self.plan.host_masks(s)
            by = bounds.step_bytes(s, hk, nk, batch=1, context=0, elem=e)
            parts = {k: by[f"{k}_bytes"] for k in ("qkv", "o", "mlp_in", "mlp_out")}
        else:
            n = max(int(self.n_steps.item()), 1)
            r = self.reads.double().cpu() / n  # W^T rows (input channels) read per step, summed over layers
            gm = 2 if s.gated else 1
            if self.spec.columns:
                widths = {  # output columns of each segment of each role
                    "attn_in": (H * d, KVH * d, KVH * d) if self.segs["attn_in"] else (s.qkv_rows,),
                    "o_in": (D,),
                    "mlp_in": (F, F) if self.segs["mlp_in"] else (gm * F,),
                    "down_in": (D,),
                }
                got = {
                    ro: sum(float(r[i, j]) * wd * e for j, wd in enumerate(widths[ro])) for i, ro in enumerate(_ROLES)
                }
                parts = {"qkv": got["attn_in"], "o": got["o_in"], "mlp_in": got["mlp_in"], "mlp_out": got["down_in"]}
            else:  # cats: attention and gate dense; the up rows read = the down columns read (one criterion)
                kept = float(r[_ROLES.index("down_in"), 0])
                parts = {
                    "qkv": L * s.qkv_rows * D * e,
                    "o": L * H * d * D * e,
                    "mlp_in": L * F * D * e + kept * D * e,
                    "mlp_out": kept * D * e,
                }
        parts["lm_head"] = head
        parts["total"] = sum(parts.values())
        return parts

    def byte_sparsity(self) -> float:
        """Share of the dense step's weight bytes (decoder linears + LM head) this step does not read."""
        dense = (self.shape.layer_params() * self.shape.layers + self.shape.vocab * self.shape.hidden) * (
            self.w.lm_head.w.element_size()
        )
        return 1.0 - self.weight_bytes()["total"] / dense

    def predictor_bytes(self) -> int:
        return sum(p.nbytes() for p in self._predictors())

    def predictor_params(self) -> int:
        return sum(p.nparams() for p in self._predictors())
