"""The whole GPU measurement in one call: copy bandwidth, kernel tile sweep and gather-kernel bandwidth, then
decode latency for every (model, method, sparsity, batch) of `BenchmarkParams`, within a time budget.

`run(params)` is called by `shadowllm benchmark` (stages/benchmark.py). The Triton tiles start at
`DEFAULT_TILES`; the sweeps return new ones, which every later measurement uses and the results record
(`micro.config`). Imports only torch/triton/numpy/stdlib (+ matplotlib for the report).
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import replace as _replace

import torch

from .engine import EngineConfig
from .params import BenchmarkParams
from .tiles import DEFAULT_TILES, Tiles


def _log(*a):
    print(*a, flush=True)


def _config(bp: BenchmarkParams, tiles: Tiles, **kw) -> EngineConfig:
    """An engine configuration of the run: lengths and seed from the params, the rest from `kw`."""
    return EngineConfig(prompt_len=bp.prompt_len, gen_len=bp.gen_len, seed=bp.seed, tiles=tiles, **kw)


def measure_one(
    shape,
    w,
    preds,
    *,
    method,
    sparsity,
    batch,
    bp,
    tiles,
    overlap,
    shadow_spec,
    dejavu_spec,
    copy_gbps,
    dense_ms,
    pdl,
    backend="triton",
    device="cuda",
):
    """One configuration: CUDA-graph timing on a GPU; on a CPU (`device="cpu"`, the tests) eager steps timed by the
    host clock, only to exercise the path."""
    from . import bounds, timing
    from .engine import REGISTRY, DecodeEngine

    hs, ns = REGISTRY[method].sparsities(sparsity)
    ecfg = _config(
        bp,
        tiles,
        method=method,
        head_sparsity=hs,
        neuron_sparsity=ns,
        batch=batch,
        shadowllm=shadow_spec,
        dejavu=dejavu_spec,
        overlap=overlap,
        pdl=pdl,
    )
    eng = DecodeEngine(
        shape, ecfg, weights=w, backend=backend, device=device, predictors=preds, dtype=w.lm_head.w.dtype
    )
    if device == "cpu":
        g = None
        times = timing.time_eager(eng, warmup=bp.warmup_steps, repeats=bp.repeats)
    else:
        g = timing.capture(eng)
        times = timing.time_decode(eng, g, warmup=bp.warmup_steps, repeats=bp.repeats)
    t = timing.summarize(times)
    heads, neurons = eng.plan.host_masks(shape)
    ctx = bp.prompt_len + (bp.gen_len - 1) / 2
    elem = w.lm_head.w.element_size()
    by = bounds.step_bytes(
        shape, heads, neurons, batch=batch, context=ctx, predictor_bytes=eng.predictor_bytes(), elem=elem
    )
    if eng.spec.counted:  # data-dependent reads: the kernels' counters, mean over every step run (warm-up included)
        wb = eng.weight_bytes()
        by.update({f"{k}_bytes": wb[k] for k in ("qkv", "o", "mlp_in", "mlp_out")})
        by["attn_bytes"], by["mlp_bytes"] = wb["qkv"] + wb["o"], wb["mlp_in"] + wb["mlp_out"]
        by["total_bytes"] = sum(
            by[k] for k in ("attn_bytes", "mlp_bytes", "lm_head_bytes", "kv_bytes", "predictor_bytes")
        )
    dense_by = bounds.step_bytes(
        shape,
        torch.ones(shape.layers, shape.heads, dtype=torch.bool),
        torch.ones(shape.layers, shape.ffn, dtype=torch.bool),
        batch=batch,
        context=ctx,
        elem=elem,
    )
    bd = bounds.bound(by["total_bytes"], dense_by["total_bytes"], copy_gbps)
    row = {
        "model": shape.name,
        "method": method,
        "batch": batch,
        "head_sparsity": hs,
        "neuron_sparsity": ns,
        "sparsity": sparsity,
        "byte_sparsity": eng.byte_sparsity(),
        **t,
        "tokens_per_s": batch * 1e3 / t["ms_per_token"],
        "achieved_gbps": by["total_bytes"] / (t["ms_per_token"] * 1e-3) / 1e9,
        **by,
        **bd,
        "frac_of_bound": bd["bound_ms"] / t["ms_per_token"],
        "speedup_vs_dense": (dense_ms / t["ms_per_token"]) if dense_ms else None,
        "predictor_params": eng.predictor_params(),
        "predictor_share": by["predictor_bytes"] / dense_by["total_bytes"],
        "kept_heads_mean": float(heads[1:].sum(1).double().mean()) if shape.layers > 1 else float(shape.heads),
        "kept_neurons_mean": float(neurons[1:].sum(1).double().mean()) if shape.layers > 1 else float(shape.ffn),
        "overlap": overlap,
        "pdl": eng.pdl,
        "status": "ok",
    }  # pdl as launched (off for overlapped DejaVu)
    del g, eng
    return row


def measure_compiled_row(shape, w, batch: int, bp, log, **compile_kw) -> dict:
    """The compiled PyTorch dense baseline (`compiled.py`) at one batch, as a row of its own (method
    `compiled-dense`); an error is recorded, not raised. `compile_kw`: mode/backend (the CPU test traces only)."""
    from .compiled import measure_compiled

    base = {"model": shape.name, "method": "compiled-dense", "batch": batch, "head_sparsity": 0.0}
    try:
        t = measure_compiled(w, batch, bp.prompt_len, bp.gen_len, bp.warmup_steps, seed=bp.seed, **compile_kw)
    except Exception as e:  # record and go on
        log(f"[bench] {shape.name} compiled-dense b={batch}: {type(e).__name__}: {str(e)[:300]}")
        return {**base, "status": f"error: {type(e).__name__}: {str(e)[:300]}"}
    log(f"[bench] {shape.name:11s} b={batch:2d} compiled-dense (torch.compile) {t['ms_per_token']:7.3f} ms")
    return {**base, **t, "tokens_per_s": batch * 1e3 / t["ms_per_token"], "status": "ok"}


def sweep_thresholder_tiles(shape, w, *, bp, tiles, log, sweep=None) -> tuple[Tiles, list[dict]]:
    """The thresholded column GEMV's tiles (`thr_col` at batch 1, `thr_col_dot` at the grid's smallest batch > 1),
    each swept on whole decode steps of the column methods (teal and wina at 50 %); returns the tiles with the
    picks in place and the sweep records. `sweep`: `microbench.engine_sweep` (a test passes a stand-in)."""
    from . import microbench
    from .engine import REGISTRY

    sweep = sweep or microbench.engine_sweep
    tb = bp.thresholders
    points = tuple((m, 0.5) for m in tb.methods if REGISTRY[m].columns and not REGISTRY[m].unsupported(shape))
    records = []
    if not points:
        return tiles, records
    plan = [("thr_col", microbench.THR_COL_CANDIDATES, 1)]
    dot = sorted(b for b in tb.batches if b > 1)
    if dot:
        plan.append(("thr_col_dot", microbench.THR_COL_DOT_CANDIDATES, dot[0]))
    for key, cands, batch in plan:
        cfg = _config(
            bp, tiles, method=points[0][0], head_sparsity=0.5, neuron_sparsity=0.5, batch=batch,
            shadowllm=bp.shadowllm.spec, dejavu=bp.dejavu.spec, overlap=bp.overlap, pdl=True,
        )  # fmt: skip
        tiles, sw = sweep(shape, w, key, cands, cfg, points=points, batch=batch)
        records.append(sw)
        log(f"[bench] sweep {key} ({sw['kernel']}): best {sw['best']['config']} {sw['best']['ms']:.3f} ms")
    return tiles, records


def measure_thresholders(shape, w, preds, *, bp, tiles, copy_gbps, dense_rows, log, t0, backend, device) -> list:
    """The thresholders' grid of one model (`benchmark.thresholders`): every method at every sparsity and batch,
    dense first at each batch the main grid did not measure (`dense_rows`: (model, batch) -> its row)."""
    from .engine import REGISTRY

    tb = bp.thresholders
    rows = []
    for b in tb.batches:
        dense = dense_rows.get((shape.name, b))
        todo = ([("dense", 0.0)] if dense is None else []) + [(m, sp) for m in tb.methods for sp in tb.sparsities]
        for method, sp in todo:
            base = {"model": shape.name, "method": method, "batch": b, "sparsity": sp, "grid": "thresholders"}
            why = REGISTRY[method].unsupported(shape)
            if why or time.time() - t0 > bp.time_budget_s:
                rows.append({**base, "status": f"skipped: {why or 'time budget'}"})
                continue
            try:
                row = measure_one(
                    shape, w, preds, method=method, sparsity=sp, batch=b, bp=bp, tiles=tiles, overlap=bp.overlap,
                    shadow_spec=bp.shadowllm.spec, dejavu_spec=bp.dejavu.spec, copy_gbps=copy_gbps,
                    dense_ms=dense["ms_per_token"] if dense else None, pdl=True, backend=backend, device=device,
                )  # fmt: skip
            except Exception as e:  # record and go on
                rows.append({**base, "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
                log(f"[bench] thresholders {shape.name} {method} b={b} s={sp}: {rows[-1]['status']}")
                continue
            row["grid"] = "thresholders"
            if method == "dense":
                dense = row
                row["speedup_vs_dense"] = 1.0
            rows.append(row)
            log(
                f"[bench] thr {shape.name:11s} b={b:2d} {method:9s} s={sp:.2f} {row['ms_per_token']:7.3f} ms "
                f"bytes skipped {row['byte_sparsity']:.3f} x={row['speedup_vs_dense'] or 1:.2f} "
                f"(bound {row['speedup_bound']:.2f})"
            )
    return rows


def profile_one(shape, w, preds, *, method, sparsity, bp, tiles, shadow_spec, dejavu_spec, copy_gbps) -> dict:
    """Graph-replayed step time and the eager per-part device-time profile of one configuration. Without PDL and
    with the predictors on the main stream, so that every kernel's time is its own."""
    from . import profile, timing
    from .engine import DecodeEngine

    ecfg = _config(
        bp,
        tiles,
        method=method,
        head_sparsity=sparsity,
        neuron_sparsity=sparsity,
        batch=1,
        shadowllm=shadow_spec,
        dejavu=dejavu_spec,
        overlap=False,
        pdl=False,
    )
    eng = DecodeEngine(shape, ecfg, weights=w, backend="triton", device="cuda", predictors=preds)
    g = timing.capture(eng)
    step_ms = timing.summarize(timing.time_decode(eng, g, warmup=bp.warmup_steps))["ms_per_token"]
    del g
    prof = profile.profile_engine(eng)
    heads, neurons = eng.plan.host_masks(shape)
    nbytes = profile.part_bytes(
        shape, heads, neurons, context=bp.prompt_len + bp.gen_len / 2, predictor_bytes=eng.predictor_bytes()
    )
    out = {
        "method": method,
        "sparsity": sparsity,
        "overlap": False,
        "pdl": False,
        **profile.summarize(prof, nbytes, step_ms, copy_gbps),
        "kernels_us": prof["kernels_us"],
        "n_kernels": prof["n_kernels"],
    }
    del eng
    return out


def _kernel_table(kb, tiles: Tiles, copy_gbps: float, micro: dict, log) -> None:
    """Each gather kernel alone at 0/50/90% with `tiles` (bytes it reads, time, fraction of the copy bandwidth)."""
    for kern, sps in (
        ("gateup", (0.0, 0.5, 0.9)),
        ("down", (0.0, 0.5, 0.9)),
        ("qkv", (0.0, 0.5, 0.9)),
        ("o", (0.0, 0.5, 0.9)),
        ("o_col", (0.0, 0.5)),
        ("attn", (0.0, 0.5)),
        ("torch_gateup", (0.0,)),
        ("torch_down", (0.0,)),
    ):
        for sp in sps:
            try:
                r = kb.run(kern, sp, tiles)
            except Exception as e:
                log(f"[bench] kernel {kern} s={sp}: {type(e).__name__}: {str(e)[:200]}")
                continue
            r["frac_of_copy"] = r["gbps"] / copy_gbps
            micro["kernels"].append(r)
            log(
                f"[bench] kernel {r['kernel']:13s} s={r['sparsity']:.1f} {r['us']:8.1f} us {r['gbps']:6.0f} GB/s "
                f"{r['frac_of_copy']:.2f} of copy"
            )


def run(bp: BenchmarkParams, log=_log) -> dict:
    import triton

    from . import microbench, report, timing
    from .predictors import build_dejavu, build_shadowllm
    from .shapes import get
    from .weights import build

    t0 = time.time()
    budget = bp.time_budget_s
    props = torch.cuda.get_device_properties(0)
    results: dict = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "params": bp.as_dict(),
        "summary_model": bp.summary_model,
        "rows": [],
    }
    cp = timing.copy_bandwidth()
    results["copy"] = cp
    log(f"[bench] {props.name}: copy {cp['copy_gbps']:.0f} GB/s")
    shadow_spec, dejavu_spec = bp.shadowllm.spec, bp.dejavu.spec
    tiles = DEFAULT_TILES
    micro: dict = {"sweeps": [], "kernels": []}
    kb = None
    if bp.micro_model:
        ms = get(bp.micro_model)
        kb = microbench.KernelBench(ms)
        if bp.sweep_tiles and any(b > 1 for b in bp.batches):
            kb16 = microbench.KernelBench(ms, batch=16, n_sets=3)
            for key, kern, cands in (
                ("row_dot", "gateup", microbench.ROW_DOT_CANDIDATES),
                ("col_dot", "down", microbench.COL_DOT_CANDIDATES),
            ):
                tiles, sw = microbench.sweep(kb16, tiles, key, kern, cands)
                micro["sweeps"].append(sw)
                log(f"[bench] sweep {key}: best {sw['best']['config']} {sw['best']['gbps']:.0f} GB/s")
            del kb16
        if not (bp.sweep_tiles and bp.micro_model in bp.models):
            _kernel_table(kb, tiles, cp["copy_gbps"], micro, log)
            kb = None
    micro["config"] = tiles.as_dict()
    results["micro"] = micro

    methods = bp.methods
    plan_list = []
    for m in bp.models:
        for b in bp.batches if m in bp.batch_models else [1]:
            plan_list.append((m, b))
    over = False
    for model in bp.models:
        shape = get(model)
        batches = [b for (m, b) in plan_list if m == model]
        if over or time.time() - t0 > budget:
            over = True
            results["rows"] += [{"model": model, "batch": b, "status": "skipped: time budget"} for b in batches]
            continue
        w = build(shape, device="cuda", seed=bp.seed)
        preds = {}
        if bp.uses("shadowllm"):
            preds["shadowllm"] = build_shadowllm(shape, shadow_spec, device="cuda", dtype=torch.bfloat16)
        if bp.uses("dejavu"):
            preds["dejavu"] = build_dejavu(shape, dejavu_spec, device="cuda", dtype=torch.bfloat16)
        if bp.sweep_tiles and model == bp.micro_model:
            sweep_cfg = _config(
                bp,
                tiles,
                method="dense",
                head_sparsity=0.0,
                neuron_sparsity=0.0,
                batch=1,
                shadowllm=shadow_spec,
                dejavu=dejavu_spec,
                overlap=bp.overlap,
                pdl=True,
            )
            for key, cands in (
                ("row", microbench.ROW_CANDIDATES),
                ("col", microbench.COL_CANDIDATES),
                ("qkv", microbench.SMALL_ROW_CANDIDATES),
                ("o", microbench.SMALL_ROW_CANDIDATES),
                ("attn", microbench.ATTN_CANDIDATES),
            ):
                tiles, sw = microbench.engine_sweep(shape, w, key, cands, sweep_cfg)
                sweep_cfg = _replace(sweep_cfg, tiles=tiles)
                micro["sweeps"].append(sw)
                log(f"[bench] sweep {key} (decode steps): best {sw['best']['config']} {sw['best']['ms']:.3f} ms")
            micro["config"] = tiles.as_dict()
            if kb is not None:  # the kernels alone, with the tiles the decode steps use
                _kernel_table(kb, tiles, cp["copy_gbps"], micro, log)
                kb = None
                gc.collect()
                torch.cuda.empty_cache()
        for b in batches:
            dense_ms = None
            compiled = measure_compiled_row(shape, w, b, bp, log) if model in bp.compiled_models else None
            if compiled is not None:  # its own table: it has no bytes/bound accounting of the engine's
                results.setdefault("compiled_rows", []).append(compiled)
            for method in methods:
                for sp in [0.0] if method == "dense" else bp.sparsities:
                    if time.time() - t0 > budget:
                        over = True
                        results["rows"].append(
                            {
                                "model": model,
                                "method": method,
                                "batch": b,
                                "head_sparsity": sp,
                                "status": "skipped: time budget",
                            }
                        )
                        continue
                    try:
                        row = measure_one(
                            shape,
                            w,
                            preds,
                            method=method,
                            sparsity=sp,
                            batch=b,
                            bp=bp,
                            tiles=tiles,
                            overlap=bp.overlap,
                            shadow_spec=shadow_spec,
                            dejavu_spec=dejavu_spec,
                            copy_gbps=cp["copy_gbps"],
                            dense_ms=dense_ms,
                            pdl=True,
                        )
                    except Exception as e:  # record and go on: one call must bring back everything it can
                        row = {
                            "model": model,
                            "method": method,
                            "batch": b,
                            "head_sparsity": sp,
                            "status": f"error: {type(e).__name__}: {str(e)[:300]}",
                        }
                        log(f"[bench] {model} {method} b={b} s={sp}: {row['status']}")
                    else:
                        if method == "dense":
                            dense_ms = row["ms_per_token"]
                        if compiled is not None and compiled.get("status") == "ok":
                            row["speedup_vs_compiled"] = compiled["ms_per_token"] / row["ms_per_token"]
                        log(
                            f"[bench] {model:11s} b={b:2d} {method:9s} s={sp:.1f} {row['ms_per_token']:7.3f} ms "
                            f"{row['achieved_gbps']:6.0f} GB/s frac={row['frac_of_bound']:.2f} "
                            f"x={row['speedup_vs_dense'] or 1:.2f} (bound {row['speedup_bound']:.2f}) "
                            f"t={time.time() - t0:.0f}s"
                        )
                    results["rows"].append(row)
        if model in bp.thresholders.models:
            thr_tiles = tiles
            if bp.thresholders.sweep_tiles:
                thr_tiles, sweeps = sweep_thresholder_tiles(shape, w, bp=bp, tiles=tiles, log=log)
                micro["sweeps"] += sweeps
                micro["thresholder_config"] = thr_tiles.as_dict()
            dense_rows = {
                (r["model"], r["batch"]): r
                for r in results["rows"]
                if r.get("status") == "ok" and r["method"] == "dense" and r["model"] == model
            }
            results.setdefault("thresholder_rows", []).extend(
                measure_thresholders(
                    shape,
                    w,
                    preds,
                    bp=bp,
                    tiles=thr_tiles,
                    copy_gbps=cp["copy_gbps"],
                    dense_rows=dense_rows,
                    log=log,
                    t0=t0,
                    backend="triton",
                    device="cuda",
                )
            )
        if model == bp.summary_model:
            for pc in bp.profile:
                try:
                    pr = profile_one(
                        shape,
                        w,
                        preds,
                        method=pc.method,
                        sparsity=pc.sparsity,
                        bp=bp,
                        tiles=tiles,
                        shadow_spec=shadow_spec,
                        dejavu_spec=dejavu_spec,
                        copy_gbps=cp["copy_gbps"],
                    )
                except Exception as e:
                    log(f"[bench] profile {pc.as_dict()}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                results.setdefault("profile", []).append(pr)
                log(
                    f"[bench] profile {pr['method']}@{pr['sparsity']:.0%}: step {pr['step_us']:.0f} us = kernels "
                    f"{pr['kernel_sum_us']:.0f} + between {pr['between_kernels_us']:.0f}; "
                    + ", ".join(
                        f"{r['part']} {r['us']:.0f}us" + (f" ({r['frac_of_copy']:.2f})" if r["frac_of_copy"] else "")
                        for r in pr["parts"]
                    )
                )
        for ex in bp.extra:
            if ex.model != model or time.time() - t0 > budget:
                continue
            try:
                sspec = ex.shadowllm.spec if ex.shadowllm is not None else shadow_spec
                dspec = ex.dejavu.spec if ex.dejavu is not None else dejavu_spec
                xpreds = dict(preds)
                if ex.shadowllm is not None:
                    xpreds["shadowllm"] = build_shadowllm(shape, sspec, device="cuda", dtype=torch.bfloat16)
                if ex.dejavu is not None:
                    xpreds["dejavu"] = build_dejavu(shape, dspec, device="cuda", dtype=torch.bfloat16)
                row = measure_one(
                    shape,
                    w,
                    xpreds,
                    method=ex.method,
                    sparsity=ex.sparsity,
                    batch=ex.batch if ex.batch is not None else 1,
                    bp=bp,
                    tiles=tiles,
                    overlap=ex.overlap if ex.overlap is not None else bp.overlap,
                    shadow_spec=sspec,
                    dejavu_spec=dspec,
                    copy_gbps=cp["copy_gbps"],
                    dense_ms=None,
                    pdl=ex.pdl if ex.pdl is not None else True,
                )
                del xpreds
                row["variant"] = ex.name
                dm = next(
                    (
                        r["ms_per_token"]
                        for r in results["rows"]
                        if r.get("status") == "ok"
                        and r["model"] == model
                        and r["method"] == "dense"
                        and r["batch"] == row["batch"]
                    ),
                    None,
                )
                row["speedup_vs_dense"] = dm / row["ms_per_token"] if dm else None
                results.setdefault("extra_rows", []).append(row)
                log(
                    f"[bench] extra {row['variant']}: {row['ms_per_token']:.3f} ms "
                    f"(x{row['speedup_vs_dense'] or 0:.2f})"
                )
            except Exception as e:
                log(f"[bench] extra {ex.as_dict()}: {type(e).__name__}: {e}")
        del w, preds
        gc.collect()
        torch.cuda.empty_cache()
    # speedups vs dense of the same model and batch
    dense_of = {
        (r["model"], r["batch"]): r["ms_per_token"]
        for r in results["rows"]
        if r.get("status") == "ok" and r["method"] == "dense"
    }
    for r in results["rows"]:
        if r.get("status") == "ok" and (r["model"], r["batch"]) in dense_of:
            r["speedup_vs_dense"] = dense_of[(r["model"], r["batch"])] / r["ms_per_token"]
    results["summary"] = report.summarize(results["rows"], micro, bp.summary_model)
    results["wall_s"] = time.time() - t0
    return results
