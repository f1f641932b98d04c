"""DVC stage `evaluate`: perplexity and zero-shot accuracy of dense, static and contextual masks.

    shadowllm evaluate --params params.yaml --out results/evaluate --metrics results/evaluate/metrics.json
    shadowllm evaluate ... --set evaluate.sparsities='[0.3,0.5,0.7]' --set evaluate.limit=200

Every (method, sparsity, task) point is cached under `evaluate.cache_dir`: a rerun evaluates new points only.
"""

from __future__ import annotations

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

    from pipeline.evaluate.config import parse
    from pipeline.evaluate.runner import sweep
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
            records, eval_s = sweep(cfg, m, run, out_dir, metrics_path, records_path, force=force, log=click.echo)
    n_new = sum(not r["cached"] for r in records)
    click.echo(
        f"evaluate: {len(records)} points ({n_new} evaluated, {len(records) - n_new} cached) in {eval_s:.1f}s "
        f"-> {out_dir}"
    )
