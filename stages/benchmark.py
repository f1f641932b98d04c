"""`benchmark` stage: decode latency of dense / static / ShadowLLM / DejaVu on the GPU (SPEC §8).

    shadowllm benchmark --params params.yaml --out-dir results/benchmark/latest \
        --metrics-file results/benchmark/metrics.json

Reads `benchmark:` from the params file (keys: see pipeline/bench/run_all.py DEFAULTS; with
`widths_from_train: true`, predictor widths come from `train.widths.shadowllm` / `train.widths.dejavu_lookahead`
when present). Writes <out-dir>/benchmark.{json,csv,md} and PNG plots, and a small metrics JSON, all
atomically. Without a CUDA device it prints one line and records {"skipped": true, "reason": ...}.
MLflow logging is lazy (pipeline.tracking), so the GPU path never imports mlflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

TRAIN_KIND = {"shadowllm": "shadowllm", "dejavu": "dejavu_lookahead"}


def bench_params(params: dict[str, Any]) -> dict[str, Any]:
    from pipeline.bench.run_all import DEFAULTS, load_params

    sec = dict(params.get("benchmark") or {})
    from_train = bool(sec.pop("widths_from_train", False))
    cfg = load_params(None)
    unknown = set(sec) - set(DEFAULTS)
    if unknown:
        from pipeline.params import ParamError

        raise ParamError(f"unknown parameters benchmark.{', benchmark.'.join(sorted(unknown))}")
    cfg.update(sec)
    if from_train:
        widths = (params.get("train") or {}).get("widths") or {}
        for mode, kind in TRAIN_KIND.items():
            if isinstance(widths.get(kind), dict):
                cfg[mode] = dict(widths[kind])
    return cfg


def metrics_of(results: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics: targets and the headline numbers (full table in the out dir)."""
    m: dict[str, Any] = {
        "skipped": False,
        "device": results.get("device"),
        "copy_gbps": results.get("copy", {}).get("copy_gbps"),
        "targets": {},
    }
    for k, v in results.get("summary", {}).items():
        m["targets"][k] = {"value": v.get("value"), "target": v.get("target"), "met": v.get("met")}
    per: dict[str, Any] = {}
    for r in results.get("rows", []):
        if r.get("status") != "ok" or r["head_sparsity"] not in (0.0, 0.5):
            continue
        key = f"{r['model']}/b{r['batch']}/{r['mode']}@{round(r['head_sparsity'] * 100)}"
        per[key] = {
            "ms_per_token": r["ms_per_token"],
            "frac_of_bound": r["frac_of_bound"],
            "speedup_vs_dense": r.get("speedup_vs_dense"),
        }
    m["configs"] = per
    m["n_measured"] = sum(1 for r in results.get("rows", []) if r.get("status") == "ok")
    m["n_not_measured"] = sum(1 for r in results.get("rows", []) if r.get("status") != "ok")
    return m


def log_mlflow(cfg: dict, results: dict | None, metrics: dict, out_dir: Path) -> None:
    try:
        from pipeline.tracking import stage_run
    except ImportError:
        return
    with stage_run("benchmark") as run:
        run.log_params({"benchmark": cfg})
        flat: dict[str, float] = {}
        for k, v in metrics.get("targets", {}).items():
            if isinstance(v.get("value"), (int, float)):
                flat[f"target.{k}"] = v["value"]
        for r in (results or {}).get("rows", []):
            if r.get("status") == "ok":
                key = f"{r['model']}.b{r['batch']}.{r['mode']}.s{round(r['head_sparsity'] * 100)}"
                flat[f"ms.{key}"] = r["ms_per_token"]
                flat[f"frac_bound.{key}"] = r["frac_of_bound"]
        if metrics.get("skipped"):
            run.set_tags({"skipped": "true", "reason": str(metrics.get("reason"))})
        run.log_metrics(flat)
        if out_dir.is_dir():
            run.log_artifact(out_dir)


@click.command("benchmark")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--out-dir", default="results/benchmark/latest", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--metrics-file", default="results/benchmark/metrics.json", show_default=True, type=click.Path(path_type=Path)
)
def cli(params_path: str, out_dir: Path, metrics_file: Path) -> None:
    """Decode latency on the GPU: dense / static / ShadowLLM / DejaVu (needs CUDA; otherwise records a skip)."""
    from pipeline.bench.report import atomic_write, write_all
    from pipeline.params import load

    cfg = bench_params(load(params_path))
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        reason = "no CUDA device: the latency benchmark needs a GPU (committed H200 results: results/benchmark/h200.md)"
        print(f"benchmark: skipped, {reason}")
        metrics = {"skipped": True, "reason": reason}
        atomic_write(out_dir / "benchmark.json", json.dumps({**metrics, "params": cfg}, indent=1))
        atomic_write(metrics_file, json.dumps(metrics, indent=1))
        log_mlflow(cfg, None, metrics, out_dir)
        return
    from pipeline.bench import run_all
    from pipeline.bench.report import short_table

    results = run_all.run(cfg)
    write_all(results, out_dir, "benchmark")
    metrics = metrics_of(results)
    atomic_write(metrics_file, json.dumps(metrics, indent=1, default=str))
    print(short_table(results))
    log_mlflow(cfg, results, metrics, out_dir)


if __name__ == "__main__":
    cli()
