"""DVC stage `collect`: per-example activations x gradients -> importance traces (Parquet).

shadowllm collect --params params.yaml --out data/traces --metrics results/collect.json
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, reported, set_option


@click.command("collect")
@params_option
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="trace directory (shards)")
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), required=True, help="metrics JSON")
@set_option
@click.option("--progress/--no-progress", default=True)
def cli(params_path: Path, out_dir: Path, metrics_path: Path, overrides: tuple[str, ...], progress: bool) -> None:
    """Forward + backward over calibration examples; score every head and neuron by each criterion."""
    from dataclasses import asdict

    import torch

    from pipeline.calibration import CalibrationPlan, build, capped_tasks
    from pipeline.collect import CollectParams, collect
    from pipeline.data.tasks import check_tasks
    from pipeline.data.tokenize import resolve_add_bos
    from pipeline.io import write_json
    from pipeline.models.loading import check_model, open_model
    from pipeline.params import DataParams, ModelParams
    from pipeline.tracking import stage_run

    with reported():
        params = load_params(params_path, overrides)  # everything cheap is checked before any weights are read
        mp, dp, cp = ModelParams.from_params(params), DataParams.from_params(params), CollectParams.from_params(params)
        check_tasks(cp.tasks, dp.mirror_dir, param="collect.tasks", mirror_param="data.mirror_dir")
        check_model(mp)
        with stage_run("collect") as run:
            run.log_params({"model": mp.as_dict(), "data": dp.as_dict(), "collect": cp.as_dict()})
            torch.manual_seed(cp.seed)
            m = open_model(mp)
            run.set_tags({"model_fingerprint": m.fingerprint})
            plan = CalibrationPlan.of(dp, cp, add_bos=resolve_add_bos(mp.add_bos, m.tokenizer))
            run.log_params({"add_bos": plan.add_bos})
            seqs, splits = build(plan, m.tokenizer)
            for line in capped_tasks(plan, splits):
                click.echo(f"collect: {line}", err=True)
            calibration = {k: v for k, v in asdict(plan).items() if k != "mirror_dir"}  # resolved add_bos: hashed
            meta = {"model": m.meta(mp), "calibration": calibration, "splits": splits}
            stats = collect(m.model, m.layout, seqs, out_dir, cp, meta, progress=progress)
            split = {"seed": plan.seed, "calib_fraction": plan.calib_fraction, "tasks": splits}
            write_json(out_dir / "split.json", split)
            # examples/tokens/rates: the work of this run; *_total: the whole trace set (with reused shards)
            metrics = dict(
                stats.metrics(),
                load_seconds=round(m.load_seconds, 3),
                model_fingerprint=m.fingerprint,
                examples_total=len(seqs),
                tokens_total=sum(len(s.input_ids) for s in seqs),
            )
            write_json(metrics_path, metrics)
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    click.echo(
        f"collect: {stats.examples} examples ({stats.resume_line()}), {metrics['examples_per_s']:.2f} ex/s, "
        f"{metrics['tokens_per_s']:.0f} tok/s, {stats.bytes_written / 1e6:.1f} MB -> {out_dir}"
    )


if __name__ == "__main__":
    cli()
