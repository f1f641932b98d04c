"""The whole GPU measurement in one call: copy bandwidth, kernel tile sweep and gather-kernel bandwidth, then
decode latency for every (model, mode, sparsity, batch) in the params, within a time budget.

    python -m pipeline.bench.run_all [--params params.yaml] [--out results/benchmark] [--stem h200]

Reads the `benchmark:` section of the params file if it has one (else the defaults below). Imports only
torch/triton/numpy/stdlib (+ yaml, matplotlib when present).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULTS: dict = {
    "models": ["llama-3-8b", "llama-2-7b", "qwen2.5-7b", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b"],
    "modes": ["dense", "static", "shadowllm", "dejavu"],
    "sparsities": [0.0, 0.3, 0.5, 0.7, 0.9],
    "batches": [1, 2, 4, 8, 16],
    "batch_models": ["llama-3-8b"],
    "prompt_len": 128,
    "gen_len": 128,
    "warmup_steps": 8,
    "repeats": 1,
    "overlap": True,
    # the widths of train.widths.shadowllm (the predictor the train stage fits): rank-256 neuron output
    "shadowllm": {"hidden_heads": 2048, "hidden_neurons": 1024, "rank_heads": 0, "rank_neurons": 256},
    "dejavu": {"hidden_heads": 1024, "hidden_neurons": 1024, "rank_heads": 0, "rank_neurons": 0},
    # ablations (reported apart): [{name, model, mode, sparsity, batch?, overlap?, pdl?, shadowllm?: widths,
    # dejavu?: widths}]
    "extra": [
        {"name": "dense-nopdl", "model": "llama-3-8b", "mode": "dense", "sparsity": 0.0, "pdl": False},
        {"name": "static-nopdl", "model": "llama-3-8b", "mode": "static", "sparsity": 0.5, "pdl": False},
        {"name": "dejavu-sync", "model": "llama-3-8b", "mode": "dejavu", "sparsity": 0.5, "overlap": False},
        {"name": "shadowllm-sync", "model": "llama-3-8b", "mode": "shadowllm", "sparsity": 0.5, "overlap": False},
        {"name": "dejavu-sync@0", "model": "llama-3-8b", "mode": "dejavu", "sparsity": 0.0, "overlap": False},
        {
            "name": "shadowllm-fullrank",
            "model": "llama-3-8b",
            "mode": "shadowllm",
            "sparsity": 0.5,
            "shadowllm": {"hidden_heads": 2048, "hidden_neurons": 1024, "rank_heads": 0, "rank_neurons": 0},
        },
        {
            "name": "shadowllm-fullrank@0",
            "model": "llama-3-8b",
            "mode": "shadowllm",
            "sparsity": 0.0,
            "shadowllm": {"hidden_heads": 2048, "hidden_neurons": 1024, "rank_heads": 0, "rank_neurons": 0},
        },
    ],
    # per-part device-time profile of these batch-1 configurations of the summary model (predictors not overlapped)
    "profile": [
        {"mode": "dense", "sparsity": 0.0},
        {"mode": "static", "sparsity": 0.5},
        {"mode": "shadowllm", "sparsity": 0.5},
        {"mode": "dejavu", "sparsity": 0.5},
    ],
    "sweep_tiles": True,
    "micro_model": "llama-3-8b",
    "summary_model": "llama-3-8b",
    "time_budget_s": 480,
    "seed": 0,
}


def load_params(path: str | None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        p = Path(path)
        text = p.read_text()
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        data = data.get("benchmark", data)
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown benchmark parameters: {sorted(unknown)}")
        cfg.update(data)
    return cfg


def _log(*a):
    print(*a, flush=True)


def measure_one(
    shape, w, preds, *, mode, sparsity, batch, cfg, overlap, shadow_spec, dejavu_spec, copy_gbps, dense_ms, pdl=True
):
    from . import bounds, timing
    from .engine import DecodeEngine, EngineConfig

    ecfg = EngineConfig(
        mode=mode,
        head_sparsity=sparsity,
        neuron_sparsity=sparsity,
        batch=batch,
        prompt_len=cfg["prompt_len"],
        gen_len=cfg["gen_len"],
        shadowllm=shadow_spec,
        dejavu=dejavu_spec,
        overlap=overlap,
        pdl=pdl,
        seed=cfg["seed"],
    )
    eng = DecodeEngine(shape, ecfg, weights=w, backend="triton", device="cuda", predictors=preds)
    g = timing.capture(eng)
    times = timing.time_decode(eng, g, warmup=cfg["warmup_steps"], repeats=cfg["repeats"])
    t = timing.summarize(times)
    heads, neurons = eng.plan.host_masks(shape)
    ctx = cfg["prompt_len"] + (cfg["gen_len"] - 1) / 2
    by = bounds.step_bytes(shape, heads, neurons, batch=batch, context=ctx, predictor_bytes=eng.predictor_bytes())
    dense_by = bounds.dense_bytes(shape, batch=batch, context=ctx)
    bd = bounds.bound(by["total_bytes"], dense_by["total_bytes"], copy_gbps)
    row = {
        "model": shape.name,
        "mode": mode,
        "batch": batch,
        "head_sparsity": sparsity,
        "neuron_sparsity": sparsity,
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


def profile_one(shape, w, preds, *, mode, sparsity, cfg, shadow_spec, dejavu_spec, copy_gbps) -> dict:
    """Graph-replayed step time and the eager per-part device-time profile of one configuration. Without PDL and
    with the predictors on the main stream, so that every kernel's time is its own."""
    from . import profile, timing
    from .engine import DecodeEngine, EngineConfig

    ecfg = EngineConfig(
        mode=mode,
        head_sparsity=sparsity,
        neuron_sparsity=sparsity,
        batch=1,
        prompt_len=cfg["prompt_len"],
        gen_len=cfg["gen_len"],
        shadowllm=shadow_spec,
        dejavu=dejavu_spec,
        overlap=False,
        pdl=False,
        seed=cfg["seed"],
    )
    eng = DecodeEngine(shape, ecfg, weights=w, backend="triton", device="cuda", predictors=preds)
    g = timing.capture(eng)
    step_ms = timing.summarize(timing.time_decode(eng, g, warmup=cfg["warmup_steps"]))["ms_per_token"]
    del g
    prof = profile.profile_engine(eng)
    heads, neurons = eng.plan.host_masks(shape)
    nbytes = profile.part_bytes(
        shape, heads, neurons, context=cfg["prompt_len"] + cfg["gen_len"] / 2, predictor_bytes=eng.predictor_bytes()
    )
    out = {
        "mode": mode,
        "sparsity": sparsity,
        "overlap": False,
        "pdl": False,
        **profile.summarize(prof, nbytes, step_ms, copy_gbps),
        "kernels_us": prof["kernels_us"],
        "n_kernels": prof["n_kernels"],
    }
    del eng
    return out


def _kernel_table(kb, copy_gbps: float, micro: dict, log) -> None:
    """Each gather kernel alone at 0/50/90% (bytes it reads, time, fraction of the copy bandwidth)."""
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
                r = kb.run(kern, sp)
            except Exception as e:
                log(f"[bench] kernel {kern} s={sp}: {type(e).__name__}: {str(e)[:200]}")
                continue
            r["frac_of_copy"] = r["gbps"] / copy_gbps
            micro["kernels"].append(r)
            log(
                f"[bench] kernel {r['kernel']:13s} s={r['sparsity']:.1f} {r['us']:8.1f} us {r['gbps']:6.0f} GB/s "
                f"{r['frac_of_copy']:.2f} of copy"
            )


def run(cfg: dict, log=_log) -> dict:
    import triton

    from . import kernels_triton as KT
    from . import microbench, report, timing
    from .predictors import PredictorSpec, build_dejavu, build_shadowllm
    from .shapes import get
    from .weights import build

    t0 = time.time()
    budget = float(cfg["time_budget_s"])
    props = torch.cuda.get_device_properties(0)
    results: dict = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "params": cfg,
        "summary_model": cfg["summary_model"],
        "rows": [],
    }
    cp = timing.copy_bandwidth()
    results["copy"] = cp
    log(f"[bench] {props.name}: copy {cp['copy_gbps']:.0f} GB/s")
    micro: dict = {"sweeps": [], "kernels": []}
    kb = None
    if cfg["micro_model"]:
        ms = get(cfg["micro_model"])
        kb = microbench.KernelBench(ms)
        if cfg["sweep_tiles"] and any(b > 1 for b in cfg["batches"]):
            kb16 = microbench.KernelBench(ms, batch=16, n_sets=3)
            for key, kern, cands in (
                ("row_dot", "gateup", microbench.ROW_DOT_CANDIDATES),
                ("col_dot", "down", microbench.COL_DOT_CANDIDATES),
            ):
                sw = microbench.sweep(kb16, key, kern, cands)
                micro["sweeps"].append(sw)
                log(f"[bench] sweep {key}: best {sw['best']['config']} {sw['best']['gbps']:.0f} GB/s")
            del kb16
        if not (cfg["sweep_tiles"] and cfg["micro_model"] in cfg["models"]):
            _kernel_table(kb, cp["copy_gbps"], micro, log)
            kb = None
    micro["config"] = copy.deepcopy(KT.CONFIG)
    results["micro"] = micro

    shadow_spec = PredictorSpec.from_dict(cfg["shadowllm"])
    dejavu_spec = PredictorSpec.from_dict(cfg["dejavu"])
    modes = cfg["modes"]
    plan_list = []
    for m in cfg["models"]:
        for b in cfg["batches"] if m in cfg["batch_models"] else [1]:
            plan_list.append((m, b))
    over = False
    for model in cfg["models"]:
        shape = get(model)
        batches = [b for (m, b) in plan_list if m == model]
        if over or time.time() - t0 > budget:
            over = True
            results["rows"] += [{"model": model, "batch": b, "status": "skipped: time budget"} for b in batches]
            continue
        w = build(shape, device="cuda", seed=cfg["seed"])
        preds = {}
        if "shadowllm" in modes or any(e.get("mode") == "shadowllm" for e in cfg["extra"]):
            preds["shadowllm"] = build_shadowllm(shape, shadow_spec, device="cuda", dtype=torch.bfloat16)
        if "dejavu" in modes or any(e.get("mode") == "dejavu" for e in cfg["extra"]):
            preds["dejavu"] = build_dejavu(shape, dejavu_spec, device="cuda", dtype=torch.bfloat16)
        if cfg["sweep_tiles"] and model == cfg["micro_model"]:
            for key, cands in (
                ("row", microbench.ROW_CANDIDATES),
                ("col", microbench.COL_CANDIDATES),
                ("qkv", microbench.SMALL_ROW_CANDIDATES),
                ("o", microbench.SMALL_ROW_CANDIDATES),
                ("attn", microbench.ATTN_CANDIDATES),
            ):
                sw = microbench.engine_sweep(shape, w, key, cands)
                micro["sweeps"].append(sw)
                log(f"[bench] sweep {key} (decode steps): best {sw['best']['config']} {sw['best']['ms']:.3f} ms")
            micro["config"] = copy.deepcopy(KT.CONFIG)
            if kb is not None:  # the kernels alone, with the tiles the decode steps use
                _kernel_table(kb, cp["copy_gbps"], micro, log)
                kb = None
                gc.collect()
                torch.cuda.empty_cache()
        for b in batches:
            dense_ms = None
            for mode in modes:
                for sp in [0.0] if mode == "dense" else cfg["sparsities"]:
                    if time.time() - t0 > budget:
                        over = True
                        results["rows"].append(
                            {
                                "model": model,
                                "mode": mode,
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
                            mode=mode,
                            sparsity=sp,
                            batch=b,
                            cfg=cfg,
                            overlap=cfg["overlap"],
                            shadow_spec=shadow_spec,
                            dejavu_spec=dejavu_spec,
                            copy_gbps=cp["copy_gbps"],
                            dense_ms=dense_ms,
                        )
                    except Exception as e:  # record and go on: one call must bring back everything it can
                        row = {
                            "model": model,
                            "mode": mode,
                            "batch": b,
                            "head_sparsity": sp,
                            "status": f"error: {type(e).__name__}: {str(e)[:300]}",
                        }
                        log(f"[bench] {model} {mode} b={b} s={sp}: {row['status']}")
                    else:
                        if mode == "dense":
                            dense_ms = row["ms_per_token"]
                        log(
                            f"[bench] {model:11s} b={b:2d} {mode:9s} s={sp:.1f} {row['ms_per_token']:7.3f} ms "
                            f"{row['achieved_gbps']:6.0f} GB/s frac={row['frac_of_bound']:.2f} "
                            f"x={row['speedup_vs_dense'] or 1:.2f} (bound {row['speedup_bound']:.2f}) "
                            f"t={time.time() - t0:.0f}s"
                        )
                    results["rows"].append(row)
        if model == cfg["summary_model"]:
            for pc in cfg["profile"]:
                try:
                    pr = profile_one(
                        shape,
                        w,
                        preds,
                        mode=pc["mode"],
                        sparsity=float(pc["sparsity"]),
                        cfg=cfg,
                        shadow_spec=shadow_spec,
                        dejavu_spec=dejavu_spec,
                        copy_gbps=cp["copy_gbps"],
                    )
                except Exception as e:
                    log(f"[bench] profile {pc}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                results.setdefault("profile", []).append(pr)
                log(
                    f"[bench] profile {pr['mode']}@{pr['sparsity']:.0%}: step {pr['step_us']:.0f} us = kernels "
                    f"{pr['kernel_sum_us']:.0f} + between {pr['between_kernels_us']:.0f}; "
                    + ", ".join(
                        f"{r['part']} {r['us']:.0f}us" + (f" ({r['frac_of_copy']:.2f})" if r["frac_of_copy"] else "")
                        for r in pr["parts"]
                    )
                )
        for ex in cfg["extra"]:
            if ex.get("model") != model or time.time() - t0 > budget:
                continue
            try:
                sspec = PredictorSpec.from_dict(ex["shadowllm"]) if "shadowllm" in ex else shadow_spec
                dspec = PredictorSpec.from_dict(ex["dejavu"]) if "dejavu" in ex else dejavu_spec
                xpreds = dict(preds)
                if "shadowllm" in ex:
                    xpreds["shadowllm"] = build_shadowllm(shape, sspec, device="cuda", dtype=torch.bfloat16)
                if "dejavu" in ex:
                    xpreds["dejavu"] = build_dejavu(shape, dspec, device="cuda", dtype=torch.bfloat16)
                row = measure_one(
                    shape,
                    w,
                    xpreds,
                    mode=ex["mode"],
                    sparsity=float(ex["sparsity"]),
                    batch=int(ex.get("batch", 1)),
                    cfg=cfg,
                    overlap=bool(ex.get("overlap", cfg["overlap"])),
                    shadow_spec=sspec,
                    dejavu_spec=dspec,
                    copy_gbps=cp["copy_gbps"],
                    dense_ms=None,
                    pdl=bool(ex.get("pdl", True)),
                )
                del xpreds
                row["variant"] = ex.get("name", "extra")
                dm = next(
                    (
                        r["ms_per_token"]
                        for r in results["rows"]
                        if r.get("status") == "ok"
                        and r["model"] == model
                        and r["mode"] == "dense"
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
                log(f"[bench] extra {ex}: {type(e).__name__}: {e}")
        del w, preds
        gc.collect()
        torch.cuda.empty_cache()
    # speedups vs dense of the same model and batch
    dense_of = {
        (r["model"], r["batch"]): r["ms_per_token"]
        for r in results["rows"]
        if r.get("status") == "ok" and r["mode"] == "dense"
    }
    for r in results["rows"]:
        if r.get("status") == "ok" and (r["model"], r["batch"]) in dense_of:
            r["speedup_vs_dense"] = dense_of[(r["model"], r["batch"])] / r["ms_per_token"]
    results["summary"] = report.summarize(results["rows"], micro, cfg["summary_model"])
    results["wall_s"] = time.time() - t0
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default=None)
    ap.add_argument("--out", default="results/benchmark")
    ap.add_argument("--stem", default="h200")
    ap.add_argument("--set", action="append", default=[], help="override: key=json (e.g. models='[\"opt-1.3b\"]')")
    a = ap.parse_args(argv)
    cfg = load_params(a.params)
    for kv in a.set:
        k, v = kv.split("=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"unknown parameter {k}")
        cfg[k] = json.loads(v)
    if not torch.cuda.is_available():
        print("benchmark: no CUDA device; nothing measured")
        return 0
    from . import report

    res = run(cfg)
    paths = report.write_all(res, a.out, a.stem)
    print(report.short_table(res))
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
