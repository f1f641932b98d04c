"""Triton kernels vs the torch reference kernels on the GPU (bf16, random shapes, fresh random inputs).

Skipped without CUDA. Relative error ‖out − ref‖/‖ref‖ ≤ 1e-2; outputs are poisoned (NaN) first so unwritten
elements fail; selections must match exactly.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
BF = torch.bfloat16


def _triton():
    from pipeline.bench import kernels_triton

    return kernels_triton


def _rel(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite or unwritten output"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _lin(n, k, *, bias, rowsum, g):
    from pipeline.bench.weights import Linear

    w = torch.randn(n, k, generator=g, device=DEV).mul_(k**-0.5).to(BF)
    return Linear(
        w,
        torch.randn(n, generator=g, device=DEV) * 0.1 if bias else None,
        w.sum(1, dtype=torch.float32) if rowsum else None,
    )


def _sel(kind, n_rows, group, g):
    from pipeline.bench.sel import DENSE, index, units

    if kind == "dense":
        return DENSE
    if kind == "units":
        m = (torch.rand(n_rows // group, generator=g, device=DEV) < 0.5).to(torch.int32)
        m[0] = 1
        return units(m, group)
    k = random.randint(1, n_rows)
    idx = torch.zeros(n_rows, dtype=torch.int32, device=DEV)
    idx[:k] = torch.randperm(n_rows, device=DEV, generator=g)[:k].sort().values.to(torch.int32)
    return index(idx, torch.tensor([k], dtype=torch.int32, device=DEV))


def _tiles(trial, *roles):
    """The default tiles (even trials) or, on odd trials, the default with each role set to one of the sweep's
    candidates (the tiles are a value passed to the launcher: no global to patch)."""
    from pipeline.bench import microbench
    from pipeline.bench.tiles import DEFAULT_TILES

    tiles = DEFAULT_TILES
    if trial % 2:
        for role, name in roles:
            cands = getattr(microbench, name)
            tiles = tiles.replace(role, cands[(trial // 2) % len(cands)])
    return tiles


@pytest.mark.parametrize("trial", range(12))
def test_row_gemv(trial):
    from pipeline.bench import kernels_ref

    kernels_triton = _triton()
    random.seed(trial)
    g = torch.Generator(device=DEV).manual_seed(trial)
    B = random.choice([1, 1, 3, 16])
    K = random.choice([256, 1000, 4096, 3584])
    group = 128
    N = group * random.randint(2, 24)
    norm = random.choice(["none", "rms", "ln", "minmax"])
    act = random.choice(["none", "relu", "silu_gate"])
    kind = random.choice(["dense", "units", "index"])
    bias = random.random() < 0.5
    lin = _lin(N, K, bias=bias, rowsum=norm in ("ln", "minmax"), g=g)
    lin2 = _lin(N, K, bias=bias, rowsum=norm in ("ln", "minmax"), g=g) if act == "silu_gate" else None
    x = torch.randn(B, K, generator=g, device=DEV) * 3 + 0.5
    sel = _sel(kind, N, group, g)
    out_t = torch.full((B, N), float("nan"), device=DEV, dtype=BF)
    out_r = out_t.clone()
    tiles = _tiles(trial, ("row", "ROW_CANDIDATES"), ("row_dot", "ROW_DOT_CANDIDATES"))
    kernels_triton.row_gemv(x, lin, out_t, lin2=lin2, norm=norm, act=act, sel=sel, tiles=tiles)
    kernels_ref.row_gemv(x, lin, out_r, lin2=lin2, norm=norm, act=act, sel=sel)
    written = ~torch.isnan(out_r)
    assert torch.equal(~torch.isnan(out_t), written), "kernel wrote a different set of outputs"
    assert _rel(out_t[written], out_r[written]) <= 1e-2


@pytest.mark.parametrize("trial", range(8))
def test_row_gemv_input_units_accumulate(trial):
    """The o-projection's form: input columns gathered by head, result added into the fp32 residual stream."""
    from pipeline.bench import kernels_ref
    from pipeline.bench.sel import DENSE, unit_index

    kernels_triton = _triton()
    random.seed(400 + trial)
    g = torch.Generator(device=DEV).manual_seed(400 + trial)
    B = random.choice([1, 1, 2, 16])
    d = random.choice([64, 128])
    H = random.randint(2, 40)
    N = random.choice([1024, 4096, 5120, 7168])
    lin = _lin(N, H * d, bias=random.random() < 0.5, rowsum=False, g=g)
    x = torch.randn(B, H * d, generator=g, device=DEV).to(BF)
    m = (torch.rand(H, generator=g, device=DEV) < 0.5).to(torch.int32)
    m[0] = 1
    x[:, m.repeat_interleave(d) == 0] = float("nan")  # dropped heads' inputs are stale: must not be read
    kept = torch.nonzero(m).flatten().to(torch.int32)
    idx = torch.full((H,), -1, dtype=torch.int32, device=DEV)
    idx[: kept.numel()] = kept
    ks = unit_index(idx, torch.tensor([kept.numel()], dtype=torch.int32, device=DEV), d) if trial % 4 else None
    if ks is None:
        x = torch.nan_to_num(x)
    base = torch.randn(B, N, generator=g, device=DEV)
    out_t, out_r = base.clone(), base.clone()
    kernels_triton.row_gemv(x, lin, out_t, sel=DENSE, ksel=ks, accumulate=True, tile="o")
    kernels_ref.row_gemv(torch.nan_to_num(x), lin, out_r, sel=DENSE, ksel=ks, accumulate=True, tile="o")
    assert _rel(out_t - base, out_r - base) <= 1e-2


@pytest.mark.parametrize("trial", range(10))
def test_col_gemv_add(trial):
    from pipeline.bench import kernels_ref

    kernels_triton = _triton()
    random.seed(100 + trial)
    g = torch.Generator(device=DEV).manual_seed(100 + trial)
    B = random.choice([1, 1, 2, 16])
    N = random.choice([1024, 4096, 3584, 5120])
    group = random.choice([64, 128])
    R = group * random.randint(2, 40)
    kind = random.choice(["dense", "units", "index"])
    from pipeline.bench.weights import Linear

    lin = _lin(R, N, bias=False, rowsum=False, g=g)
    if random.random() < 0.5:  # the bias of a column kernel is per output column [N]
        lin = Linear(lin.w, torch.randn(N, generator=g, device=DEV) * 0.1)
    h = torch.randn(B, R, generator=g, device=DEV).to(BF)
    sel = _sel(kind, R, group, g)
    base = torch.randn(B, N, generator=g, device=DEV)
    out_t, out_r = base.clone(), base.clone()
    tiles = _tiles(trial, ("col", "COL_CANDIDATES"), ("col_dot", "COL_DOT_CANDIDATES"))
    kernels_triton.col_gemv_add(h, lin, out_t, sel=sel, tiles=tiles)
    kernels_ref.col_gemv_add(h, lin, out_r, sel=sel)
    assert _rel(out_t - base, out_r - base) <= 1e-2


@pytest.mark.parametrize("trial", range(8))
def test_attention_decode(trial):
    """Split-T attention (several tilings, each launched twice: the merge counters must reset) and the one-program
    path, against the reference."""
    from pipeline.bench import kernels_ref

    kernels_triton = _triton()
    random.seed(200 + trial)
    g = torch.Generator(device=DEV).manual_seed(200 + trial)
    H, KVH = random.choice([(32, 8), (28, 4), (8, 8), (4, 1)])
    d = random.choice([64, 128])
    B, T = random.choice([1, 2, 5]), 256
    pos = random.choice([0, 1, 63, 64, random.randint(0, T - 1), T - 1])
    rope = kernels_ref.rope_tables(T, d, 500000.0, DEV) if random.random() < 0.6 else None
    qkv = torch.randn(B, (H + 2 * KVH) * d, generator=g, device=DEV).to(BF)
    kc = torch.randn(B, KVH, T, d, generator=g, device=DEV).to(BF)
    vc = torch.randn(B, KVH, T, d, generator=g, device=DEV).to(BF)
    hm = (torch.rand(H, generator=g, device=DEV) < 0.6).to(torch.int32)
    hm[0] = 1
    kvm = hm.view(KVH, -1).amax(1)
    mask = torch.cat([hm, kvm, kvm])
    p = torch.tensor([pos], dtype=torch.int32, device=DEV)
    out_r = torch.full((B, H * d), float("nan"), device=DEV, dtype=BF)
    kc_r, vc_r = kc.clone(), vc.clone()
    kernels_ref.attention_decode(qkv, kc_r, vc_r, p, mask, out_r, heads=H, kv_heads=KVH, head_dim=d, rope=rope)
    kept = hm.bool().repeat_interleave(d)
    from pipeline.bench.tiles import DEFAULT_TILES

    # the last tiling covers the whole cache in one program per (b, h): no merge
    for cfg in (
        dict(BT=64, NT=1, warps=4),
        dict(BT=32, NT=2, warps=2),
        dict(BT=16, NT=1, warps=1),
        dict(BT=128, NT=2, warps=4),
    ):
        tiles = DEFAULT_TILES.replace("attn", cfg)
        work = kernels_triton.attention_workspace(B, H, T, d, DEV, tiles=tiles)
        assert (work["BT"], work["NT"]) == (cfg["BT"], cfg["NT"])
        for _ in range(2):
            out_t = torch.full((B, H * d), float("nan"), device=DEV, dtype=BF)
            kc_t, vc_t = kc.clone(), vc.clone()
            kernels_triton.attention_decode(
                qkv, kc_t, vc_t, p, mask, out_t, heads=H, kv_heads=KVH, head_dim=d, rope=rope, work=work, tiles=tiles
            )
            assert torch.isnan(out_t[:, ~kept]).all()
            assert _rel(out_t[:, kept], out_r[:, kept]) <= 1e-2, cfg
            assert _rel(kc_t, kc_r) <= 1e-2 and _rel(vc_t, vc_r) <= 1e-2
        assert (work["count"] == 0).all()


@pytest.mark.parametrize("trial", range(8))
def test_select_exact(trial):
    from pipeline.bench import kernels_ref

    kernels_triton = _triton()
    random.seed(300 + trial)
    g = torch.Generator(device=DEV).manual_seed(300 + trial)
    B = random.choice([1, 4, 16])
    R = random.randint(1, 40)
    if trial % 2 == 0:
        H, KVH = random.choice([(32, 8), (28, 4), (56, 56)])
        k = random.randint(1, H)
        s = torch.randn(B, R, H, generator=g, device=DEV)
        m_t = torch.zeros(R + 1, H + 2 * KVH, dtype=torch.int32, device=DEV)
        m_r = m_t.clone()
        hi_t = torch.full((R + 1, H), -1, dtype=torch.int32, device=DEV)
        hi_r = hi_t.clone()
        hc_t = torch.zeros(R + 1, dtype=torch.int32, device=DEV)
        hc_r = hc_t.clone()
        union = torch.zeros(R * H, dtype=torch.int32, device=DEV)
        kernels_triton.select_heads(s, k, m_t, hi_t, hc_t, out_row0=1, kv_heads=KVH, union=union)
        kernels_ref.select_heads(s, k, m_r, hi_r, hc_r, out_row0=1, kv_heads=KVH)
        assert torch.equal(m_t, m_r) and torch.equal(hc_t, hc_r)
        for r in range(1, R + 1):
            assert torch.equal(hi_t[r, : int(hc_r[r])], hi_r[r, : int(hc_r[r])])
        assert (union == 0).all()
    else:
        F = random.choice([11008, 14336, 18944, 28672, 1000])
        k = random.randint(1, F)
        s = torch.randn(B, R, F, generator=g, device=DEV)
        i_t = torch.full((R + 1, F), -1, dtype=torch.int32, device=DEV)
        i_r = i_t.clone()
        c_t = torch.zeros(R + 1, dtype=torch.int32, device=DEV)
        c_r = c_t.clone()
        union = torch.zeros(R * F, dtype=torch.int32, device=DEV)
        kernels_triton.select_neurons(s, k, i_t, c_t, out_row0=1, union=union)
        kernels_ref.select_neurons(s, k, i_r, c_r, out_row0=1)
        assert torch.equal(c_t, c_r)
        for r in range(1, R + 1):
            n = int(c_r[r])
            assert torch.equal(i_t[r, :n], i_r[r, :n])


@pytest.mark.parametrize(
    "method,batch",
    [("dense", 1), ("static", 1), ("shadowllm", 1), ("dejavu", 1), ("shadowllm", 4), ("dejavu", 3), ("static", 16)],
)
@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_engine_graph_matches_reference(method, batch, fam):
    """The Triton engine, captured in a CUDA graph, equals the fp32 reference with the plan's masks zeroed."""
    from pipeline.bench import reference, timing, weights
    from pipeline.bench.engine import DecodeEngine
    from tests.conftest import bench_small_config, bench_small_shape

    s = bench_small_shape(fam)
    w = weights.build(s, dtype=BF, device=DEV, keep_raw=True, seed=5)
    cfg = bench_small_config(method, 0.5, batch)
    eng = DecodeEngine(s, cfg, weights=w, backend="triton", device=DEV)
    ref = reference.ReferenceDecoder(w, eng.k_cache, eng.v_cache)
    g = timing.capture(eng)  # runs one eager step first, then resets
    eng.reset()
    tok = eng.tok.clone()
    g.replay()
    torch.cuda.synchronize()
    hk, nk = (m.to(DEV) for m in eng.plan.host_masks(s))
    lr = ref.step(tok, 16, hk if method != "dense" else None, nk if method != "dense" else None)
    assert _rel(eng.logits, lr) <= 1e-2
