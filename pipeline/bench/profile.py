"""Where a decode step's time goes: device time per part (q/k/v, attention, o, MLP in/out, LM head, predictor, ...)
from the PyTorch profiler (CUPTI kernel records), against the bytes each part reads.

The engine runs eagerly with named ranges (`DecodeEngine.profiling`); each kernel's device time is attributed
to the range that launched it. Eager launches leave the GPU idle between kernels, so each kernel's time is its
own (launch latency excluded); the graph-replayed step time minus the sum of kernel times is what the step
loses between kernels (launch gaps, ramp-up and tails that do not overlap).
"""

from __future__ import annotations

import torch

from .bounds import step_bytes
from .shapes import ModelShape

PARTS = ("embed", "qkv", "attention", "o", "mlp_in", "mlp_out", "predictor", "lm_head", "sample")


def part_bytes(
    shape: ModelShape,
    head_keep: torch.Tensor,
    neuron_keep: torch.Tensor,
    *,
    context: float,
    predictor_bytes: int,
    batch: int = 1,
) -> dict[str, float]:
    """Bytes each part reads in one step (weights; the KV cache for attention), from the bound's accounting."""
    by = step_bytes(shape, head_keep, neuron_keep, batch=batch, context=context, predictor_bytes=predictor_bytes)
    return {
        "qkv": by["qkv_bytes"],
        "attention": by["kv_bytes"],
        "o": by["o_bytes"],
        "mlp_in": by["mlp_in_bytes"],
        "mlp_out": by["mlp_out_bytes"],
        "predictor": by["predictor_bytes"],
        "lm_head": by["lm_head_bytes"],
    }


def _on_device(evt) -> bool:
    return "CUDA" in str(getattr(evt, "device_type", ""))


def attribute(events: list[tuple[float, float, str]], spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Sum the durations of device `events` (start, end, name) by the labelled span (start, end, label) each one
    starts in; events outside every span go to "other"."""
    import bisect

    spans = sorted(spans)
    starts = [sp[0] for sp in spans]
    out: dict[str, float] = {}
    for t0, t1, _ in events:
        i = bisect.bisect_right(starts, t0) - 1
        label = spans[i][2] if i >= 0 and t0 < spans[i][1] else "other"
        out[label] = out.get(label, 0.0) + (t1 - t0)
    return out


def profile_engine(engine, *, steps: int = 4) -> dict:
    """Device µs per step for each part of the step and for each kernel name (eager run of `steps` steps)."""
    from torch.profiler import ProfilerActivity, profile

    engine.reset()
    engine.profiling = True
    try:
        engine.step()  # compile/warm outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
    finally:
        engine.profiling = False
    dev = [e for e in prof.events() if _on_device(e)]
    spans = [(e.time_range.start, e.time_range.end, e.key) for e in dev if e.key in PARTS]  # GPU-side ranges
    kern = [(e.time_range.start, e.time_range.end, e.key) for e in dev if e.key not in PARTS]
    kernels: dict[str, float] = {}
    for t0, t1, name in kern:
        kernels[name] = kernels.get(name, 0.0) + (t1 - t0) / steps
    parts = {k: v / steps for k, v in attribute(kern, spans).items()}
    return {
        "parts_us": parts,
        "kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
        "kernel_sum_us": sum(kernels.values()),
        "steps": steps,
        "n_kernels": len(kern) / steps,
    }


def summarize(prof: dict, nbytes: dict[str, float], step_ms: float, copy_gbps: float) -> dict:
    """Per part: µs, bytes, GB/s, fraction of copy bandwidth, and the µs lost against a copy-speed read."""
    rows = []
    for part in PARTS + ("other",):
        us = prof["parts_us"].get(part)
        if us is None:
            continue
        b = nbytes.get(part, 0.0)
        ideal = b / (copy_gbps * 1e3)  # µs at copy bandwidth
        rows.append(
            {
                "part": part,
                "us": us,
                "bytes": b,
                "gbps": b / (us * 1e3) if us and b else None,
                "frac_of_copy": ideal / us if us and b else None,
                "lost_us": us - ideal,
            }
        )
    total = sum(r["us"] for r in rows)
    return {
        "parts": rows,
        "kernel_sum_us": total,
        "step_us": step_ms * 1e3,
        "between_kernels_us": step_ms * 1e3 - total,
    }
