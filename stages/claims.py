"""`shadowllm claims`: paired method comparisons (accuracy and perplexity, with stderr and a verdict) from
the point records of one or more `shadowllm evaluate --records` runs (e.g. heads-only and heads+neurons)."""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import reported


@click.command("claims")
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Markdown file")
@click.option("--header", default="", help="Markdown placed before the tables")
def cli(records: tuple[Path, ...], out_path: Path, header: str) -> None:
    """Answer the comparison's claims from evaluate point records."""
    from pipeline.evaluate.claims import load_records, split_tasks, write_claims

    with reported():
        recs = load_records(list(records))
        tasks, ppl = split_tasks(recs)
        write_claims(out_path, recs, tasks, ppl, header=header)
    click.echo(f"claims: {len(recs)} point records, tasks {', '.join(tasks)}{', ' + ppl if ppl else ''} -> {out_path}")
