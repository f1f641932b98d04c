"""What every stage command shares: user errors as one-line click errors, the params file plus `--set`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

DEBUG_ENV = "SHADOWLLM_DEBUG"


@contextmanager
def reported() -> Iterator[None]:
    """Run a stage's body; a `UserError` (bad parameter, data, model, name) becomes a one-line click error.
    With SHADOWLLM_DEBUG=1 it is re-raised with its traceback instead."""
    from pipeline.errors import UserError

    try:
        yield
    except UserError as e:
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        raise click.ClickException(str(e)) from None


def path(
    name: str, dest: str, help: str | None, *, required: bool = False, default: Any = None, kind: str = "any"
) -> Any:
    """A path option in one line: kind 'dir' / 'file' restricts it, `default` is shown."""
    t = click.Path(path_type=Path, file_okay=kind != "dir", dir_okay=kind != "file")
    return click.option(
        name, dest, type=t, required=required, default=default, show_default=default is not None, help=help
    )


params_option = path("--params", "params_path", None, default=Path("params.yaml"))
set_option = click.option(  # `--set key=value` (repeatable, value parsed as YAML): a parameter override
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a parameter, e.g. --set evaluate.limit=200 (YAML value); repeatable",
)


def load_params(path: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """params.yaml with `--set key=value` overrides applied (values parsed as YAML)."""
    from pipeline.params import load, set_override

    params = load(path)
    for o in overrides:
        set_override(params, o)
    return params
