"""What every stage command shares: user errors as one-line click errors, the params file plus `--set`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click


@contextmanager
def reported() -> Iterator[None]:
    """Run a stage's body; a `UserError` (bad parameter, data, model, name) becomes a one-line click error."""
    from pipeline.errors import UserError

    try:
        yield
    except UserError as e:
        raise click.ClickException(str(e)) from None


def params_option(f: Any) -> Any:
    return click.option(
        "--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"), show_default=True
    )(f)


def load_params(path: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """params.yaml with `--set key=value` overrides applied (values parsed as YAML)."""
    from pipeline.params import load, set_override

    params = load(path)
    for o in overrides:
        set_override(params, o)
    return params
