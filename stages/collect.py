"""DVC stage `collect`: per-example activations x gradients -> importance traces (Parquet)."""

from __future__ import annotations

import time
from pathlib import Path

import click


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


@click.command("collect")
@click.option(
    "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="trace directory (Parquet shards)"
)
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), required=True, help="metrics JSON to write")
@click.option("--progress/--no-progress", default=True)
def cli(params_path: Path, out_dir: Path, metrics_path: Path, progress: bool) -> None:
    """Forward + backward over calibration examples; score every head and neuron by each criterion."""
    from pipeline import criteria as crit
    from pipeline import params as P
    from pipeline.calibration import CalibrationPlan
    from pipeline.collect import CollectSettings
    from pipeline.data.errors import DataError
    from pipeline.data.tasks import check_tasks
    from pipeline.data.tokenize import add_bos_setting
    from pipeline.models.loading import ModelError, load_config, parse_dtype

    # ---- validate everything cheap before any weights are read ----
    try:
        params = P.load(params_path)
        m, d, c = P.section(params, "model"), P.section(params, "data"), P.section(params, "collect")
        model_id = str(P.require(m, "id", "model"))
        # CollectSettings validates criteria names, storage dtype and batch/shard sizes itself.
        settings = CollectSettings(
            criteria=list(P.require(c, "criteria", "collect", list)),
            batch_size=int(c.get("batch_size", 8)),
            shard_size=int(c.get("shard_size", 64)),
            storage=str(c.get("storage", "float16")),
            layer_inputs=bool(c.get("layer_inputs", True)),
        )
        tasks = P.require(c, "tasks", "collect", list)
        check_tasks(tasks, d.get("mirror_dir"), param="collect.tasks", mirror_param="data.mirror_dir")
        plan = CalibrationPlan(
            tasks=tuple(tasks),
            mirror_dir=d.get("mirror_dir"),
            n_per_task=int(P.require(c, "n_per_task", "collect", int)),
            calib_fraction=P.check_fraction(P.require(d, "calib_fraction", "data"), "data.calib_fraction"),
            seed=int(P.require(d, "seed", "data", int)),
            num_fewshot=int(c.get("num_fewshot", 0)),
            max_tokens=int(P.require(c, "max_tokens", "collect", int)),
        )  # add_bos: the model's policy, resolved against the tokenizer once it is loaded (run_collect)
        if "add_bos" in c:
            _fail(
                "parameter collect.add_bos was replaced by model.add_bos (auto | true | false): "
                "one BOS policy per model, shared by collect and evaluate"
            )
        add_bos_setting(m)
        if plan.n_per_task < 1:
            _fail(f"parameter collect.n_per_task must be >= 1, got {plan.n_per_task}")
        if plan.max_tokens < 2:
            _fail(f"parameter collect.max_tokens must be >= 2, got {plan.max_tokens}")
        parse_dtype(str(m.get("dtype", "float32")))
        load_config(model_id, trust_remote_code=bool(m.get("trust_remote_code", False)))
    except (P.ParamError, crit.CriterionError, DataError, ModelError, ValueError) as e:
        _fail(str(e))
    run_collect(params, plan, settings, out_dir, metrics_path, progress)


def run_collect(params: dict, plan, settings, out_dir: Path, metrics_path: Path, progress: bool) -> None:
    from dataclasses import replace

    import torch

    from pipeline.calibration import build
    from pipeline.collect import collect
    from pipeline.data.tokenize import resolve_add_bos
    from pipeline.io import write_json
    from pipeline.models.adapters import resolve
    from pipeline.models.loading import fingerprint, load_from_params
    from pipeline.tracking import stage_run

    m, c = params["model"], params["collect"]
    torch.manual_seed(int(c.get("seed", 0)))
    t_load = time.perf_counter()
    model, tokenizer = load_from_params(m)
    layout = resolve(model)
    fp = fingerprint(model)
    plan = replace(plan, add_bos=resolve_add_bos(m.get("add_bos", "auto"), tokenizer))
    seqs, splits = build(plan, tokenizer)
    load_s = time.perf_counter() - t_load
    meta = {
        "model": {
            "id": str(m["id"]),
            "fingerprint": fp,
            "dims": layout.dims(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(m.get("dtype", "float32")),
        },
        "calibration": {
            "tasks": list(plan.tasks),
            "n_per_task": plan.n_per_task,
            "calib_fraction": plan.calib_fraction,
            "seed": plan.seed,
            "num_fewshot": plan.num_fewshot,
            "max_tokens": plan.max_tokens,
            "add_bos": plan.add_bos,
        },  # resolved model.add_bos (part of the shards' params_hash)
        "splits": splits,
    }
    stats = collect(model, layout, seqs, out_dir, settings, meta, progress=progress)
    write_json(out_dir / "split.json", {"seed": plan.seed, "calib_fraction": plan.calib_fraction, "tasks": splits})
    # examples/tokens/rates describe the work done by this run; *_total the whole trace set (with reused shards).
    metrics = dict(
        stats.metrics(),
        load_seconds=round(load_s, 3),
        model_fingerprint=fp,
        examples_total=len(seqs),
        tokens_total=sum(len(s.input_ids) for s in seqs),
    )
    write_json(metrics_path, metrics)
    click.echo(
        f"collect: {stats.examples} examples ({stats.resume_line()}), "
        f"{metrics['examples_per_s']:.2f} ex/s, {metrics['tokens_per_s']:.0f} tok/s, "
        f"{stats.bytes_written / 1e6:.1f} MB -> {out_dir}"
    )
    with stage_run("collect", tags={"model_fingerprint": fp}) as run:
        run.log_params({"model": m, "data": params.get("data", {}), "collect": c, "add_bos": plan.add_bos})
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


if __name__ == "__main__":
    cli()
