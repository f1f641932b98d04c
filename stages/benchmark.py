"""DVC stage `benchmark`: decode latency on the GPU (dense / static / ShadowLLM / DejaVu).

    shadowllm benchmark --params params.yaml --out-dir results/benchmark/latest \
        --metrics-file results/benchmark/metrics.json [--stem benchmark] [--set benchmark.KEY=VALUE ...]

Reads `benchmark:` (pipeline/bench/params.py: BenchmarkParams; with `widths_from_train`, `train.widths`). Writes
<out-dir>/<stem>.{json,csv,md} and PNG plots, and a small metrics JSON, all atomically. Without a CUDA device it
prints one line and records {"skipped": true, "reason": ...}. MLflow logging is lazy (pipeline.tracking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stages.common import load_params, params_option, reported

NO_GPU = "no CUDA device: the latency benchmark needs a GPU (committed H200 results: results/benchmark/h200.md)"


def metrics_of(results: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics: targets and the headline numbers (full table in the out dir)."""
    ok = [r for r in results.get("rows", []) if r.get("status") == "ok"]
    return {
        "skipped": False,
        "device": results.get("device"),
        "copy_gbps": results.get("copy", {}).get("copy_gbps"),
        "targets": {
            k: {"value": v.get("value"), "target": v.get("target"), "met": v.get("met")}
            for k, v in results.get("summary", {}).items()
        },
        "configs": {
            f"{r['model']}/b{r['batch']}/{r['method']}@{round(r['head_sparsity'] * 100)}": {
                "ms_per_token": r["ms_per_token"],
                "frac_of_bound": r["frac_of_bound"],
                "speedup_vs_dense": r.get("speedup_vs_dense"),
            }
            for r in ok
            if r["head_sparsity"] in (0.0, 0.5)
        },
        "n_measured": len(ok),
        "n_not_measured": len(results.get("rows", [])) - len(ok),
    }


def flat_metrics(results: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers logged to MLflow: target values, ms/token and fraction of the bound per configuration."""
    flat = {f"target.{k}": v["value"] for k, v in metrics.get("targets", {}).items() if _is_num(v.get("value"))}
    for r in (results or {}).get("rows", []):
        if r.get("status") == "ok":
            key = f"{r['model']}.b{r['batch']}.{r['method']}.s{round(r['head_sparsity'] * 100)}"
            flat[f"ms.{key}"] = r["ms_per_token"]
            flat[f"frac_bound.{key}"] = r["frac_of_bound"]
    return flat


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@click.command("benchmark")
@params_option
@click.option("--set", "overrides", multiple=True, help="key=value (YAML) override, e.g. benchmark.repeats=3")
@click.option("--out-dir", default="results/benchmark/latest", show_default=True, type=click.Path(path_type=Path))
@click.option("--stem", default="benchmark", show_default=True, help="file name stem of the outputs")
@click.option(
    "--metrics-file", default="results/benchmark/metrics.json", show_default=True, type=click.Path(path_type=Path)
)
def cli(params_path: Path, overrides: tuple[str, ...], out_dir: Path, stem: str, metrics_file: Path) -> None:
    """Decode latency on the GPU: dense / static / ShadowLLM / DejaVu (needs CUDA; otherwise records a skip)."""
    import torch

    from pipeline.bench.params import BenchmarkParams
    from pipeline.bench.report import short_table, write_all
    from pipeline.io import write_json

    with reported():
        bp = BenchmarkParams.from_params(load_params(params_path, overrides))
    results = None
    if torch.cuda.is_available():
        from pipeline.bench import run_all

        results = run_all.run(bp)
        write_all(results, out_dir, stem)
        metrics = metrics_of(results)
        click.echo(short_table(results))
    else:
        click.echo(f"benchmark: skipped, {NO_GPU}")
        metrics = {"skipped": True, "reason": NO_GPU}
        write_json(out_dir / f"{stem}.json", {**metrics, "params": bp.as_dict()})
    write_json(metrics_file, metrics)
    log_mlflow(bp, results, metrics, out_dir)


def log_mlflow(bp: Any, results: dict[str, Any] | None, metrics: dict[str, Any], out_dir: Path) -> None:
    from pipeline.tracking import stage_run

    with stage_run("benchmark") as run:
        run.log_params({"benchmark": bp.as_dict()})
        if metrics.get("skipped"):
            run.set_tags({"skipped": "true", "reason": str(metrics.get("reason"))})
        run.log_metrics(flat_metrics(results, metrics))
        run.log_artifact(out_dir)


if __name__ == "__main__":
    cli()
