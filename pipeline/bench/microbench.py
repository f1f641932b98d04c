"""Kernel-level bandwidth: the gather kernels alone, on the bytes they actually read, against the copy bandwidth.

Each measurement captures `n_sets` launches over distinct weight sets (so L2 never holds the weights) in one
CUDA graph and times its replays with CUDA events; the kernels are launched as in the engine (programmatic
dependent launch when `tiles.pdl`), so back-to-back launches overlap as they do in a decode step. Also sweeps
a few tile shapes: each sweep takes a `Tiles` value and returns the one with the fastest candidate in place.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from . import plan as plan_mod
from .plan import kept
from .sel import DENSE, index, unit_index, units
from .shapes import ModelShape
from .tiles import Tiles
from .weights import Linear


def _time_graph(fn, reps: int = 20, warmup: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warmup):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class KernelBench:
    def __init__(self, shape: ModelShape, *, n_sets: int = 6, batch: int = 1, seed: int = 0):
        self.s, self.B, self.n = shape, batch, n_sets
        D, F, H, d = shape.hidden, shape.ffn, shape.heads, shape.head_dim
        g = torch.Generator(device="cuda").manual_seed(seed)

        def w(n, k):
            return torch.randn((n, k), generator=g, device="cuda", dtype=torch.bfloat16).mul_(k**-0.5)

        self.sets = [
            dict(
                w1=Linear(w(F, D)),
                w3=Linear(w(F, D)),
                w2T=Linear(w(F, D)),
                qkv=Linear(w(shape.qkv_rows, D)),
                o=Linear(w(D, H * d)),
                oT=Linear(w(H * d, D)),
            )
            for _ in range(n_sets)
        ]
        self.x = torch.randn(batch, D, generator=g, device="cuda")
        self.h = torch.randn(batch, F, generator=g, device="cuda").to(torch.bfloat16)
        self.qkv_out = torch.zeros(batch, shape.qkv_rows, device="cuda", dtype=torch.bfloat16)
        self.attn = torch.randn(batch, H * d, generator=g, device="cuda").to(torch.bfloat16)
        self.out = torch.zeros(batch, D, device="cuda")

    def _sels(self, sparsity: float, device="cuda"):
        """Random kept heads and neurons for one layer, laid out by the engine's plan (`plan.set_layer`)."""
        s = self.s
        kf, kh = kept(s.ffn, sparsity), kept(s.heads, sparsity)
        gen = torch.Generator().manual_seed(1)
        neurons = torch.zeros(s.ffn, dtype=torch.bool)
        neurons[torch.randperm(s.ffn, generator=gen)[:kf]] = True
        heads = torch.zeros(s.heads, dtype=torch.bool)
        heads[torch.randperm(s.heads, generator=gen)[:kh]] = True
        one = replace(s, layers=1)
        p = plan_mod.dense_plan(one, device)
        plan_mod.set_layer(p, one, 0, heads, neurons)
        fsel = index(p.ffn_idx[0], p.ffn_count[0:1], kf, kf)
        olist = unit_index(p.head_idx[0], p.head_count[0:1], s.head_dim)
        kkv = int(p.qkv_mask[0, s.heads : s.heads + s.kv_heads].sum())
        return fsel, units(p.qkv_mask[0], s.head_dim), olist, kf, kh, kkv

    def run(self, kernel: str, sparsity: float, tiles: Tiles) -> dict:
        """kernel: gateup | down | qkv | o (row form, the engine's) | o_col (column form with atomics, for
        comparison) | attn | torch_gateup | torch_down (cuBLAS dense reference); launched with `tiles`."""
        from . import kernels_triton  # the GPU path (the sweep logic, `_pick`, imports without triton)

        s, D = self.s, self.s.hidden
        fsel, hsel, olist, kf, kh, kkv = self._sels(sparsity)
        dense = sparsity == 0.0
        fs = DENSE if dense else fsel
        hs = DENSE if dense else hsel
        if kernel == "gateup":
            fn = lambda: [
                kernels_triton.row_gemv(
                    self.x, st["w1"], self.h, lin2=st["w3"], norm="rms", act="silu_gate", sel=fs, pdl=True, tiles=tiles
                )
                for st in self.sets
            ]
            nbytes = 2 * kf * D * 2
        elif kernel == "down":
            fn = lambda: [
                kernels_triton.col_gemv_add(self.h, st["w2T"], self.out, sel=fs, pdl=True, tiles=tiles)
                for st in self.sets
            ]
            nbytes = kf * D * 2
        elif kernel == "qkv":
            fn = lambda: [
                kernels_triton.row_gemv(
                    self.x, st["qkv"], self.qkv_out, norm="rms", sel=hs, tile="qkv", pdl=True, tiles=tiles
                )
                for st in self.sets
            ]
            nbytes = (kh + 2 * kkv) * s.head_dim * D * 2
        elif kernel == "o":
            ks = None if dense else olist
            fn = lambda: [
                kernels_triton.row_gemv(
                    self.attn, st["o"], self.out, sel=DENSE, ksel=ks, accumulate=True, tile="o", pdl=True, tiles=tiles
                )
                for st in self.sets
            ]
            nbytes = kh * s.head_dim * D * 2
        elif kernel == "o_col":
            fn = lambda: [
                kernels_triton.col_gemv_add(self.attn, st["oT"], self.out, sel=hs, tiles=tiles) for st in self.sets
            ]
            nbytes = kh * s.head_dim * D * 2
        elif kernel == "attn":
            T = 256
            H, KVH, d = s.heads, s.kv_heads, s.head_dim
            if not hasattr(self, "kv"):
                self.kv = [
                    (
                        torch.randn(self.B, KVH, T, d, device="cuda", dtype=torch.bfloat16),
                        torch.randn(self.B, KVH, T, d, device="cuda", dtype=torch.bfloat16),
                    )
                    for _ in self.sets
                ]
                self.pos = torch.tensor([192], dtype=torch.int32, device="cuda")
                from .kernels_ref import rope_tables

                self.rope = rope_tables(T, d, 500000.0, "cuda")
                self.qkv_in = torch.randn(self.B, s.qkv_rows, device="cuda").to(torch.bfloat16)
            qm = hsel.mask if not dense else torch.ones(H + 2 * KVH, dtype=torch.int32, device="cuda")
            work = kernels_triton.attention_workspace(self.B, H, T, d, "cuda", tiles=tiles)
            fn = lambda: [
                kernels_triton.attention_decode(
                    self.qkv_in,
                    kc,
                    vc,
                    self.pos,
                    qm,
                    self.attn,
                    heads=H,
                    kv_heads=KVH,
                    head_dim=d,
                    rope=self.rope,
                    work=work,
                    pdl=True,
                    tiles=tiles,
                )
                for kc, vc in self.kv
            ]
            nbytes = (kkv if not dense else KVH) * 2 * 192 * d * 2 * self.B
        elif kernel == "torch_gateup":
            xb = self.x.to(torch.bfloat16)
            fn = lambda: [
                (torch.nn.functional.linear(xb, st["w1"].w), torch.nn.functional.linear(xb, st["w3"].w))
                for st in self.sets
            ]
            nbytes = 2 * s.ffn * D * 2
        elif kernel == "torch_down":
            fn = lambda: [torch.matmul(self.h, st["w2T"].w) for st in self.sets]
            nbytes = s.ffn * D * 2
        else:
            raise ValueError(kernel)
        ms = _time_graph(fn) / self.n
        return {
            "kernel": kernel,
            "sparsity": sparsity,
            "batch": self.B,
            "us": ms * 1e3,
            "bytes": nbytes,
            "gbps": nbytes / (ms * 1e-3) / 1e9,
        }


ROW_CANDIDATES = [
    dict(BN=4, BK=512, warps=4),
    dict(BN=2, BK=512, warps=2),
    dict(BN=2, BK=512, warps=4),
    dict(BN=4, BK=256, warps=2),
    dict(BN=2, BK=1024, warps=4),
]
COL_CANDIDATES = [
    dict(BN=512, BK=8, KPP=256, warps=4, TP=1536),
    dict(BN=512, BK=8, KPP=256, warps=4, TP=768),
    dict(BN=512, BK=8, KPP=128, warps=4),
    dict(BN=256, BK=8, KPP=256, warps=2),
    dict(BN=1024, BK=4, KPP=256, warps=4),
]
ROW_DOT_CANDIDATES = [dict(BN=64, BK=128, warps=4), dict(BN=32, BK=256, warps=4), dict(BN=64, BK=256, warps=8)]
COL_DOT_CANDIDATES = [
    dict(BN=128, BK=64, KPP=256, warps=4),
    dict(BN=256, BK=64, KPP=256, warps=8),
    dict(BN=64, BK=64, KPP=128, warps=4),
]
# The thresholded column GEMV (teal, wina, cats' down; `benchmark.thresholders.sweep_tiles`): one program per
# (BN columns, KPP input channels), BK rows in flight; fewer columns or channels per program = more programs and
# more rows in flight per SM, but more fp32 atomic adds (N · K / KPP of them per launch).
THR_COL_CANDIDATES = [
    dict(BN=128, BK=32, KPP=256, warps=4),  # the H200 pick of 2026-12-04 (teal+wina 11.89 ms; KPP 64: 18.9)
    dict(BN=512, BK=8, KPP=256, warps=4),
    dict(BN=128, BK=32, KPP=512, warps=4),  # fewer K splits: the atomics were what KPP 64 paid for
    dict(BN=64, BK=32, KPP=1024, warps=4),
    dict(BN=128, BK=16, KPP=1024, warps=4),
    dict(BN=64, BK=64, KPP=512, warps=4),
]
THR_COL_DOT_CANDIDATES = [
    dict(BN=128, BK=64, KPP=256, warps=4),  # the H200 pick (20.19 ms; KPP 64: 52.7)
    dict(BN=128, BK=64, KPP=512, warps=4),
    dict(BN=64, BK=64, KPP=1024, warps=4),
    dict(BN=128, BK=32, KPP=128, warps=4),
]
# Batch-1 tiles are swept on whole decode steps (`engine_sweep`): a kernel's cost depends on its neighbours (with
# programmatic dependent launch it streams its first weight tile while the previous one runs), and a sweep of
# one kernel chained with itself picked tiles that were slower in the decode.
SMALL_ROW_CANDIDATES = [
    dict(BN=4, BK=512, warps=4),
    dict(BN=2, BK=1024, warps=4),
    dict(BN=4, BK=1024, warps=8),
    dict(BN=2, BK=2048, warps=8),
    dict(BN=1, BK=4096, warps=8),
]
ATTN_CANDIDATES = [
    dict(BT=16, NT=1, warps=1),
    dict(BT=32, NT=1, warps=2),
    dict(BT=64, NT=1, warps=4),
    dict(BT=16, NT=2, warps=2),
    dict(BT=32, NT=1, warps=1),
]


def _pick(
    tiles: Tiles, key: str, candidates: list[dict], measure, unit: str, lower_is_better: bool
) -> tuple[Tiles, dict]:
    """Measure `tiles` with each candidate as `key`'s tile and return (`tiles` with the best one in place, the
    record); a tile that does not compile is recorded and skipped, not fatal."""
    results = []
    for cand in candidates:
        try:
            value = measure(tiles.replace(key, cand))
        except Exception as e:
            results.append({"config": cand, unit: None, "error": repr(e)[:200]})
            continue
        results.append({"config": cand, unit: value})
    best = (min if lower_is_better else max)((r for r in results if r[unit]), key=lambda r: r[unit])
    return tiles.replace(key, best["config"]), {"key": key, "best": best, "all": results}


def engine_sweep(
    shape: ModelShape,
    weights,
    key: str,
    candidates: list[dict],
    config,
    *,
    points=(("dense", 0.0), ("static", 0.5)),
    batch: int = 1,
) -> tuple[Tiles, dict]:
    """Time whole decode steps (CUDA graph, `batch`) of `config` (an `EngineConfig`, its tiles the starting point)
    at each of `points` (method, sparsity) for each tile candidate of `key`; return the tiles with the fastest
    (sum of the median ms/token over `points`) in place, and the record."""
    from dataclasses import replace as with_

    from . import timing
    from .engine import DecodeEngine

    def measure(tiles: Tiles) -> float:
        total = 0.0
        for method, sp in points:
            cfg = with_(config, method=method, head_sparsity=sp, neuron_sparsity=sp, batch=batch, tiles=tiles)
            eng = DecodeEngine(shape, cfg, weights=weights)
            g = timing.capture(eng)
            total += timing.summarize(timing.time_decode(eng, g, warmup=4))["ms_per_token"]
            del g, eng
        return total

    tiles, out = _pick(config.tiles, key, candidates, measure, "ms", lower_is_better=True)
    where = ", ".join(f"{m}@{sp:.0%}" for m, sp in points)
    return tiles, {**out, "kernel": f"decode step ({where}, batch {batch})"}


def sweep(
    bench: KernelBench, tiles: Tiles, key: str, kernel: str, candidates: list[dict], sparsities=(0.0, 0.5, 0.9)
) -> tuple[Tiles, dict]:
    """Time each tile candidate of `key` on `kernel` (GB/s = total bytes / total time over the sparsities, i.e.
    what a decode at those sparsities would see); return `tiles` with the best in place, and the record."""

    def measure(t: Tiles) -> float:
        runs = [bench.run(kernel, sp, t) for sp in sparsities]
        return sum(r["bytes"] for r in runs) / (sum(r["us"] for r in runs) * 1e-6) / 1e9

    tiles, out = _pick(tiles, key, candidates, measure, "gbps", lower_is_better=False)
    return tiles, {**out, "kernel": kernel}
