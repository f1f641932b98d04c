"""`shadowllm`: one subcommand per DVC stage. Stage modules load only when their command runs,
so `shadowllm --help` and the GPU benchmark never import the heavy optional packages."""

from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> module in `stages/` exposing a click command named `cli`
STAGES = {
    "prepare-model": "stages.prepare_model",
    "collect": "stages.collect",
    "aggregate": "stages.aggregate",
    "train": "stages.train",
    "evaluate": "stages.evaluate",
    "benchmark": "stages.benchmark",
    "bench-collect": "stages.bench_collect",
    "claims": "stages.claims",
    "compare-lmeval": "stages.compare_lmeval",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, mod in STAGES.items() if importlib.util.find_spec(mod) is not None)

    def get_command(self, ctx, name):
        if name not in STAGES or importlib.util.find_spec(STAGES[name]) is None:
            return None
        return importlib.import_module(STAGES[name]).cli


@click.group(cls=_LazyGroup)
def main() -> None:
    """ShadowLLM pipeline stages (normally run by `dvc repro`)."""


if __name__ == "__main__":
    main()
