"""`shadowllm research-report RUN`: a research run's records, train tables and stage figures -> RUN/report.md,
summary.csv, results.csv, plots/*.png (pipeline/evaluate/research.py), logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import reported


@click.command("research-report")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--title", default=None, help="report title (default: the run directory's name)")
@click.option(
    "--run",
    "runs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="merge these runs of one calibration into RUN's report (repeat; default: RUN itself)",
)
def cli(run: Path, title: str | None, runs: tuple[Path, ...]) -> None:
    """Tables, plots and claims of one research run directory, or of several runs merged into RUN (see
    pipeline/evaluate/research.py)."""
    from pipeline.evaluate.research import build, headline_metrics
    from pipeline.tracking import stage_run

    with reported(), stage_run("research-report", tags={"run": str(run)}) as tracked:
        out = build(run, title, list(runs) or None)
        tracked.log_metrics(headline_metrics(out["summary"]))
        for f in out["files"]:
            tracked.log_artifact(run / f)
    click.echo(f"research-report: {out['records']} point records -> {', '.join(out['files'][-3:])} in {run}")
