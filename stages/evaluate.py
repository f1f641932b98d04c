"""DVC stage `evaluate`: perplexity and zero-shot accuracy of dense, static and contextual masks.

    shadowllm evaluate --params params.yaml --out results/evaluate --metrics results/evaluate/metrics.json
    shadowllm evaluate ... --set evaluate.sparsities='[0.3,0.5,0.7]' --set evaluate.limit=200

Every (method, sparsity, task) point is cached under `evaluate.cache_dir`, so a rerun with one more
sparsity level only evaluates the new points.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def preflight(params: dict):
    """Validate every parameter and input path that can be checked without the model's weights."""
    from pipeline import params as P
    from pipeline.evaluate.config import parse
    from pipeline.models.loading import load_config, parse_dtype

    cfg = parse(params)
    m = P.section(params, "model")
    model_id = str(P.require(m, "id", "model"))
    parse_dtype(str(m.get("dtype", "float32")))
    from pipeline.evaluate import methods as M

    for meth in cfg.methods:
        needs = M.info(meth.name)["needs"]
        if needs == "scores":
            if not cfg.scores_dir:
                raise P.ParamError(f"parameter evaluate.scores_dir is required by method {meth.name}:{meth.criterion}")
            if not (Path(cfg.scores_dir) / "scores.json").is_file():
                raise P.ParamError(
                    f"parameter evaluate.scores_dir: {cfg.scores_dir}/scores.json not found "
                    f"(run the aggregate stage first)"
                )
        if needs == "predictor":
            if not cfg.predictors_dir:
                raise P.ParamError(f"parameter evaluate.predictors_dir is required by method {meth.label}")
            d = Path(cfg.predictors_dir) / f"{meth.name}-{meth.criterion}"
            if not d.is_dir():
                raise P.ParamError(
                    f"parameter evaluate.predictors_dir: no predictor {d} for method {meth.label} "
                    f"(run the train stage for {meth.name} with criterion {meth.criterion})"
                )
    load_config(model_id, trust_remote_code=bool(m.get("trust_remote_code", False)))
    return cfg


@click.command("evaluate")
@click.option(
    "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("results/evaluate"),
    show_default=True,
    help="report directory (results.csv, summary.csv, report.md, plots/)",
)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(path_type=Path),
    default=None,
    help="metrics JSON (default: OUT/metrics.json)",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a parameter, e.g. --set evaluate.limit=200 (value parsed as YAML); repeatable",
)
@click.option("--force", is_flag=True, help="ignore cached points")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option(
    "--records",
    "records_path",
    type=click.Path(path_type=Path),
    default=None,
    help="also write every point record (per-example outcomes, per-window logliks) as gzipped JSON, "
    "the input of `shadowllm claims`",
)
def cli(
    params_path: Path,
    out_dir: Path,
    metrics_path: Path | None,
    overrides: tuple[str, ...],
    force: bool,
    threads: int | None,
    records_path: Path | None,
) -> None:
    """Evaluate dense/static/oracle/ShadowLLM/DejaVu masks: WikiText-2 perplexity, zero-shot accuracy."""
    from pipeline import params as P
    from pipeline.data.errors import DataError
    from pipeline.models.loading import ModelError

    try:
        params = P.load(params_path)
        from pipeline.params import set_override

        for o in overrides:
            set_override(params, o)
        cfg = preflight(params)
    except (P.ParamError, DataError, ModelError) as e:
        _fail(str(e))
    run_evaluate(params, cfg, out_dir, metrics_path, force, threads, records_path)


def run_evaluate(
    params: dict,
    cfg,
    out_dir: Path,
    metrics_path: Path | None,
    force: bool,
    threads: int | None,
    records_path: Path | None = None,
) -> None:
    import torch

    from pipeline.evaluate.report import write_all
    from pipeline.evaluate.runner import Evaluator
    from pipeline.io import write_json
    from pipeline.models.adapters import resolve
    from pipeline.models.loading import fingerprint, load_from_params
    from pipeline.tracking import stage_run

    if threads:
        torch.set_num_threads(threads)
    m = params["model"]
    t0 = time.perf_counter()
    model, tokenizer = load_from_params(m)
    layout = resolve(model)
    fp = fingerprint(model)
    load_s = time.perf_counter() - t0
    ev = Evaluator(cfg, model, tokenizer, layout, fp, model_id=str(m["id"]), log=click.echo)
    click.echo(
        f"evaluate: model {m['id']} ({fp}) loaded in {load_s:.1f}s; "
        f"{len(cfg.methods)} methods x {len(cfg.sparsities)} sparsities, tasks {', '.join(cfg.tasks)}"
        f"{', ' + cfg.ppl_task if cfg.ppl_task else ''}; BOS {'on' if ev.cfg.add_bos else 'off'}"
    )
    t1 = time.perf_counter()
    records = ev.run(force=force)
    eval_s = time.perf_counter() - t1
    for t in cfg.tasks:
        ev.task_data(t)  # the split record of every task, also when all points were cached
    info = {
        "model": str(m["id"]),
        "fingerprint": fp,
        "scope": cfg.scope,
        "pools": cfg.pools,
        "granularity": cfg.granularity,
        "seed": cfg.seed,
        "calib_fraction": cfg.calib_fraction,
        "limit": cfg.raw.get("limit"),
        "seq_len": cfg.seq_len,
        "max_windows": cfg.max_windows,
        "cache_dir": cfg.cache_dir,
        "add_bos": ev.cfg.add_bos,
    }  # the resolved model.add_bos
    out = write_all(out_dir, records, cfg, info, metrics_path)
    write_json(out_dir / "split.json", {"seed": cfg.seed, "calib_fraction": cfg.calib_fraction, "tasks": ev.splits})
    if records_path is not None:
        from pipeline.evaluate.claims import save_records

        save_records(records_path, [{k: v for k, v in r.items() if k != "cached"} for r in records])
    n_new = sum(not r["cached"] for r in records)
    click.echo(
        f"evaluate: {len(records)} points ({n_new} evaluated, {len(records) - n_new} cached) in {eval_s:.1f}s "
        f"-> {out_dir}"
    )
    with stage_run("evaluate", tags={"model_fingerprint": fp}) as run:
        run.log_params({"model": m, "data": params.get("data", {}), "evaluate": cfg.raw, "add_bos": ev.cfg.add_bos})
        flat = {}
        for label, by_s in out["metrics"].items():
            for s, vals in by_s.items():
                for k, v in vals.items():
                    flat[f"{label}/{s}/{k}"] = v
        flat.update(
            {
                "load_seconds": load_s,
                "eval_seconds": eval_s,
                "points_evaluated": n_new,
                "points_cached": len(records) - n_new,
            }
        )
        run.log_metrics(flat)
        run.log_artifact(out_dir)


if __name__ == "__main__":
    cli()
