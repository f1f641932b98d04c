"""Triton kernels of the decode engine (GPU path). Same API as `kernels_ref`.

- `_row_kernel`: gather-GEMV over kept *rows* (q/k/v of kept heads, gate+up or fc1 of kept neurons, predictor
  layers, LM head). The pre-norm (RMSNorm, LayerNorm, or the predictors' min-max scaling) is fused: its
  statistics are accumulated in the same pass that streams the weights (γ folded into W, see weights.py).
  Gated MLPs read gate and up rows in the same program and apply silu(g)·u (one kernel for the whole block).
  It can also gather *input columns* by unit (`ksel`: the o-projection reads only the kept heads' 2·d-byte
  segments of each row of W_o) and add into the fp32 residual stream (`accumulate`): every program owns its
  output rows, so no atomics.
- `_col_kernel`: gather-GEMV over kept *columns* of down/fc2 (stored transposed, so kept rows of W^T), split over
  the kept rows with fp32 atomic adds straight into the residual stream (residual add fused).
- `_attn_kernel`: decode attention for the kept heads, RoPE and the KV-cache write fused, split over the cache
  length (flash-decoding) with the merge done by the last split of each head in the same launch.
- `_select_kernel` / `_compact_kernel`: exact top-k per layer by bisection on the float bit pattern (no sort),
  union over the batch, and index compaction, all on the device (graph-capturable, fixed grids).
- `_thr_col_kernel`: input-sparse GEMV over W^T (TEAL, WINA, CATS' down) with the threshold test fused: per K-tile
  the input is tested channel by channel and only the W^T rows some sequence keeps are loaded (masked loads);
  `_kth_kernel`: WINA's per-token top-k as a threshold (the k-th largest score, by the same bisection).
Every loop has a static trip count and every data-dependent bound is a mask, so the kernels also run under
TRITON_INTERPRET=1 on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sel import Sel
from .tiles import DEFAULT_TILES, Tiles, attn_tiling, col_tiling, row_tiling, thr_col_tiling
from .weights import Linear

_NORM = {"none": 0, "rms": 1, "ln": 2, "minmax": 3}
_ACT = {"none": 0, "relu": 1, "silu_gate": 2, "gate_thresh": 3}
_IN = {"plain": 0, "rms": 1, "gated": 2, "cats": 3}
_SEL = {"dense": 0, "units": 1, "index": 2}

# Tile choices: an immutable `Tiles` value (pipeline/bench/tiles.py) passed to every launcher; the default is the
# H200 sweep picks.


@triton.jit
def _row_cols(k0, K, kcols, kidx_ptr, KSEL: tl.constexpr, GK: tl.constexpr, BK: tl.constexpr):
    """Input columns of one K-tile and their mask. With KSEL the K axis runs over the kept units' columns only,
    packed: compact column j is column kidx[j // GK]·GK + j % GK (tiles past the kept ones are all masked). Then
    the columns are 2-D [units, GK], so that each unit's GK columns are provably contiguous (vector loads)."""
    if KSEL:
        UPT: tl.constexpr = BK // GK
        offs_u = k0 // GK + tl.arange(0, UPT)
        umask = offs_u < kcols // GK
        unit = tl.load(kidx_ptr + offs_u, mask=umask, other=0)
        cols = unit[:, None] * GK + tl.arange(0, GK)[None, :]
        cmask = umask[:, None] & (tl.arange(0, GK) < GK)[None, :]
    else:
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
    return cols, cmask


@triton.jit
def _row_load(ptrs, cols, cmask, rmask, KSEL: tl.constexpr, BK: tl.constexpr):
    """[rows, BK] tile at `cols` of every row pointer in `ptrs` ([rows, 1])."""
    if KSEL:
        t = tl.load(ptrs[:, :, None] + cols[None, :, :], mask=rmask[:, None, None] & cmask[None, :, :], other=0.0)
        return tl.reshape(t, [t.shape[0], BK])
    else:
        return tl.load(ptrs + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _grid_dep(PDL: tl.constexpr):
    """Programmatic dependent launch: everything before this call may only read what kernels before the previous
    one wrote (weights, the plan); afterwards the previous kernel is complete, and the next one may launch (it can
    then stream its own weights while this one runs)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _row_kernel(
    x_ptr,
    stride_xb,
    B,
    K,
    w_ptr,
    b_ptr,
    c_ptr,
    w2_ptr,
    b2_ptr,
    c2_ptr,
    out_ptr,
    stride_ob,
    N,
    mask_ptr,
    idx_ptr,
    count_ptr,
    kidx_ptr,
    kcount_ptr,
    g_ptr,
    stride_gb,
    gthr_ptr,
    eps,
    G: tl.constexpr,
    SEL: tl.constexpr,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KSEL: tl.constexpr,
    GK: tl.constexpr,
    ACCUM: tl.constexpr,
    PDL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    r0 = pid * BN
    offs_n = r0 + tl.arange(0, BN)
    if SEL == 1:
        keep = tl.load(mask_ptr + r0 // G)
        if keep == 0:
            return
        nmask = offs_n < N
        rows = offs_n
    elif SEL == 2:
        cnt = tl.load(count_ptr)
        if r0 >= cnt:
            return
        nmask = offs_n < cnt
        rows = tl.load(idx_ptr + offs_n, mask=nmask, other=0)
    else:
        nmask = offs_n < N
        rows = offs_n
    rows64 = rows.to(tl.int64)
    offs_b = tl.arange(0, BM)
    bmask = offs_b < B
    if ACT == 3:  # CATS: a row is read iff any sequence keeps its neuron, |silu(gate)| > t (gate from the dense
        # gate kernel, which must be complete: wait first); each sequence keeps only its own neurons
        _grid_dep(PDL)
        gv = tl.load(
            g_ptr + offs_b[:, None] * stride_gb + rows64[None, :], mask=bmask[:, None] & nmask[None, :], other=0.0
        ).to(tl.float32)
        ga = gv / (1.0 + tl.exp(-gv))
        gkeep = (tl.abs(ga) > tl.load(gthr_ptr)) & bmask[:, None] & nmask[None, :]
        nmask = tl.max(gkeep.to(tl.int32), axis=0) > 0
        if tl.sum(nmask.to(tl.int32), axis=0) == 0:
            return
    acc = tl.zeros([BM, BN], tl.float32)
    acc2 = tl.zeros([BM, BN], tl.float32)
    part = tl.zeros([BN, BK], tl.float32)  # batch 1: elementwise partial products, reduced once at the end
    part2 = tl.zeros([BN, BK], tl.float32)
    s1 = tl.zeros([BM], tl.float32)
    s2 = tl.zeros([BM], tl.float32)
    mn = tl.full([BM], float("inf"), tl.float32)
    mx = tl.full([BM], float("-inf"), tl.float32)
    w_ptrs = w_ptr + rows64[:, None] * K
    w2_ptrs = w2_ptr + rows64[:, None] * K
    x_ptrs = x_ptr + offs_b[:, None] * stride_xb
    kcols = K
    if KSEL:
        kcols = tl.load(kcount_ptr) * GK
    # software pipelining by hand: the next tile's loads are issued before the current tile is used; the first
    # weight tile is requested before waiting on the previous kernel (PDL)
    cols, cmask = _row_cols(0, K, kcols, kidx_ptr, KSEL, GK, BK)
    w = _row_load(w_ptrs, cols, cmask, nmask, KSEL, BK)
    if ACT == 2:
        w2 = _row_load(w2_ptrs, cols, cmask, nmask, KSEL, BK)
    else:
        w2 = w
    if ACT != 3:
        _grid_dep(PDL)
    x = _row_load(x_ptrs, cols, cmask, bmask, KSEL, BK).to(tl.float32)
    kmask = tl.reshape(cmask, [BK])
    for k0 in range(BK, K + BK, BK):
        cols_n, cmask_n = _row_cols(k0, K, kcols, kidx_ptr, KSEL, GK, BK)
        w_n = _row_load(w_ptrs, cols_n, cmask_n, nmask, KSEL, BK)
        if ACT == 2:
            w2_n = _row_load(w2_ptrs, cols_n, cmask_n, nmask, KSEL, BK)
        else:
            w2_n = w_n
        x_n = _row_load(x_ptrs, cols_n, cmask_n, bmask, KSEL, BK).to(tl.float32)
        kmask_n = tl.reshape(cmask_n, [BK])
        if BM == 1:
            part += w.to(tl.float32) * x
            if ACT == 2:
                part2 += w2.to(tl.float32) * x
        else:
            xb = x.to(w.dtype)
            acc = tl.dot(xb, tl.trans(w), acc)
            if ACT == 2:
                acc2 = tl.dot(xb, tl.trans(w2), acc2)
        if NORM == 1 or NORM == 2:
            s1 += tl.sum(x, axis=1)
            s2 += tl.sum(x * x, axis=1)
        if NORM == 3:
            mn = tl.minimum(mn, tl.min(tl.where(kmask[None, :], x, float("inf")), axis=1))
            mx = tl.maximum(mx, tl.max(tl.where(kmask[None, :], x, float("-inf")), axis=1))
        x, w, w2, kmask = x_n, w_n, w2_n, kmask_n
    if BM == 1:
        acc = tl.sum(part, axis=1)[None, :]
        if ACT == 2:
            acc2 = tl.sum(part2, axis=1)[None, :]
    # epilogue: normalisation, bias, activation
    if NORM == 1:
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
        acc = acc * rstd[:, None]
        acc2 = acc2 * rstd[:, None]
    if NORM == 2:
        mu = s1 / K
        rstd = 1.0 / tl.sqrt(s2 / K - mu * mu + eps)
        c = tl.load(c_ptr + rows64, mask=nmask, other=0.0)
        acc = (acc - mu[:, None] * c[None, :]) * rstd[:, None]
        if ACT == 2:
            c2 = tl.load(c2_ptr + rows64, mask=nmask, other=0.0)
            acc2 = (acc2 - mu[:, None] * c2[None, :]) * rstd[:, None]
    if NORM == 3:
        sc = 1.0 / (mx - mn + eps)
        c = tl.load(c_ptr + rows64, mask=nmask, other=0.0)
        acc = (acc - mn[:, None] * c[None, :]) * sc[:, None]
        if ACT == 2:
            c2 = tl.load(c2_ptr + rows64, mask=nmask, other=0.0)
            acc2 = (acc2 - mn[:, None] * c2[None, :]) * sc[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows64, mask=nmask, other=0.0)[None, :]
        if ACT == 2:
            acc2 += tl.load(b2_ptr + rows64, mask=nmask, other=0.0)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    if ACT == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    if ACT == 3:
        acc = tl.where(gkeep, ga * acc, 0.0)
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    omask = bmask[:, None] & nmask[None, :]
    if ACCUM:  # residual add: each program owns its output rows, so a plain read-modify-write suffices
        acc += tl.load(out_ptrs, mask=omask, other=0.0)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _col_kernel(
    h_ptr,
    stride_hb,
    B,
    w_ptr,
    b_ptr,
    out_ptr,
    stride_ob,
    N,
    R,
    mask_ptr,
    idx_ptr,
    count_ptr,
    G: tl.constexpr,
    SEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    KPP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_b = tl.arange(0, BM)
    bmask = offs_b < B
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    omask = bmask[:, None] & nmask[None, :]
    if HAS_BIAS and pid_k == 0:
        _grid_dep(PDL)
        bias = tl.load(b_ptr + offs_n, mask=nmask, other=0.0)
        tl.atomic_add(out_ptrs, tl.zeros([BM, BN], tl.float32) + bias[None, :], mask=omask, sem="relaxed")
    k_start = pid_k * KPP
    lim = R
    if SEL == 1:
        keep = tl.load(mask_ptr + k_start // G)
        if keep == 0:
            return
    if SEL == 2:
        lim = tl.load(count_ptr)
        if k_start >= lim:
            return
    acc = tl.zeros([BM, BN], tl.float32)
    part = tl.zeros([BK, BN], tl.float32)
    # software pipelining by hand: tile i+1 (and its row indices) are loaded before tile i is used; the first
    # weight tile is requested before waiting on the previous kernel (PDL)
    offs_k = k_start + tl.arange(0, BK)
    kmask = offs_k < lim
    if SEL == 2:
        rows = tl.load(idx_ptr + offs_k, mask=kmask, other=0)
    else:
        rows = offs_k
    w = tl.load(
        w_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0
    )
    _grid_dep(PDL)
    h = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
    for k0 in range(BK, KPP + BK, BK):
        offs_kn = k_start + k0 + tl.arange(0, BK)
        kmask_n = (offs_kn < lim) & (k0 < KPP)
        if SEL == 2:
            rows_n = tl.load(idx_ptr + offs_kn, mask=kmask_n, other=0)
        else:
            rows_n = offs_kn
        w_n = tl.load(
            w_ptr + rows_n.to(tl.int64)[:, None] * N + offs_n[None, :],
            mask=kmask_n[:, None] & nmask[None, :],
            other=0.0,
        )
        h_n = tl.load(
            h_ptr + offs_b[:, None] * stride_hb + offs_kn[None, :], mask=bmask[:, None] & kmask_n[None, :], other=0.0
        )
        if BM == 1:
            part += w.to(tl.float32) * tl.reshape(h.to(tl.float32), [BK, 1])
        else:
            acc = tl.dot(h.to(w.dtype), w, acc)
        w, h = w_n, h_n
    if BM == 1:
        acc = tl.sum(part, axis=0)[None, :]
    tl.atomic_add(out_ptrs, acc, mask=omask, sem="relaxed")


@triton.jit
def _attn_kernel(
    qkv_ptr,
    stride_qb,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    mask_ptr,
    out_ptr,
    stride_ob,
    cos_ptr,
    sin_ptr,
    part_acc_ptr,
    part_ml_ptr,
    count_ptr,
    H,
    KVH,
    T,
    scale,
    GS: tl.constexpr,
    D: tl.constexpr,
    ROPE: tl.constexpr,
    BT: tl.constexpr,
    NT: tl.constexpr,
    S: tl.constexpr,
    SB: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (b, h, s) attends over cache positions [s·NT·BT, (s+1)·NT·BT) (split-T, flash-decoding); split 0
    also handles the new token (RoPE, cache write). With S > 1 every split leaves (m, l, acc) in a workspace and
    the last split to finish (an acq_rel counter per (b, h), reset by that split) merges them: one launch."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    keep = tl.load(mask_ptr + h)
    if keep == 0:
        return
    g = h // GS
    pos = tl.load(pos_ptr)
    offs_d = tl.arange(0, D)
    cbase = (b.to(tl.int64) * KVH + g) * T * D
    # cache tiles are read up to T, not up to pos: the loads need not wait for pos (positions >= pos are masked
    # below; the cache is allocated in full). They, pos and the RoPE tables were written by earlier steps, so the
    # first tile is requested before waiting on the previous kernel (PDL); only the new token's q/k/v need the wait.
    offs_t = sp * NT * BT + tl.arange(0, BT)
    kt = tl.load(kc_ptr + cbase + offs_t[:, None] * D + offs_d[None, :], mask=(offs_t < T)[:, None], other=0.0)
    vt = tl.load(vc_ptr + cbase + offs_t[:, None] * D + offs_d[None, :], mask=(offs_t < T)[:, None], other=0.0)
    if ROPE:
        HALF: tl.constexpr = D // 2
        partner = (offs_d + HALF) % D
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        fi = offs_d % HALF
        cs = tl.load(cos_ptr + pos * HALF + fi)
        sn = tl.load(sin_ptr + pos * HALF + fi)
    _grid_dep(PDL)
    base = qkv_ptr + b.to(tl.int64) * stride_qb
    q = tl.load(base + h * D + offs_d).to(tl.float32)
    if ROPE:
        qp = tl.load(base + h * D + partner).to(tl.float32)
        q = q * cs + sign * qp * sn
    q = q * scale
    if sp == 0:  # the new token: its k/v go to the cache and start the running softmax
        k = tl.load(base + (H + g) * D + offs_d).to(tl.float32)
        v = tl.load(base + (H + KVH + g) * D + offs_d).to(tl.float32)
        if ROPE:
            kp = tl.load(base + (H + g) * D + partner).to(tl.float32)
            k = k * cs + sign * kp * sn
        tl.store(kc_ptr + cbase + pos * D + offs_d, k.to(kc_ptr.dtype.element_ty))
        tl.store(vc_ptr + cbase + pos * D + offs_d, v.to(vc_ptr.dtype.element_ty))
        m = tl.sum(q * k, axis=0)
        l_sum = m * 0.0 + 1.0
        acc = v
    else:
        m = tl.full([], float("-inf"), tl.float32)
        l_sum = tl.zeros([], tl.float32)
        acc = tl.zeros([D], tl.float32)
    for i in range(NT):  # hand-pipelined: tile i+1 is requested before tile i is used
        offs_tn = offs_t + BT
        nmask = (offs_tn < T) & (i + 1 < NT)
        kt_n = tl.load(kc_ptr + cbase + offs_tn[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
        vt_n = tl.load(vc_ptr + cbase + offs_tn[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
        tmask = offs_t < pos
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(tmask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an empty split keeps m = -inf, l = 0
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref)
        acc = acc * alpha + tl.sum(p[:, None] * tl.where(tmask[:, None], vt.to(tl.float32), 0.0), axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
        kt, vt, offs_t = kt_n, vt_n, offs_tn
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * D + offs_d
    if S == 1:
        tl.store(out_ptrs, (acc / l_sum).to(out_ptr.dtype.element_ty))
    else:
        bh = b * H + h
        slot = bh * S + sp
        tl.store(part_acc_ptr + slot * D + offs_d, acc)
        tl.store(part_ml_ptr + slot * 2, m)
        tl.store(part_ml_ptr + slot * 2 + 1, l_sum)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
        if done == S - 1:  # the last split merges all of them
            offs_s = tl.arange(0, SB)
            smask = offs_s < S
            ms = tl.load(part_ml_ptr + (bh * S + offs_s) * 2, mask=smask, other=float("-inf"), volatile=True)
            ls = tl.load(part_ml_ptr + (bh * S + offs_s) * 2 + 1, mask=smask, other=0.0, volatile=True)
            accs = tl.load(
                part_acc_ptr + (bh * S + offs_s)[:, None] * D + offs_d[None, :],
                mask=smask[:, None],
                other=0.0,
                volatile=True,
            )
            wgt = tl.exp(ms - tl.max(ms, axis=0))  # split 0 always holds the new token: the max is finite
            o = tl.sum(wgt[:, None] * accs, axis=0) / tl.sum(wgt * ls, axis=0)
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(count_ptr + bh, 0, sem="relaxed")  # ready for the next launch


@triton.jit
def _write_selection(
    sel,
    offs,
    valid,
    n,
    out_row,
    mask_ptr,
    stride_mr,
    idx_ptr,
    stride_ir,
    count_ptr,
    KVH,
    GS: tl.constexpr,
    MODE: tl.constexpr,
    KV_BLOCK: tl.constexpr,
):
    """Heads (MODE 0): the [head keep | kv keep | kv keep] mask row and the ascending kept-head list + count.
    Neurons (MODE 1): the ascending kept-neuron list + count."""
    sel_i = sel.to(tl.int32)
    if MODE == 0:
        row = mask_ptr + out_row * stride_mr
        tl.store(row + offs, sel_i, mask=valid)
        g = tl.arange(0, KV_BLOCK)
        member = ((offs[None, :] // GS) == g[:, None]) & valid[None, :]
        kv = tl.max(tl.where(member, sel_i[None, :], 0), axis=1)
        tl.store(row + n + g, kv, mask=g < KVH)
        tl.store(row + n + KVH + g, kv, mask=g < KVH)
    dest = tl.cumsum(sel_i, axis=0) - 1
    tl.store(idx_ptr + out_row * stride_ir + dest, offs, mask=sel & valid)
    tl.store(count_ptr + out_row, tl.sum(sel_i, axis=0))


@triton.jit
def _kth_key(s, valid, k, BLOCK: tl.constexpr):
    """The k-th largest of the valid entries of s (fp32) as an order-preserving int32 key, by bisection (one
    block-wide count per bit); also returns the keys."""
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order == float order
    key = tl.where(valid, key, tl.full([BLOCK], -2147483648, tl.int32))
    lo = tl.full([], -2147483648, tl.int64)  # count(key >= lo) >= k
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        c = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ge = c >= k
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid)
    return lo.to(tl.int32), key


@triton.jit
def _topk_mask(s, valid, k, BLOCK: tl.constexpr):
    """Exactly k of the valid entries of s (fp32): the k largest, ties to the lowest index. The k-th largest key
    (an order-preserving integer view of the float) is found by bisection, one block-wide count per bit. (A 4-way
    search, 16 passes of three counts, and a radix select, four 256-bin histograms, were both slower on the H200.)"""
    thr, key = _kth_key(s, valid, k, BLOCK)
    gt = key > thr
    eq = (key == thr) & valid
    rank = tl.cumsum(eq.to(tl.int32), axis=0)
    return gt | (eq & (rank <= k - tl.sum(gt.to(tl.int32), axis=0)))


@triton.jit
def _select_kernel(
    s_ptr,
    stride_sb,
    stride_sr,
    n,
    k,
    mask_ptr,
    stride_mr,
    idx_ptr,
    stride_ir,
    count_ptr,
    union_ptr,
    out_row0,
    KVH,
    GS: tl.constexpr,
    MODE: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    s = tl.load(s_ptr + b.to(tl.int64) * stride_sb + r * stride_sr + offs, mask=valid, other=0.0).to(tl.float32)
    sel = _topk_mask(s, valid, k, BLOCK)
    if SINGLE:
        _write_selection(
            sel,
            offs,
            valid,
            n,
            out_row0 + r,
            mask_ptr,
            stride_mr,
            idx_ptr,
            stride_ir,
            count_ptr,
            KVH,
            GS,
            MODE,
            KV_BLOCK,
        )
    else:
        tl.atomic_or(union_ptr + r * n + offs, sel.to(tl.int32), mask=valid & sel, sem="relaxed")


@triton.jit
def _compact_kernel(
    union_ptr,
    n,
    mask_ptr,
    stride_mr,
    idx_ptr,
    stride_ir,
    count_ptr,
    out_row0,
    KVH,
    GS: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    u = tl.load(union_ptr + r * n + offs, mask=valid, other=0)
    tl.store(union_ptr + r * n + offs, tl.zeros([BLOCK], tl.int32), mask=valid)  # ready for the next step
    _write_selection(
        u != 0,
        offs,
        valid,
        n,
        out_row0 + r,
        mask_ptr,
        stride_mr,
        idx_ptr,
        stride_ir,
        count_ptr,
        KVH,
        GS,
        MODE,
        KV_BLOCK,
    )


@triton.jit
def _thr_tile(
    x_ptr,
    stride_xb,
    x2_ptr,
    stride_x2b,
    K,
    offs_b,
    bmask,
    k0,
    live,
    c_row,
    thr,
    scale,
    IN: tl.constexpr,
    GE: tl.constexpr,
    NORM_THR: tl.constexpr,
    BK: tl.constexpr,
):
    """One K-tile of a thresholded input: the values each sequence keeps ([BM, BK], dropped ones 0), which rows
    any sequence keeps ([BK]), and their channels."""
    offs_k = k0 + tl.arange(0, BK)
    kmask = (offs_k < K) & live
    m = bmask[:, None] & kmask[None, :]
    xp = x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :]
    x = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    if IN == 2:  # gated MLP: x holds [gate | up] (fp32 sums of the column kernel), the input is silu(g)·u
        u = tl.load(xp + K, mask=m, other=0.0).to(tl.float32)
        a = x / (1.0 + tl.exp(-x)) * u
    elif IN == 3:  # CATS: the criterion is silu(gate), the value comes from x2
        a = x / (1.0 + tl.exp(-x))
    else:
        a = x
    score = tl.abs(a) * tl.load(c_row + offs_k, mask=kmask, other=0.0)[None, :]
    if NORM_THR:
        score = score * scale[:, None]
    if GE:
        keep = (score >= thr[:, None]) & m
    else:
        keep = (score > thr[:, None]) & m
    if IN == 3:
        v = tl.load(x2_ptr + offs_b[:, None] * stride_x2b + offs_k[None, :], mask=keep, other=0.0).to(tl.float32)
    elif IN == 1:
        v = x * scale[:, None]
    else:
        v = a
    v = tl.where(keep, v, 0.0)
    row = tl.max(keep.to(tl.int32), axis=0) > 0
    return v, row, offs_k


@triton.jit
def _thr_col_kernel(
    x_ptr,
    stride_xb,
    x2_ptr,
    stride_x2b,
    B,
    K,
    w_ptr,
    b_ptr,
    out_ptr,
    stride_ob,
    N,
    c_ptr,
    stride_cs,
    thr_ptr,
    stride_ts,
    stride_tb,
    cnt_ptr,
    S1,
    S2,
    eps,
    IN: tl.constexpr,
    GE: tl.constexpr,
    NORM_THR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    KPP: tl.constexpr,
    KS: tl.constexpr,
):
    """Input-sparse GEMV with the selection fused: program (n, k) owns output columns [n·BN, n·BN+BN) and input
    channels [k·KPP, k·KPP+KPP) of W^T [K, N]. Per K-tile it loads the input, tests each channel of each
    sequence against its segment's threshold, and loads only the W^T rows (channels) some sequence keeps (masked
    loads: a dropped channel's row is never fetched). fp32 atomic adds into `out`. The first program of each
    output segment adds the rows it read to cnt[segment]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    seg = (n0 >= S1).to(tl.int32) + (n0 >= S2).to(tl.int32)
    first = (n0 == 0) | (n0 == S1) | (n0 == S2)
    offs_n = n0 + tl.arange(0, BN)
    nmask = offs_n < N
    offs_b = tl.arange(0, BM)
    bmask = offs_b < B
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    omask = bmask[:, None] & nmask[None, :]
    c_row = c_ptr + seg * stride_cs
    thr = tl.load(thr_ptr + seg * stride_ts + offs_b * stride_tb, mask=bmask, other=float("inf"))
    _grid_dep(PDL)  # which weight rows to read depends on the input: nothing to prefetch
    if HAS_BIAS and pid_k == 0:
        bias = tl.load(b_ptr + offs_n, mask=nmask, other=0.0)
        tl.atomic_add(out_ptrs, tl.zeros([BM, BN], tl.float32) + bias[None, :], mask=omask, sem="relaxed")
    scale = tl.full([BM], 1.0, tl.float32)
    if IN == 1:  # RMSNorm statistics over the whole input (gain folded into W^T)
        s2 = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, KS):
            offs = k0 + tl.arange(0, KS)
            xs = tl.load(
                x_ptr + offs_b[:, None] * stride_xb + offs[None, :],
                mask=bmask[:, None] & (offs < K)[None, :],
                other=0.0,
            ).to(tl.float32)
            s2 += tl.sum(xs * xs, axis=1)
        scale = 1.0 / tl.sqrt(s2 / K + eps)
    k_start = pid_k * KPP
    acc = tl.zeros([BM, BN], tl.float32)
    part = tl.zeros([BK, BN], tl.float32)
    nk = tl.zeros([], tl.int32)
    # hand-pipelined: tile i+1's input, test and kept rows are loaded before tile i is used
    v, row, offs_k = _thr_tile(
        x_ptr, stride_xb, x2_ptr, stride_x2b, K, offs_b, bmask, k_start, True, c_row, thr, scale, IN, GE, NORM_THR, BK
    )
    w = tl.load(
        w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], mask=row[:, None] & nmask[None, :], other=0.0
    )
    for k0 in range(BK, KPP + BK, BK):
        v_n, row_n, offs_kn = _thr_tile(
            x_ptr,
            stride_xb,
            x2_ptr,
            stride_x2b,
            K,
            offs_b,
            bmask,
            k_start + k0,
            k0 < KPP,
            c_row,
            thr,
            scale,
            IN,
            GE,
            NORM_THR,
            BK,
        )
        w_n = tl.load(
            w_ptr + offs_kn.to(tl.int64)[:, None] * N + offs_n[None, :],
            mask=row_n[:, None] & nmask[None, :],
            other=0.0,
        )
        if BM == 1:
            part += w.to(tl.float32) * tl.reshape(v, [BK, 1])
        else:
            acc = tl.dot(v.to(w.dtype), w, acc)
        nk += tl.sum(row.to(tl.int32), axis=0)
        v, w, row = v_n, w_n, row_n
    if BM == 1:
        acc = tl.sum(part, axis=0)[None, :]
    tl.atomic_add(out_ptrs, acc, mask=omask & (nk > 0), sem="relaxed")
    tl.atomic_add(cnt_ptr + seg, nk, mask=first, sem="relaxed")


@triton.jit
def _kth_kernel(
    x_ptr,
    stride_xb,
    K,
    c_ptr,
    stride_cs,
    k,
    thr_ptr,
    stride_ts,
    stride_tb,
    IN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """WINA's per-token top-k as a threshold: program (s, b) writes the k-th largest |a_i|·c[s, i] of sequence b
    (a: the raw input, or silu(g)·u for a gated MLP's down input, computed exactly as `_thr_tile` does)."""
    sg = tl.program_id(0)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    valid = offs < K
    xp = x_ptr + b.to(tl.int64) * stride_xb + offs
    x = tl.load(xp, mask=valid, other=0.0).to(tl.float32)
    if IN == 2:
        u = tl.load(xp + K, mask=valid, other=0.0).to(tl.float32)
        a = x / (1.0 + tl.exp(-x)) * u
    else:
        a = x
    score = tl.abs(a) * tl.load(c_ptr + sg * stride_cs + offs, mask=valid, other=0.0)
    key, _keys = _kth_key(score, valid, k, BLOCK)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    tl.store(thr_ptr + sg * stride_ts + b * stride_tb, bits.to(tl.float32, bitcast=True))


# ----------------------------------------------------------------------------------------------- wrappers


def _pdl(requested: bool, t: torch.Tensor, tiles: Tiles) -> bool:
    """Programmatic dependent launch where asked for, enabled in the tiles and supported (CUDA, sm_90+)."""
    return bool(requested and tiles.pdl and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9)


def _sel_args(sel: Sel, anchor: torch.Tensor):
    return (
        sel.mask if sel.mask is not None else anchor,
        sel.idx if sel.idx is not None else anchor,
        sel.count if sel.count is not None else anchor,
    )


def row_gemv(
    x: torch.Tensor,
    lin: Linear,
    out: torch.Tensor,
    *,
    lin2: Linear | None = None,
    norm: str = "none",
    eps: float = 1e-5,
    act: str = "none",
    sel: Sel,
    ksel: Sel | None = None,
    accumulate: bool = False,
    tile: str = "row",
    pdl: bool = False,
    tiles: Tiles = DEFAULT_TILES,
    gate: torch.Tensor | None = None,
    gate_thr: torch.Tensor | None = None,
) -> None:
    """`act="gate_thresh"` (CATS' up projection): `gate` [B, N] fp32 holds the dense gate; only rows with
    |silu(gate)| > gate_thr[0] for some sequence are read, out = silu(gate)·(W·x) where that sequence keeps the
    row, 0 where another sequence keeps it, unwritten where none does."""
    B, K = x.shape
    N = lin.w.shape[0]
    assert x.stride(1) == 1 and out.stride(1) == 1 and lin.w.is_contiguous() and B <= 16
    if ksel is not None:
        assert ksel.kind == "unit_index" and norm == "none" and act != "silu_gate", (
            "input-column selection: a unit list, no fused norm or gate"
        )
    if accumulate:
        assert sel.kind == "dense" and out.dtype == torch.float32, "accumulate: dense rows into an fp32 output"
    if act == "gate_thresh":
        assert sel.kind == "dense" and gate is not None and gate_thr is not None and gate.stride(1) == 1
    has_bias = lin.bias is not None
    if act == "silu_gate":
        assert (lin2.bias is not None) == has_bias and lin2.w.shape == lin.w.shape
    w2 = lin2 if lin2 is not None else lin
    mask, idx, count = _sel_args(sel, x)
    c = lin.rowsum if lin.rowsum is not None else x
    b = lin.bias if has_bias else x
    t = row_tiling(
        tiles,
        tile,
        batch=B,
        k=K,
        sel_kind=sel.kind,
        sel_group=sel.group,
        ksel_group=ksel.group if ksel is not None else None,
    )
    n_rows = min(N, sel.bound) if sel.kind == "index" and sel.bound else N  # no programs for rows never kept
    grid = (triton.cdiv(n_rows, t.BN),)
    _row_kernel[grid](
        x,
        x.stride(0),
        B,
        K,
        lin.w,
        b,
        c,
        w2.w,
        w2.bias if has_bias else x,
        w2.rowsum if w2.rowsum is not None else x,
        out,
        out.stride(0),
        N,
        mask,
        idx,
        count,
        ksel.idx if ksel is not None else x,
        ksel.count if ksel is not None else x,
        gate if gate is not None else x,
        gate.stride(0) if gate is not None else 0,
        gate_thr if gate_thr is not None else x,
        eps,
        G=sel.group,
        SEL=_SEL[sel.kind],
        NORM=_NORM[norm],
        ACT=_ACT[act],
        HAS_BIAS=has_bias,
        KSEL=ksel is not None,
        GK=ksel.group if ksel is not None else 1,
        ACCUM=accumulate,
        PDL=_pdl(pdl, x, tiles),
        BM=1 if B == 1 else 16,
        BN=t.BN,
        BK=t.BK,
        num_warps=t.warps,
        launch_pdl=_pdl(pdl, x, tiles),
    )


def col_gemv_add(
    h: torch.Tensor, lin: Linear, out: torch.Tensor, *, sel: Sel, pdl: bool = False, tiles: Tiles = DEFAULT_TILES
) -> None:
    B = h.shape[0]
    R, N = lin.w.shape
    assert h.stride(1) == 1 and out.stride(1) == 1 and out.dtype == torch.float32 and lin.w.is_contiguous()
    t = col_tiling(tiles, batch=B, n=N, sel_kind=sel.kind, sel_group=sel.group, sel_expect=sel.expect)
    mask, idx, count = _sel_args(sel, h)
    n_rows = min(R, sel.bound) if sel.kind == "index" and sel.bound else R
    grid = (triton.cdiv(N, t.BN), triton.cdiv(n_rows, t.KPP))
    _col_kernel[grid](
        h,
        h.stride(0),
        B,
        lin.w,
        lin.bias if lin.bias is not None else out,
        out,
        out.stride(0),
        N,
        R,
        mask,
        idx,
        count,
        G=sel.group,
        SEL=_SEL[sel.kind],
        HAS_BIAS=lin.bias is not None,
        PDL=_pdl(pdl, h, tiles),
        BM=1 if B == 1 else 16,
        BN=t.BN,
        BK=t.BK,
        KPP=t.KPP,
        num_warps=t.warps,
        launch_pdl=_pdl(pdl, h, tiles),
    )


def rope_tables(max_pos, head_dim, theta, device):
    from .kernels_ref import rope_tables as _rt

    return _rt(max_pos, head_dim, theta, device)


def attention_workspace(
    batch: int, heads: int, max_len: int, head_dim: int, device, *, tiles: Tiles = DEFAULT_TILES
) -> dict:
    """Buffers of the split-T attention (tiled by `tiles.attn`): per-split partials and a zeroed completion counter
    per (b, h)."""
    t = attn_tiling(tiles, max_len)
    splits = t.splits
    return {
        "BT": t.BT,
        "NT": t.NT,
        "splits": splits,
        "warps": t.warps,
        "max_len": max_len,
        "acc": torch.zeros(batch * heads * splits * head_dim, dtype=torch.float32, device=device),
        "ml": torch.zeros(batch * heads * splits * 2, dtype=torch.float32, device=device),
        "count": torch.zeros(batch * heads, dtype=torch.int32, device=device),
    }


def attention_decode(
    qkv,
    k_cache,
    v_cache,
    pos,
    head_mask,
    out,
    *,
    heads,
    kv_heads,
    head_dim,
    rope,
    work: dict,
    pdl: bool = False,
    tiles: Tiles = DEFAULT_TILES,
) -> None:
    """`work` from `attention_workspace` (its tiling; one split when BT·NT covers the cache); `tiles.pdl` gates
    programmatic dependent launch."""
    B = qkv.shape[0]
    T = k_cache.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert work["max_len"] == T and work["count"].numel() >= B * heads
    cos, sin = rope if rope is not None else (qkv, qkv)
    bt, nt, splits, warps = work["BT"], work["NT"], work["splits"], work["warps"]
    acc, ml, count = work["acc"], work["ml"], work["count"]
    _attn_kernel[(B, heads, splits)](
        qkv,
        qkv.stride(0),
        k_cache,
        v_cache,
        pos,
        head_mask,
        out,
        out.stride(0),
        cos,
        sin,
        acc,
        ml,
        count,
        heads,
        kv_heads,
        T,
        head_dim**-0.5,
        GS=heads // kv_heads,
        D=head_dim,
        ROPE=rope is not None,
        BT=bt,
        NT=nt,
        S=splits,
        SB=triton.next_power_of_2(splits),
        PDL=_pdl(pdl, qkv, tiles),
        num_warps=warps,
        launch_pdl=_pdl(pdl, qkv, tiles),
    )


def _select_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def _select(scores, k, mode, *, mask, idx, count, out_row0, kv_heads=1, union=None):
    B, R, n = scores.shape
    assert scores.stride(2) == 1
    block = triton.next_power_of_2(n)
    single = B == 1
    if not single:
        assert union is not None and union.numel() >= R * n and union.dtype == torch.int32
    gs = n // kv_heads if mode == 0 else 1
    kvb = triton.next_power_of_2(kv_heads) if mode == 0 else 1
    mask_t = mask if mask is not None else count
    stride_mr = mask_t.stride(0)
    stride_ir = idx.stride(0)
    _select_kernel[(R, B)](
        scores,
        scores.stride(0),
        scores.stride(1),
        n,
        k,
        mask_t,
        stride_mr,
        idx,
        stride_ir,
        count,
        union if union is not None else count,
        out_row0,
        kv_heads,
        GS=gs,
        MODE=mode,
        SINGLE=single,
        BLOCK=block,
        KV_BLOCK=kvb,
        num_warps=_select_warps(block),
    )
    if not single:
        _compact_kernel[(R,)](
            union,
            n,
            mask_t,
            stride_mr,
            idx,
            stride_ir,
            count,
            out_row0,
            kv_heads,
            GS=gs,
            MODE=mode,
            BLOCK=block,
            KV_BLOCK=kvb,
            num_warps=_select_warps(block),
        )


def select_heads(scores, k, qkv_mask, head_idx, head_count, *, out_row0, kv_heads, union=None) -> None:
    _select(
        scores, k, 0, mask=qkv_mask, idx=head_idx, count=head_count, out_row0=out_row0, kv_heads=kv_heads, union=union
    )


def select_neurons(scores, k, idx, count, *, out_row0, union=None) -> None:
    _select(scores, k, 1, mask=None, idx=idx, count=count, out_row0=out_row0, union=union)


def _segments(n: int, segs: tuple[int, ...]) -> tuple[int, int]:
    """Up to three output segments [0, S1), [S1, S2), [S2, n) as (S1, S2)."""
    assert len(segs) <= 2 and all(0 < b <= n for b in segs) and list(segs) == sorted(segs)
    b = list(segs) + [n] * (2 - len(segs))
    return b[0], b[1]


def thr_col_gemv(
    x: torch.Tensor,
    lin: Linear,
    out: torch.Tensor,
    *,
    mode: str,
    crit: torch.Tensor,
    thr: torch.Tensor,
    count: torch.Tensor,
    x2: torch.Tensor | None = None,
    ge: bool = False,
    norm_thr: bool = False,
    segs: tuple[int, ...] = (),
    eps: float = 1e-5,
    pdl: bool = False,
    tiles: Tiles = DEFAULT_TILES,
) -> None:
    """Input-sparse GEMV, selection fused: out[b] += Σ_{i kept by b} v_bi · W^T[i] (+ bias), W^T = `lin.w` [K, N].

    mode: the input v. "plain": x [B, K]; "rms": x·rstd(x) (RMSNorm, gain folded into W^T); "gated": x [B, 2K]
    fp32 = [gate | up], v = silu(g)·u; "cats": v = x2, the criterion on silu(x) (x: the dense gate).
    Channel i of sequence b is kept iff |a_bi|·crit[s, i] (·rstd_b with `norm_thr`) > thr[s, b] (≥ with `ge`),
    a = v (x for "rms", silu(x) for "cats"), s = the output segment of the column (`segs`: its boundaries, up to
    two; crit [S, K] and thr [S, B] may have stride 0). W^T row i is read iff some sequence keeps i; count[s] +=
    the rows read for segment s (int32 [S])."""
    B = x.shape[0]
    K, N = lin.w.shape
    assert x.stride(1) == 1 and out.stride(1) == 1 and out.dtype == torch.float32 and lin.w.is_contiguous()
    assert crit.stride(-1) == 1 and crit.shape[-1] == K and count.dtype == torch.int32
    if mode == "cats":
        assert x2 is not None and x2.stride(1) == 1
    s1, s2 = _segments(N, segs)
    t = thr_col_tiling(tiles, batch=B, n=N, segs=segs)
    grid = (triton.cdiv(N, t.BN), triton.cdiv(K, t.KPP))
    _thr_col_kernel[grid](
        x,
        x.stride(0),
        x2 if x2 is not None else x,
        x2.stride(0) if x2 is not None else 0,
        B,
        K,
        lin.w,
        lin.bias if lin.bias is not None else out,
        out,
        out.stride(0),
        N,
        crit,
        crit.stride(0) if crit.dim() == 2 else 0,
        thr,
        thr.stride(0),
        thr.stride(1),
        count,
        s1,
        s2,
        eps,
        IN=_IN[mode],
        GE=ge,
        NORM_THR=norm_thr,
        HAS_BIAS=lin.bias is not None,
        PDL=_pdl(pdl, x, tiles),
        BM=1 if B == 1 else 16,
        BN=t.BN,
        BK=t.BK,
        KPP=t.KPP,
        KS=min(1024, triton.next_power_of_2(K)),
        num_warps=t.warps,
        launch_pdl=_pdl(pdl, x, tiles),
    )


def kth_threshold(x: torch.Tensor, crit: torch.Tensor, k: int, thr: torch.Tensor, *, mode: str) -> None:
    """thr[s, b] = the k-th largest |a_bi|·crit[s, i] (a: x for "plain"/"rms" — the raw input: RMSNorm's positive
    scale does not change the order —, silu(g)·u of x = [g | u] for "gated"). One program per (s, b)."""
    B = x.shape[0]
    S, K = crit.shape
    assert mode in ("plain", "rms", "gated") and 1 <= k <= K and x.stride(1) == 1 and crit.stride(1) == 1
    block = triton.next_power_of_2(K)
    _kth_kernel[(S, B)](
        x,
        x.stride(0),
        K,
        crit,
        crit.stride(0),
        k,
        thr,
        thr.stride(0),
        thr.stride(1),
        IN=_IN[mode],
        BLOCK=block,
        num_warps=_select_warps(block),
    )
