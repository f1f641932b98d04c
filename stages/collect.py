"""DVC stage `collect`: per-example activations x gradients -> importance traces (Parquet).

shadowllm collect --params params.yaml --out data/traces --metrics results/collect.json
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, path, reported, set_option


@click.command("collect")
@params_option
@path("--out", "out_dir", "trace directory (shards)", required=True)
@path("--metrics", "metrics_path", "metrics JSON", required=True)
@set_option
@click.option("--progress/--no-progress", default=True)
def cli(params_path: Path, out_dir: Path, metrics_path: Path, overrides: tuple[str, ...], progress: bool) -> None:
    """Forward + backward over calibration examples; score every head and neuron by each criterion."""
    import torch

    from pipeline import collect_run
    from pipeline.calibration import build, capped_tasks
    from pipeline.collect import collect
    from pipeline.io import write_json
    from pipeline.models.loading import check_model, open_model
    from pipeline.tracking import stage_run

    with reported():
        mp, dp, cp = collect_run.checked_params(load_params(params_path, overrides))  # before any weights are read
        check_model(mp)
        with stage_run("collect") as run:
            run.log_params({"model": mp.as_dict(), "data": dp.as_dict(), "collect": cp.as_dict()})
            torch.manual_seed(cp.seed)
            m = open_model(mp)
            run.set_tags({"model_fingerprint": m.fingerprint})
            plan = collect_run.calibration_plan(mp, dp, cp, m.tokenizer)
            run.log_params({"add_bos": plan.add_bos})
            seqs, splits = build(plan, m.tokenizer)
            for line in capped_tasks(plan, splits):
                click.echo(f"collect: {line}", err=True)
            meta = collect_run.trace_meta(m, mp, plan, splits)
            stats = collect(m.model, m.layout, seqs, out_dir, cp, meta, progress=progress)
            write_json(out_dir / "split.json", collect_run.split_record(plan, splits))
            metrics = collect_run.run_metrics(stats, m, seqs)
            write_json(metrics_path, metrics)
            run.log_metrics(collect_run.numeric(metrics))
    click.echo(collect_run.summary(stats, metrics, out_dir))
