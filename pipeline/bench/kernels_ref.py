"""Torch reference implementations of the engine's kernels (CPU smoke path and GPU test oracle).

Each function has the same signature and the same in-place semantics as its Triton twin in
`kernels_triton.py`; the engine calls whichever backend it was given.
"""

from __future__ import annotations

import torch

from .sel import Sel, rows_of
from .tiles import DEFAULT_TILES, Tiles
from .weights import Linear


def _stats(xf: torch.Tensor, norm: str, eps: float):
    if norm == "rms":
        return (None, torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + eps))
    if norm == "ln":
        mu = xf.mean(1, keepdim=True)
        var = xf.pow(2).mean(1, keepdim=True) - mu * mu
        return (mu, torch.rsqrt(var + eps))
    if norm == "minmax":
        mn, mx = xf.amin(1, keepdim=True), xf.amax(1, keepdim=True)
        return (mn, 1.0 / (mx - mn + eps))
    if norm == "none":
        return (None, None)
    raise ValueError(f"unknown norm {norm!r}")


def _finish(acc, lin: Linear, rows, norm, st):
    shift, scale = st
    if norm in ("ln", "minmax"):
        acc = acc - shift * lin.rowsum[rows][None, :]
    if scale is not None:
        acc = acc * scale
    if lin.bias is not None:
        acc = acc + lin.bias[rows][None, :]
    return acc


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
    """out[:, j] = act(norm(x) · W[row_j]) for the selected rows (see sel.py for the output layout).

    ksel: only the input columns of kept units count (the rest of x is treated as 0); accumulate: out += result.
    act="gate_thresh" (CATS' up rows): a = silu(gate[:, j]); row j is computed iff |a| > gate_thr for some
    sequence, out = a·(W[row_j]·norm(x)) where that sequence keeps it, else 0; rows no sequence keeps are not
    written. `tile`, `tiles` (the Triton tiling) and `pdl` (programmatic dependent launch) are ignored here."""
    xf = x.float()
    if ksel is not None:
        keep = torch.zeros(xf.shape[1], dtype=torch.bool, device=x.device)
        keep[rows_of(ksel, xf.shape[1], x.device)] = True
        xf = torch.where(keep[None, :], xf, torch.zeros((), dtype=xf.dtype, device=x.device))
    st = _stats(xf, norm, eps)
    rows = rows_of(sel, lin.w.shape[0], x.device)
    v = _finish(xf @ lin.w[rows].float().T, lin, rows, norm, st)
    if act == "relu":
        v = torch.relu(v)
    elif act == "silu_gate":
        v2 = _finish(xf @ lin2.w[rows].float().T, lin2, rows, norm, st)
        v = torch.nn.functional.silu(v) * v2
    elif act == "gate_thresh":
        a = torch.nn.functional.silu(gate[:, rows].float())
        keep = a.abs() > gate_thr.reshape(-1)[0]
        v = torch.where(keep, a * v, torch.zeros((), device=x.device))
        rk = keep.any(0)
        rows, v = rows[rk], v[:, rk]
    elif act != "none":
        raise ValueError(f"unknown act {act!r}")
    cols = torch.arange(rows.numel(), device=x.device) if sel.kind == "index" else rows
    if accumulate:
        out[:, cols] += v.to(out.dtype)
    else:
        out[:, cols] = v.to(out.dtype)


def col_gemv_add(
    h: torch.Tensor, lin: Linear, out: torch.Tensor, *, sel: Sel, pdl: bool = False, tiles: Tiles = DEFAULT_TILES
) -> None:
    """out += h_sel · W^T[rows] (+ bias), W^T stored [rows, N]; out is the fp32 residual stream (`pdl`, `tiles`
    ignored)."""
    rows = rows_of(sel, lin.w.shape[0], h.device)
    hcols = torch.arange(rows.numel(), device=h.device) if sel.kind == "index" else rows
    acc = h[:, hcols].float() @ lin.w[rows].float()
    if lin.bias is not None:
        acc = acc + lin.bias[None, :]
    out += acc


def rope_tables(max_pos: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = theta ** (-torch.arange(0, head_dim // 2, dtype=torch.float64, device=device) * 2.0 / head_dim)
    ang = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return torch.cos(ang).float().contiguous(), torch.sin(ang).float().contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the last dim; cos/sin: [..., d/2] broadcastable."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_workspace(
    batch: int, heads: int, max_len: int, head_dim: int, device, *, tiles: Tiles = DEFAULT_TILES
) -> None:
    """The reference attention needs no workspace (nor tiles)."""
    return None


def attention_decode(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    head_mask: torch.Tensor,
    out: torch.Tensor,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    work: None = None,
    pdl: bool = False,
    tiles: Tiles = DEFAULT_TILES,
) -> None:
    """One decode step of attention for the kept heads; writes the new k/v at `pos` for kept kv groups.

    qkv [B, (H+2KVH)·d]; caches [B, KVH, T, d]; out [B, H·d] (dropped heads are not written)."""
    H, KVH, d = heads, kv_heads, head_dim
    gs = H // KVH
    p = int(pos.reshape(-1)[0])
    B = qkv.shape[0]
    q = qkv[:, : H * d].float().view(B, H, d)
    k = qkv[:, H * d : (H + KVH) * d].float().view(B, KVH, d)
    v = qkv[:, (H + KVH) * d :].float().view(B, KVH, d)
    if rope is not None:
        cos, sin = rope[0][p], rope[1][p]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keep = head_mask[:H].to(torch.bool)
    kv_keep = keep.view(KVH, gs).any(1)
    for g in torch.nonzero(kv_keep).flatten().tolist():
        k_cache[:, g, p] = k[:, g].to(k_cache.dtype)
        v_cache[:, g, p] = v[:, g].to(v_cache.dtype)
    scale = d**-0.5
    for h in torch.nonzero(keep).flatten().tolist():
        g = h // gs
        kk = k_cache[:, g, : p + 1].float()
        vv = v_cache[:, g, : p + 1].float()
        s = torch.einsum("bd,btd->bt", q[:, h] * scale, kk)
        o = torch.einsum("bt,btd->bd", torch.softmax(s, -1), vv)
        out[:, h * d : (h + 1) * d] = o.to(out.dtype)


def _topk_union(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, n] -> bool [n]: the union over the batch of each row's top-k."""
    m = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    idx = torch.topk(scores.float(), k, dim=1).indices
    m[idx.flatten()] = True
    return m


def select_heads(
    scores: torch.Tensor,
    k: int,
    qkv_mask: torch.Tensor,
    head_idx: torch.Tensor,
    head_count: torch.Tensor,
    *,
    out_row0: int,
    kv_heads: int,
    union: torch.Tensor | None = None,
) -> None:
    """scores [B, R, H] -> qkv_mask rows out_row0…out_row0+R-1 = [head keep | kv keep | kv keep] (int32), and the
    ascending kept-head list + count of those rows."""
    _B, R, H = scores.shape
    for r in range(R):
        m = _topk_union(scores[:, r], k)
        kv = m.view(kv_heads, H // kv_heads).any(1)
        qkv_mask[out_row0 + r] = torch.cat([m, kv, kv]).to(qkv_mask.dtype)
        nz = torch.nonzero(m).flatten()
        head_idx[out_row0 + r, : nz.numel()] = nz.to(head_idx.dtype)
        head_count[out_row0 + r] = nz.numel()


def select_neurons(
    scores: torch.Tensor,
    k: int,
    idx: torch.Tensor,
    count: torch.Tensor,
    *,
    out_row0: int,
    union: torch.Tensor | None = None,
) -> None:
    """scores [B, R, F] -> idx[out_row0 + r, :count] = ascending kept neurons (union over the batch)."""
    _B, R, _F = scores.shape
    for r in range(R):
        nz = torch.nonzero(_topk_union(scores[:, r], k)).flatten()
        idx[out_row0 + r, : nz.numel()] = nz.to(idx.dtype)
        count[out_row0 + r] = nz.numel()


def _thr_input(x: torch.Tensor, x2: torch.Tensor | None, mode: str, K: int, eps: float):
    """(criterion source a, value v, per-sequence scale) of a thresholded input, as `_thr_tile` computes them."""
    xf = x.float()
    scale = torch.ones(x.shape[0], 1, device=x.device)
    if mode == "plain":
        return xf, xf, scale
    if mode == "rms":
        scale = torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + eps)
        return xf, xf * scale, scale
    if mode == "gated":
        g, u = xf[:, :K], xf[:, K : 2 * K]
        a = g / (1.0 + torch.exp(-g)) * u
        return a, a, scale
    if mode == "cats":
        return xf / (1.0 + torch.exp(-xf)), x2.float(), scale
    raise ValueError(f"unknown input mode {mode!r}")


def thr_keep(x, crit, thr, *, mode, segs=(), n=None, x2=None, ge=False, norm_thr=False, eps=1e-5):
    """keep [S, B, K] bool: channel i of sequence b kept for output segment s (see `thr_col_gemv`)."""
    K = crit.shape[-1]
    a, _v, scale = _thr_input(x, x2, mode, K, eps)
    S = len(segs) + 1
    c = crit.reshape(-1, K).float()
    c = c[:S] if c.shape[0] >= S else c.expand(S, K)
    t = thr.float().reshape(-1, x.shape[0])
    t = t[:S] if t.shape[0] >= S else t.expand(S, x.shape[0])
    score = a.abs()[None] * c[:, None, :]
    if norm_thr:
        score = score * scale[None]
    return score >= t[:, :, None] if ge else score > t[:, :, None]


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
    """out[b] += Σ_{i kept by b} v_bi · W^T[i] (+ bias); count[s] += rows some sequence keeps for segment s (the
    Triton twin's API and semantics; `pdl`, `tiles` ignored)."""
    K, N = lin.w.shape
    keep = thr_keep(x, crit, thr, mode=mode, segs=segs, x2=x2, ge=ge, norm_thr=norm_thr, eps=eps)
    _a, v, _s = _thr_input(x, x2, mode, K, eps)
    bounds_ = (0, *segs, N)
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for s in range(len(bounds_) - 1):
        lo, hi = bounds_[s], bounds_[s + 1]
        vs = torch.where(keep[s], v, torch.zeros((), device=v.device))
        rows = keep[s].any(0)
        acc[:, lo:hi] = vs[:, rows] @ lin.w[rows, lo:hi].float()
        count[s] += int(rows.sum())
    if lin.bias is not None:
        acc = acc + lin.bias[None, :]
    out += acc


def kth_threshold(x: torch.Tensor, crit: torch.Tensor, k: int, thr: torch.Tensor, *, mode: str) -> None:
    """thr[s, b] = the k-th largest |a_bi|·crit[s, i] (a: the raw input, or silu(g)·u for "gated")."""
    K = crit.shape[1]
    a, _v, _s = _thr_input(x, None, "plain" if mode == "rms" else mode, K, 0.0)
    score = a.abs()[None] * crit.float()[:, None, :]
    thr.copy_(torch.topk(score, k, dim=-1).values[..., k - 1])
