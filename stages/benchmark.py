"""DVC stage `benchmark`: decode latency on the GPU (dense / static / ShadowLLM / DejaVu).

    shadowllm benchmark --params params.yaml --out-dir results/benchmark/latest \
        --metrics-file results/benchmark/metrics.json [--stem benchmark] [--set benchmark.KEY=VALUE ...]

Reads `benchmark:` (pipeline/bench/params.py: BenchmarkParams; with `widths_from_train`, `train.widths`). Writes
<out-dir>/<stem>.{json,csv,md}, PNG plots and a small metrics JSON atomically; a skip is {"skipped": true, ...}.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, path, reported, set_option

NO_GPU = "no CUDA device: the latency benchmark needs a GPU (committed H200 results: results/benchmark/h200.md)"


@click.command("benchmark")
@params_option
@set_option
@path("--out-dir", "out_dir", "output directory", default=Path("results/benchmark/latest"), kind="dir")
@click.option("--stem", default="benchmark", show_default=True, help="file name stem of the outputs")
@path("--metrics-file", "metrics_file", "DVC metrics JSON", default=Path("results/benchmark/metrics.json"), kind="file")
def cli(params_path: Path, overrides: tuple[str, ...], out_dir: Path, stem: str, metrics_file: Path) -> None:
    """Decode latency on the GPU: dense / static / ShadowLLM / DejaVu (needs CUDA; otherwise records a skip)."""
    import torch

    from pipeline.bench.params import BenchmarkParams
    from pipeline.bench.report import flat_metrics, metrics_of, short_table, write_all
    from pipeline.io import write_json
    from pipeline.tracking import stage_run

    with reported():
        bp = BenchmarkParams.from_params(load_params(params_path, overrides))
        with stage_run("benchmark") as run:
            run.log_params({"benchmark": bp.as_dict()})
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
                run.set_tags({"skipped": "true", "reason": NO_GPU})
            write_json(metrics_file, metrics)
            run.log_metrics(flat_metrics(results, metrics))
            run.log_artifact(out_dir)
