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
    "research-report": "stages.research_report",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        stages = [name for name, mod in STAGES.items() if importlib.util.find_spec(mod) is not None]
        return sorted(stages + list(self.commands))

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        if name not in STAGES or importlib.util.find_spec(STAGES[name]) is None:
            return None
        return importlib.import_module(STAGES[name]).cli


@click.group(cls=_LazyGroup)
def main() -> None:
    """ShadowLLM pipeline stages (normally run by `dvc repro`)."""


@main.command("lm-eval", context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def lm_eval(argv: tuple[str, ...]) -> None:
    """lm-evaluation-harness's own CLI with `--model shadowllm` registered (docs/lmeval.md)."""
    from stages.common import reported

    with reported():
        from pipeline.evaluate.lmeval_lm import harness_main

        harness_main(list(argv))


if __name__ == "__main__":
    main()
