"""The benchmark engine's thresholded methods (issue 12 item 3): teal, wina, cats, griffin.

CPU only: the torch reference kernels, and the Triton kernels under TRITON_INTERPRET=1 (the interpreter's
`tl.dot` mishandles bf16, so batches > 1 run fp32 weights there; batch 1 runs bf16 as on the GPU).
"""

from __future__ import annotations

import os
import time
import types

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports kernels_triton (triton reads it at decoration time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pipeline.bench import backend, kernels_ref, reference, shapes, weights
from pipeline.bench.engine import METHODS, REGISTRY, DecodeEngine, EngineConfig
from pipeline.bench.predictors import PredictorSpec
from pipeline.bench.sel import DENSE
from pipeline.bench.tiles import DEFAULT_TILES
from pipeline.bench.weights import Linear

NEW = ("teal", "wina", "cats", "griffin")
SMALL = (
    DEFAULT_TILES.replace("col", {"BN": 16, "BK": 8, "KPP": 32, "warps": 4, "TP": 64})
    .replace("col_dot", {"BN": 16, "BK": 16, "KPP": 32, "warps": 4})
    .replace("thr_col", {"BN": 16, "BK": 8, "KPP": 32, "warps": 4})
    .replace("thr_col_dot", {"BN": 16, "BK": 16, "KPP": 32, "warps": 4})
)


def _triton():
    """The Triton kernels, interpreted on the CPU (skipped where they were imported compiled, e.g. on a GPU)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests: CPU only (the GPU runs tests/test_bench_kernels_gpu.py)")
    pytest.importorskip("triton", reason="triton is not installed (the [test] extra installs it)")
    os.environ["TRITON_INTERPRET"] = "1"
    kt = backend.get("triton")
    if "Interpreted" not in type(kt._thr_col_kernel).__name__:
        pytest.skip("kernels_triton was imported without TRITON_INTERPRET=1 in this process")
    return kt


def _kernels(name):
    return kernels_ref if name == "torch" else _triton()


def _rel(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kern", ["torch", "triton"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("mode", ["plain", "rms", "gated", "cats"])
def test_thr_col_gemv_equals_dense_with_dropped_channels_zeroed(kern, B, mode):
    """out += (input with each sequence's dropped channels zeroed) @ W^T, per output segment with its own criterion
    and thresholds; the W^T rows no sequence keeps are never read (NaN there), and count = the union per segment."""
    k = _kernels(kern)
    g = torch.Generator().manual_seed(10 * B + ["plain", "rms", "gated", "cats"].index(mode))
    K, N, segs = 48, 64, (32, 48)
    dt = torch.bfloat16 if B == 1 else torch.float32
    wt = torch.randn(K, N, generator=g).to(dt)
    x = torch.randn(B, 2 * K if mode == "gated" else K, generator=g) * 2
    x2 = torch.randn(B, K, generator=g) if mode == "cats" else None
    crit = torch.rand(3, K, generator=g) + 0.5
    u = torch.rand(3, B, generator=g)
    eps = 1e-5
    # by hand: the linear's input v and the criterion source a
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + eps)
    if mode == "gated":
        a = torch.nn.functional.silu(xf[:, :K]) * xf[:, K:]
        v = a
    elif mode == "cats":
        a, v = torch.nn.functional.silu(xf), x2
    else:
        a = xf
        v = xf * rstd if mode == "rms" else xf
    norm_thr = mode == "rms"
    # thresholds around the median score of each segment: each sequence drops about half, the batch's union less
    med = torch.stack([(a.abs() * crit[s] * (rstd if norm_thr else 1.0)).median() for s in range(3)])
    thr = med[:, None] * (0.9 + 0.6 * u) * (1.6 if B > 1 else 1.0)
    bounds = (0, 32, 48, 64)
    want = torch.randn(B, N, generator=g)
    base = want.clone()
    counts = []
    union_all = torch.zeros(K, dtype=torch.bool)
    for s in range(3):
        score = a.abs() * crit[s] * (rstd if norm_thr else 1.0)
        keep = score > thr[s][:, None]
        lo, hi = bounds[s], bounds[s + 1]
        want[:, lo:hi] += (v * keep) @ wt[:, lo:hi].float()
        counts.append(int(keep.any(0).sum()))
        union_all |= keep.any(0)
    assert 0 < sum(counts) < 3 * K, "the draw must drop some channels and keep some"
    bias = torch.randn(N, generator=g) if mode == "plain" else None
    if bias is not None:
        want += bias
    wt[~union_all] = float("nan")  # rows no sequence keeps for any segment must not be read
    out = base.clone()
    cnt = torch.zeros(3, dtype=torch.int32)
    k.thr_col_gemv(
        x, Linear(wt, bias), out, mode=mode, crit=crit, thr=thr, count=cnt, x2=x2, segs=segs, norm_thr=norm_thr,
        tiles=SMALL,
    )  # fmt: skip
    assert _rel(out - base, want - base) <= (1e-2 if dt == torch.bfloat16 else 1e-5)
    assert cnt.tolist() == counts


@pytest.mark.parametrize("kern", ["torch", "triton"])
def test_thr_col_gemv_ge_keeps_ties_and_zero_threshold_is_dense(kern):
    """`ge` (WINA's k-th largest as the threshold) keeps the score equal to it; threshold −1 keeps everything."""
    k = _kernels(kern)
    K, N = 16, 32
    wt = torch.randn(K, N)
    x = torch.arange(1, K + 1, dtype=torch.float32)[None, :]
    crit = torch.ones(1, K)
    for ge, t, n_kept in ((True, 9.0, 8), (False, 9.0, 7), (False, -1.0, 16)):
        out = torch.zeros(1, N)
        cnt = torch.zeros(1, dtype=torch.int32)
        k.thr_col_gemv(x, Linear(wt), out, mode="plain", crit=crit, thr=torch.tensor([[t]]), count=cnt, ge=ge)
        kept = (x >= t) if ge else (x > t)
        torch.testing.assert_close(out, (x * kept) @ wt, rtol=1e-5, atol=1e-5)
        assert int(cnt[0]) == n_kept


@pytest.mark.parametrize("kern", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["plain", "gated"])
def test_kth_threshold_is_the_kth_largest_score(kern, mode):
    k = _kernels(kern)
    g = torch.Generator().manual_seed(7)
    B, K, S = 3, 40, 2
    x = torch.randn(B, 2 * K if mode == "gated" else K, generator=g)
    crit = torch.rand(S, K, generator=g) + 0.1
    # silu written as the kernels write it (the column kernel recomputes the same score bit for bit)
    a = x[:, :K] / (1.0 + torch.exp(-x[:, :K])) * x[:, K:] if mode == "gated" else x
    for kk in (1, 13, K):
        thr = torch.zeros(S, B)
        k.kth_threshold(x, crit, kk, thr, mode=mode)
        for s in range(S):
            score = a.abs() * crit[s]
            want = score.sort(dim=1, descending=True).values[:, kk - 1]
            torch.testing.assert_close(thr[s], want, rtol=1e-6, atol=0)
            t = thr[s][:, None]  # the interpreter's exp may differ from torch's by an ulp
            assert ((score >= t * (1 - 1e-5)).sum(1) >= kk).all() and ((score > t * (1 + 1e-5)).sum(1) < kk).all()


@pytest.mark.parametrize("kern", ["torch", "triton"])
@pytest.mark.parametrize("B", [1, 3])
def test_row_gemv_gate_thresh_reads_only_kept_rows(kern, B):
    """CATS' up projection: rows with |silu(gate)| ≤ t for every sequence are neither read (NaN) nor written; a row
    one sequence keeps is silu(g)·u for it and 0 for the others."""
    k = _kernels(kern)
    g = torch.Generator().manual_seed(11 + B)
    N, K = 40, 32
    dt = torch.bfloat16 if B == 1 else torch.float32
    w = torch.randn(N, K, generator=g).to(dt)
    x = torch.randn(B, K, generator=g)
    gate = torch.randn(B, N, generator=g)
    t = torch.tensor([0.3])
    a = torch.nn.functional.silu(gate)
    keep = a.abs() > t
    rows = keep.any(0)
    assert 0 < int(rows.sum()) < N
    u = (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5)) @ w.float().T
    want = torch.where(keep, a * u, torch.zeros(()))
    w[~rows] = float("nan")
    out = torch.full((B, N), float("nan"))
    tiles = DEFAULT_TILES.replace("row_dot", {"BN": 16, "BK": 32, "warps": 4})
    k.row_gemv(x, Linear(w), out, norm="rms", act="gate_thresh", sel=DENSE, gate=gate, gate_thr=t, tiles=tiles)
    assert torch.equal(torch.isnan(out).all(0), ~rows), "written rows = rows some sequence keeps"
    assert _rel(out[:, rows], want[:, rows]) <= (1e-2 if dt == torch.bfloat16 else 1e-5)


def test_thr_col_tiling_has_its_own_tiles():
    """The thresholded column GEMV is tiled by `thr_col` / `thr_col_dot` (swept apart), not by the index-list
    column kernel's `col` / `col_dot`; BN still shrinks to divide every output segment."""
    from pipeline.bench.tiles import thr_col_tiling

    t = DEFAULT_TILES.replace("thr_col", {"BN": 64, "BK": 16, "KPP": 128, "warps": 2}).replace(
        "thr_col_dot", {"BN": 32, "BK": 32, "KPP": 64, "warps": 8}
    )
    assert t.col == DEFAULT_TILES.col and t.col_dot == DEFAULT_TILES.col_dot
    one = thr_col_tiling(t, batch=1, n=4096)
    assert (one.BN, one.BK, one.KPP, one.warps) == (64, 16, 128, 2)
    many = thr_col_tiling(t, batch=4, n=6144, segs=(4096, 5120))
    assert (many.BN, many.BK, many.KPP, many.warps) == (32, 32, 64, 8)
    assert thr_col_tiling(t, batch=1, n=96, segs=(32,)).BN == 32


def test_thresholder_tile_sweep_sweeps_both_roles_on_the_column_methods():
    """`benchmark.thresholders.sweep_tiles`: thr_col at batch 1 and thr_col_dot at the grid's smallest batch > 1,
    each on decode steps of the column methods at 50 %, the pick of the first in place for the second."""
    from pipeline.bench import microbench, run_all
    from pipeline.bench.params import BenchmarkParams
    from tests.conftest import section_params

    calls = []

    def fake_sweep(shape, w, key, cands, cfg, *, points, batch):
        calls.append((key, batch, points, cfg.batch, cfg.tiles))
        best = dict(cands[-1])
        return cfg.tiles.replace(key, best), {"key": key, "best": {"config": best, "ms": 1.0}, "kernel": "k"}

    thr = {"models": ["llama-3-8b"], "methods": list(NEW) + ["shadowllm"], "sparsities": [0.5], "batches": [16, 4]}
    bp = section_params(BenchmarkParams, thresholders={**thr, "sweep_tiles": True})
    tiles, recs = run_all.sweep_thresholder_tiles(
        shapes.get("llama-3-8b"), None, bp=bp, tiles=DEFAULT_TILES, log=lambda m: None, sweep=fake_sweep
    )
    assert [(k, b, bb) for k, b, _p, bb, _t in calls] == [("thr_col", 1, 1), ("thr_col_dot", 4, 4)]
    assert all(p == (("teal", 0.5), ("wina", 0.5)) for _k, _b, p, _bb, _t in calls)
    assert calls[1][4].thr_col == microbench.THR_COL_CANDIDATES[-1]  # the first pick is in place for the second
    assert tiles.thr_col == microbench.THR_COL_CANDIDATES[-1]
    assert tiles.thr_col_dot == microbench.THR_COL_DOT_CANDIDATES[-1] and len(recs) == 2
    # OPT: no column method applies (LayerNorm), nothing to sweep
    tiles, recs = run_all.sweep_thresholder_tiles(
        shapes.get("opt-1.3b"), None, bp=bp, tiles=DEFAULT_TILES, log=lambda m: None, sweep=fake_sweep
    )
    assert tiles == DEFAULT_TILES and recs == [] and len(calls) == 2


# ----------------------------------------------------------------------------------------------- engine


def _engine(method, sp, batch, w=None, kern="torch", dtype=torch.float32, tiles=None):
    s = shapes.tiny("llama")
    w = w or weights.build(s, dtype=dtype, keep_raw=True, seed=3)
    cfg = EngineConfig(
        method=method,
        head_sparsity=sp,
        neuron_sparsity=sp,
        batch=batch,
        prompt_len=8,
        gen_len=4,
        shadowllm=PredictorSpec(16, 16, 4, 8),
        dejavu=PredictorSpec(8, 8, 0, 0),
        overlap=True,
        seed=1,
        **({} if tiles is None else {"tiles": tiles}),
    )
    if kern == "triton":
        _triton()
    return DecodeEngine(s, cfg, weights=w, backend=kern, device="cpu", dtype=dtype), w


def test_methods_carry_their_capabilities():
    assert set(NEW) <= set(METHODS)
    assert {m: REGISTRY[m].skips for m in METHODS} == {
        "dense": "none",
        "static": "units",
        "shadowllm": "units",
        "dejavu": "units",
        "teal": "inputs",
        "wina": "inputs",
        "cats": "gated_neurons",
        "griffin": "units",
    }
    assert REGISTRY["teal"].calibrated and REGISTRY["cats"].calibrated and not REGISTRY["wina"].calibrated
    assert REGISTRY["cats"].sparsities(0.5) == (0.0, 0.5) and REGISTRY["teal"].sparsities(0.5) == (0.5, 0.5)
    opt = shapes.tiny("opt")
    for m in ("teal", "wina", "cats"):
        assert REGISTRY[m].unsupported(opt)
    assert REGISTRY["griffin"].unsupported(opt) is None


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("batch", [1, 3])
def test_zero_sparsity_equals_dense(method, batch):
    eng, w = _engine(method, 0.0, batch)
    ref = reference.ReferenceDecoder(w, eng.k_cache, eng.v_cache)
    eng.reset()
    eng.reset_counts()
    tok = eng.tok.clone()
    for t in range(3):
        eng.step()
        lr = ref.step(tok, 8 + t)
        torch.testing.assert_close(eng.logits, lr, rtol=1e-4, atol=1e-4)
        tok = lr.argmax(-1)
    assert eng.byte_sparsity() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("batch", [1, 2])
def test_triton_engine_equals_torch_engine(method, batch):
    """The interpreted Triton kernels and the torch ones give the same steps and the same reads (fp32 weights, the
    torch engine's thresholds)."""
    w = weights.build(shapes.tiny("llama"), dtype=torch.float32, keep_raw=True, seed=3)
    et, _ = _engine(method, 0.5, batch, w, kern="triton", tiles=SMALL)
    er, _ = _engine(method, 0.5, batch, w)
    if hasattr(er, "thr"):
        et.thr.copy_(er.thr)
    for e in (et, er):
        e.reset()
        e.reset_counts()
    for _ in range(2):
        et.step()
        er.step()
        assert _rel(et.logits, er.logits) <= 1e-4
    assert torch.equal(et.reads, er.reads)
    assert et.byte_sparsity() == pytest.approx(er.byte_sparsity())
    assert et.byte_sparsity() > 0


class _Recorder:
    """The torch kernels, recording the union of kept W^T rows of every thresholded call."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []
        self.keeps: list[torch.Tensor] = []
        self.mod = types.SimpleNamespace(**{k: getattr(kernels_ref, k) for k in dir(kernels_ref)})
        self.mod.thr_col_gemv = self._thr_col

    def _thr_col(self, x, lin, out, *, mode, crit, thr, count, x2=None, ge=False, norm_thr=False, segs=(), **kw):
        keep = kernels_ref.thr_keep(x, crit, thr, mode=mode, segs=segs, x2=x2, ge=ge, norm_thr=norm_thr)
        self.calls.append(keep.any(1))  # [S, K]: rows the batch reads per segment
        self.keeps.append(keep)  # [S, B, K]
        kernels_ref.thr_col_gemv(
            x, lin, out, mode=mode, crit=crit, thr=thr, count=count, x2=x2, ge=ge, norm_thr=norm_thr, segs=segs, **kw
        )


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_batch_reads_the_union_and_each_sequence_its_own_input(method):
    """At batch 3 each sequence decodes exactly as alone (its own thresholded inputs), and the rows read are the
    union over the three sequences of what each reads alone, call by call — not one shared mask."""
    B = 3
    e3, w = _engine(method, 0.5, B)
    rec3 = _Recorder()
    e3.k = rec3.mod
    e3.reset()
    e3.reset_counts()
    e3.step()
    singles = []
    for b in range(B):
        e1, _ = _engine(method, 0.5, 1, w)
        e1.k_cache.copy_(e3.k_cache[:, b : b + 1])
        e1.v_cache.copy_(e3.v_cache[:, b : b + 1])
        e1.thr.copy_(e3.thr[..., b : b + 1])  # teal/cats: one threshold per tensor; wina rewrites its own
        e1.tok0.copy_(e3.tok0[b : b + 1])
        rec = _Recorder()
        e1.k = rec.mod
        e1.reset()
        e1.reset_counts()
        e1.step()
        torch.testing.assert_close(e1.logits[0], e3.logits[b], rtol=1e-4, atol=1e-4)
        singles.append(rec.calls)
    assert len(rec3.calls) == len(singles[0]) > 0
    for i, rows3 in enumerate(rec3.calls):
        union = singles[0][i] | singles[1][i] | singles[2][i]
        assert torch.equal(rows3, union)
    total_union = sum(int(c.sum()) for c in rec3.calls)
    assert int(e3.reads.sum()) == total_union
    assert total_union > max(sum(int(c.sum()) for c in calls) for calls in singles), "the union reads more"


# shapes.tiny("llama"): E 48, 4 query heads of 16 in 2 kv groups (q/k/v rows 128), F 48, 3 layers, vocab 64;
# fp32 weights: 4 bytes an element
E, QKV, HD, F, L, V = 48, 128, 64, 48, 3, 64
LAYER = QKV * E + E * HD + 3 * F * E  # 6144 + 3072 + 6912 = 16128 elements
DENSE_ELEMS = L * LAYER + V * E  # 51456


def test_byte_accounting_by_hand():
    assert LAYER == 16128 and DENSE_ELEMS == 51456
    roles = ("attn_in", "o_in", "mlp_in", "down_in")
    # teal: layer 1 drops its whole attention input (q/k/v: 48·128 elements), layer 2 its whole down input (48·48)
    eng, _ = _engine("teal", 0.5, 1)
    eng.thr.fill_(-1.0)
    eng.thr[1, roles.index("attn_in")] = float("inf")
    eng.thr[2, roles.index("down_in")] = float("inf")
    eng.reset()
    eng.reset_counts()
    eng.step()
    eng.step()
    wb = eng.weight_bytes()
    assert wb["qkv"] == (L - 1) * QKV * E * 4 and wb["mlp_out"] == (L - 1) * F * E * 4
    assert eng.byte_sparsity() == pytest.approx((6144 + 2304) / DENSE_ELEMS)
    # wina at 50%: every pruned layer reads exactly half of each input's channels (q, k, v, gate, up each half):
    # q 24·64 + k 24·32 + v 24·32 + o 32·48 + gate/up 2·24·48 + down 24·48 = 8064 = half of 16128, in layers 1, 2
    eng, _ = _engine("wina", 0.5, 1)
    eng.reset()
    eng.reset_counts()
    eng.step()
    assert eng.weight_bytes()["total"] == (LAYER + 2 * 8064 + V * E) * 4
    assert eng.byte_sparsity() == pytest.approx(2 * 8064 / DENSE_ELEMS)
    # cats: layer 1 drops every neuron: its up rows and down columns (48·48 each); the gate is read in full
    eng, _ = _engine("cats", 0.5, 1)
    eng.thr.fill_(-1.0)
    eng.thr[1, roles.index("down_in")] = float("inf")
    eng.reset()
    eng.reset_counts()
    eng.step()
    assert eng.weight_bytes()["mlp_in"] == (L * F * E + (L - 1) * F * E) * 4
    assert eng.byte_sparsity() == pytest.approx(2 * F * E / DENSE_ELEMS)
    # griffin at 50%, batch 1: 24 of 48 neurons kept in layers 1, 2 (gate, up rows and down columns), heads dense
    eng, _ = _engine("griffin", 0.5, 1)
    assert eng.byte_sparsity() == pytest.approx(2 * 24 * 3 * E / DENSE_ELEMS)
    # griffin at batch 3: the union of three random sets of 24, read once
    eng, _ = _engine("griffin", 0.5, 3)
    _hk, nk = eng.plan.host_masks(eng.shape)
    kept = nk[1:].sum(1)
    assert (kept > 24).all()
    assert eng.byte_sparsity() == pytest.approx(float((F - kept).sum()) * 3 * E / DENSE_ELEMS)


def test_teal_and_cats_calibration_hits_the_target_on_the_calibration_draw():
    """Forward-order calibration: stepping the calibration draw again realises the target share per tensor."""
    for method, n_roles in (("teal", 4), ("cats", 1)):
        eng, _ = _engine(method, 0.5, 2)
        eng.reset()
        gen = torch.Generator().manual_seed(eng.cfg.seed + 11)
        eng.tok.copy_(torch.randint(0, eng.shape.vocab, eng.tok.shape, generator=gen))
        rec = _Recorder()
        eng.k = rec.mod
        eng.step()
        assert len(rec.keeps) == n_roles * L
        assert all(bool(c.all()) for c in rec.keeps[:n_roles]), "layer 0 dense"
        for keep in rec.keeps[n_roles:]:  # every thresholded tensor of layers 1, 2: exactly half dropped
            assert 1.0 - keep[0].float().mean().item() == pytest.approx(round(0.5 * keep[0].numel()) / keep[0].numel())


@pytest.mark.parametrize("kern", ["torch", "triton"])
def test_run_measures_the_thresholders_grid_on_cpu(kern):
    """The run's thresholders loop (run_all.measure_thresholders, as the H200 run calls it) end to end on a tiny
    shape: dense first, every method × sparsity × batch, byte sparsity measured, rows into the report."""
    from pipeline.bench import report, run_all
    from pipeline.bench.params import BenchmarkParams
    from tests.conftest import section_params

    sps, batches = ([0.0, 0.5], [1, 2]) if kern == "torch" else ([0.5], [2])  # the interpreter is slow
    if kern == "triton":
        _triton()
    bp = section_params(
        BenchmarkParams,
        prompt_len=8,
        gen_len=3,
        warmup_steps=1,
        thresholders={
            "models": ["llama-3-8b"],
            "methods": list(NEW),
            "sparsities": sps,
            "batches": batches,
            "sweep_tiles": False,
        },
    )
    s = shapes.tiny("llama")
    w = weights.build(s, dtype=torch.float32, seed=3)
    logs = []
    rows = run_all.measure_thresholders(
        s, w, {}, bp=bp, tiles=SMALL, copy_gbps=1.0, dense_rows={}, log=logs.append, t0=time.time(), backend=kern,
        device="cpu",
    )  # fmt: skip
    ok = [r for r in rows if r.get("status") == "ok"]
    assert len(ok) == len(rows) == len(batches) * (1 + len(NEW) * len(sps)), [r.get("status") for r in rows]
    for r in ok:
        assert r["grid"] == "thresholders" and r["speedup_vs_dense"] is not None
        if r["sparsity"] == 0.0:
            assert r["byte_sparsity"] == pytest.approx(0.0, abs=1e-12)
        else:
            assert 0.0 < r["byte_sparsity"] < 0.6
            dense = next(x for x in ok if x["method"] == "dense" and x["batch"] == r["batch"])
            assert r["total_bytes"] < dense["total_bytes"]
    cats = {r["batch"]: r for r in ok if r["method"] == "cats" and r["sparsity"] == 0.5}
    assert cats[2]["head_sparsity"] == 0.0 and cats[2]["neuron_sparsity"] == 0.5
    md = report.to_markdown({"rows": [], "params": {"prompt_len": 8, "gen_len": 3}, "thresholder_rows": rows})
    assert "Thresholders next to the predictors" in md and md.count("| tiny-llama |") == len(ok)


def test_report_lists_every_tile_sweep():
    from pipeline.bench import report

    micro = {
        "sweeps": [
            {
                "key": "thr_col",
                "kernel": "decode step (teal@50%, wina@50%, batch 1)",
                "best": {"config": {"BN": 128, "BK": 32}, "ms": 4.2},
                "all": [
                    {"config": {"BN": 512, "BK": 8}, "ms": 5.25},
                    {"config": {"BN": 128, "BK": 32}, "ms": 4.2},
                    {"config": {"BN": 64, "BK": 64}, "ms": None, "error": "x"},
                ],
            },
            {
                "key": "col",
                "kernel": "down",
                "best": {"config": {"BN": 512}, "gbps": 3100.0},
                "all": [{"config": {"BN": 512}, "gbps": 3100.0}],
            },
        ]
    }
    md = report.to_markdown({"rows": [], "params": {"prompt_len": 8, "gen_len": 3}, "micro": micro})
    assert "## Tile sweeps" in md
    assert "| thr_col | decode step (teal@50%, wina@50%, batch 1) (ms) | BN=128 BK=32 | BN=512 BK=8: 5.250; " in md
    assert "BN=64 BK=64: error |" in md and "| col | down (GB/s) | BN=512 | BN=512: 3100 |" in md
