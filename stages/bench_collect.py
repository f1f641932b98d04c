"""`shadowllm bench-collect`: collection throughput on the configured model (not a DVC stage)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench-collect")
@click.option(
    "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True
)
@click.option("--n-per-task", type=int, default=4, show_default=True, help="calibration examples per task")
@click.option(
    "--sets",
    default="plainact,predictable,all",
    show_default=True,
    help="criteria sets: plainact, predictable (5 cheap per-example criteria), all (nine)",
)
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="write the JSON result here")
@click.option(
    "--save-sequences",
    type=click.Path(path_type=Path),
    default=None,
    help="also save the tokenised sequences (to time the same batches elsewhere, e.g. on a GPU)",
)
def cli(
    params_path: Path, n_per_task: int, sets: str, repeats: int, out_path: Path | None, save_sequences: Path | None
) -> None:
    """Print examples/s and tokens/s of collect, and its time relative to a bare forward+backward."""
    from pipeline import params as P
    from pipeline.calibration import CalibrationPlan, build
    from pipeline.collect import CollectParams
    from pipeline.collect_bench import CRITERIA_SETS, format_table, measure
    from pipeline.collect_bench import save_sequences as save
    from pipeline.data.tokenize import resolve_add_bos
    from pipeline.io import write_json
    from pipeline.models.adapters import resolve
    from pipeline.models.loading import load_from_params

    params = P.load(params_path)
    m, d, c = params["model"], params["data"], params["collect"]
    unknown = [s for s in sets.split(",") if s not in CRITERIA_SETS]
    if unknown:
        raise click.ClickException(f"unknown --sets {unknown}; known: {', '.join(CRITERIA_SETS)}")
    model, tok = load_from_params(m)
    plan = CalibrationPlan(
        tasks=tuple(c["tasks"]),
        mirror_dir=d.get("mirror_dir"),
        n_per_task=n_per_task,
        calib_fraction=float(d["calib_fraction"]),
        seed=int(d["seed"]),
        num_fewshot=int(c.get("num_fewshot", 0)),
        max_tokens=int(c["max_tokens"]),
        add_bos=resolve_add_bos(m.get("add_bos", "auto"), tok),
    )
    seqs, _ = build(plan, tok)
    if save_sequences:
        save(seqs, save_sequences)
    res = measure(
        model,
        resolve(model),
        seqs,
        {k: CRITERIA_SETS[k] for k in sets.split(",")},
        CollectParams.from_params(params),
        repeats=repeats,
    )
    click.echo(format_table(res))
    if out_path:
        write_json(out_path, res)


if __name__ == "__main__":
    cli()
