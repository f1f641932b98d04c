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

from stages.common import load_params, params_option, path, reported, set_option


@click.command("evaluate")
@params_option
@path("--out", "out_dir", "report directory (results.csv, report.md, plots/)", default=Path("results/evaluate"))
@path("--metrics", "metrics_path", "metrics JSON (default: OUT/metrics.json)", kind="file")
@set_option
@click.option("--force", is_flag=True, help="ignore cached points")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@path("--records", "records_path", "every point record as gzipped JSON (for `shadowllm claims`)", kind="file")
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
    import torch

    from pipeline.evaluate.claims import save_records
    from pipeline.evaluate.config import parse
    from pipeline.evaluate.report import flat_metrics, write_all
    from pipeline.evaluate.runner import Evaluator
    from pipeline.io import write_json
    from pipeline.models.loading import check_model, open_model
    from pipeline.tracking import stage_run

    with reported():
        cfg = parse(load_params(params_path, overrides))  # everything checkable without the model's weights
        cfg.check_inputs()
        check_model(cfg.model)
        if threads:
            torch.set_num_threads(threads)
        with stage_run("evaluate") as run:
            run.log_params(cfg.logged())
            m = open_model(cfg.model)
            run.set_tags({"model_fingerprint": m.fingerprint})
            ev = Evaluator(cfg, m.model, m.tokenizer, m.layout, m.fingerprint, model_id=cfg.model.id, log=click.echo)
            run.log_params({"add_bos": ev.cfg.add_bos})  # the resolved model.add_bos
            click.echo(
                f"evaluate: model {cfg.model.id} ({m.fingerprint}) loaded in {m.load_seconds:.1f}s; {ev.plan_line()}"
            )
            t0 = time.perf_counter()
            records = ev.run(force=force)
            eval_s = time.perf_counter() - t0
            for t in cfg.tasks:
                ev.task_data(t)  # the split record of every task, also when all points were cached
            out = write_all(out_dir, records, cfg, ev.report_info(), metrics_path)
            split = {"seed": cfg.seed, "calib_fraction": cfg.calib_fraction, "tasks": ev.splits}
            write_json(out_dir / "split.json", split)
            if records_path is not None:
                save_records(records_path, [{k: v for k, v in r.items() if k != "cached"} for r in records])
            n_new = sum(not r["cached"] for r in records)
            timing = {"load_seconds": m.load_seconds, "eval_seconds": eval_s, "points_evaluated": n_new}
            run.log_metrics({**flat_metrics(out["metrics_full"]), **timing, "points_cached": len(records) - n_new})
            run.log_artifact(out_dir)
    click.echo(
        f"evaluate: {len(records)} points ({n_new} evaluated, {len(records) - n_new} cached) in {eval_s:.1f}s "
        f"-> {out_dir}"
    )


if __name__ == "__main__":
    cli()
