"""`shadowllm compare-lmeval`: our dense scores next to lm-evaluation-harness 0.4's on the same documents.

shadowllm compare-lmeval --lmeval-out DIR --cache results/cache --limit 100 --out FILE.md
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import reported


@click.command("compare-lmeval")
@click.option("--lmeval-out", type=click.Path(path_type=Path, exists=True), required=True, help="lm-eval output_path")
@click.option("--cache", type=click.Path(path_type=Path, exists=True), default=Path("results/cache"), show_default=True)
@click.option("--limit", type=int, default=None, help="evaluate.limit of the points to compare")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Markdown file")
def cli(lmeval_out: Path, cache: Path, limit: int | None, out: Path) -> None:
    """Accuracies, stderr units and per-document agreement of our dense points and an lm-eval run."""
    from pipeline.evaluate.compare_lmeval import compare
    from pipeline.io import write_text

    with reported():
        table = compare(lmeval_out, cache, limit)
        write_text(out, table)
    click.echo(table, nl=False)
