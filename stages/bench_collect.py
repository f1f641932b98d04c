"""`shadowllm bench-collect`: collection throughput (not a DVC stage).

    shadowllm bench-collect [--params params.yaml] [--set collect.batch_size=8] [--save-sequences seqs.json]
    shadowllm bench-collect --config DIR --sequences seqs.json --set model.device=cuda --set model.dtype=bfloat16

The first form loads `model.id` and builds the calibration sequences of `data:` / `collect:` (`--n-per-task`
each); the second times random weights of a config over sequences saved by the first (no checkpoint needed).
Criteria sets (`--sets`): plainact, predictable (5 cheap per-example criteria), all (nine).
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, path, reported, set_option


@click.command("bench-collect")
@params_option
@set_option
@click.option("--n-per-task", type=int, default=4, show_default=True, help="calibration examples per task")
@click.option("--sets", default="plainact,predictable,all", show_default=True, help="criteria sets (see the docstring)")
@click.option("--repeats", type=int, default=1, show_default=True, help="best of this many timings")
@path("--out", "out_path", "write the JSON result here", kind="file")
@path("--save-sequences", "save_sequences", "also save the tokenised sequences (to time them elsewhere)", kind="file")
@click.option("--config", default=None, help="random weights of this config (directory with config.json, or id)")
@path("--sequences", "sequences", "with --config: sequences from --save-sequences", kind="file")
def cli(
    params_path: Path,
    overrides: tuple[str, ...],
    n_per_task: int,
    sets: str,
    repeats: int,
    out_path: Path | None,
    save_sequences: Path | None,
    config: str | None,
    sequences: Path | None,
) -> None:
    """Print examples/s and tokens/s of collect, and its time relative to a bare forward+backward."""
    from pipeline import collect_bench
    from pipeline.io import write_json

    if (config is None) != (sequences is None):
        raise click.UsageError("--config and --sequences go together")
    with reported():  # everything cheap is checked before any weights are read
        params = load_params(params_path, (f"collect.n_per_task={n_per_task}", *overrides))
        chosen = collect_bench.criteria_sets(sets.split(","))
        model, layout, seqs, cp = collect_bench.inputs(params, config, sequences)
        if save_sequences:
            collect_bench.save_sequences(seqs, save_sequences)
        res = collect_bench.measure(model, layout, seqs, chosen, cp, repeats=repeats)
    click.echo(collect_bench.format_table(res))
    if out_path:
        write_json(out_path, res)
