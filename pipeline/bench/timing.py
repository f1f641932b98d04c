"""CUDA-event timing: copy bandwidth, and per-token decode time over CUDA-graph replays."""

from __future__ import annotations

import statistics

import torch


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 30, warmup: int = 5) -> dict[str, float]:
    """Device-to-device copy: (bytes read + bytes written) / time, median over `reps` (GB/s)."""
    n = nbytes // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    med = statistics.median(times)
    del src, dst
    return {"copy_gbps": 2 * n * 2 / (med * 1e-3) / 1e9, "copy_ms": med, "copy_bytes": 2 * n * 2}


def capture(engine) -> torch.cuda.CUDAGraph:
    """Compile (one eager step), then capture one decode step in a CUDA graph."""
    engine.reset()
    engine.step()  # JIT-compiles every kernel variant outside the capture
    torch.cuda.synchronize()
    engine.reset()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        engine.step()
    torch.cuda.synchronize()
    return g


def time_decode(engine, graph: torch.cuda.CUDAGraph, *, warmup: int = 8, repeats: int = 1) -> list[float]:
    """Per-token milliseconds of `gen_len` graph replays (each replay = one step), after `warmup` replays."""
    n = engine.cfg.gen_len
    engine.reset()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    out: list[float] = []
    for _ in range(repeats):
        engine.reset()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        out += [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return out


def time_eager(engine, *, warmup: int = 0, repeats: int = 1) -> list[float]:
    """Per-step milliseconds of eager steps by the host clock (CPU smoke path of the run; no CUDA events)."""
    import time

    engine.reset()
    for _ in range(warmup):
        engine.step()
    out: list[float] = []
    for _ in range(repeats):
        engine.reset()
        for _ in range(engine.cfg.gen_len):
            t = time.perf_counter()
            engine.step()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def summarize(times: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times)] * 9
    return {
        "ms_per_token": statistics.median(times),
        "ms_p10": qs[0],
        "ms_p90": qs[-1],
        "ms_mean": statistics.fmean(times),
        "n_timed": len(times),
    }
