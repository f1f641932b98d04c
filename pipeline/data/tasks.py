"""Task registry: one YAML file per task under ``tasks/``, loaded into ``TaskSpec``; examples rendered from
the local mirror or the Hugging Face hub, both read through ``datasets`` (imported lazily): a mirror file with
the ``json`` builder (``.jsonl`` and ``.jsonl.gz``; WikiText's raw text with the ``text`` builder), cached as
Arrow files under ``datasets_cache()`` (``$SHADOWLLM_DATASETS_CACHE``, default ``<tmp>/shadowllm-datasets``), so
the mirror and the hub give rows of the same types (a column's values share one Arrow type, a key absent from a
row is None) and a second read maps the Arrow file instead of parsing JSON again.

Prompts follow lm-evaluation-harness 0.4: ``context`` is doc_to_text, ``choices`` doc_to_choice, ``gold``
doc_to_target (an index); each continuation is ``target_delimiter + choice``. With ``continuation`` set
(lm-eval's ``multiple_inputs``, Winogrande), the choices are appended to the context instead and every
option shares the continuation ``target_delimiter + continuation``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .errors import DataError
from .templates import compile_expression, compile_template

__all__ = [
    "KINDS",
    "TASK_DIR",
    "DataError",
    "Example",
    "TaskSpec",
    "check_tasks",
    "datasets_cache",
    "get_task",
    "list_tasks",
    "load_examples",
    "load_text",
]

TASK_DIR = Path(__file__).resolve().parent / "tasks"
KINDS = ("multiple_choice", "perplexity", "loglikelihood")
MIRROR_PARAM = "data.mirror_dir"
TASKS_PARAM = "tasks"
CACHE_ENV = "SHADOWLLM_DATASETS_CACHE"  # where `datasets` keeps the mirror's Arrow files (never ~/.cache)


@dataclass(frozen=True)
class Example:
    """One scored item: choice i is ``contexts[i] + continuations[i]``; ``gold`` indexes the right one."""

    id: str
    task: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @property
    def shared_context(self) -> bool:
        """True when every choice has the same context (all tasks but Winogrande)."""
        return all(c == self.contexts[0] for c in self.contexts)


@dataclass(frozen=True)
class TaskSpec:
    """A task as parsed from its YAML file (see ``tasks/piqa.yaml`` for the layout)."""

    name: str
    kind: str
    metrics: tuple[str, ...]
    split: str  # the split the mirror holds (default for mirror loading)
    mirror_files: dict[str, str] = field(hash=False)  # split -> path relative to the mirror dir
    hub_path: str = ""
    hub_name: str | None = None
    hub_split: str = ""  # default split for hub loading
    hub_text_field: str = "text"  # perplexity tasks: the text column
    context: str = ""  # jinja template (doc_to_text)
    choices: str = ""  # jinja expression -> list[str] (doc_to_choice)
    gold: str = ""  # jinja expression -> int (doc_to_target)
    continuation: str | None = None  # jinja template; set = multiple_inputs (Winogrande)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    text_join: str = "\n\n"  # perplexity tasks: how rows are joined into one text
    lm_eval_task: str = ""  # the lm-evaluation-harness task this reproduces
    description: str = ""
    source: str = ""  # the YAML file

    def mirror_file(self, split: str | None = None) -> str:
        """Relative mirror path of ``split`` (default: the mirror's split)."""
        split = split or self.split
        if split not in self.mirror_files:
            raise DataError(
                f"task '{self.name}' has no mirror file for split '{split}' (param split); "
                f"available: {', '.join(sorted(self.mirror_files))}"
            )
        return self.mirror_files[split]


_TOP_KEYS = {"name", "kind", "metrics", "mirror", "hub", "prompt", "text_join", "lm_eval_task", "description"}
_PROMPT_KEYS = {"context", "choices", "gold", "continuation", "target_delimiter", "fewshot_delimiter"}


def _parse_spec(path: Path) -> TaskSpec:
    """Validate and convert one YAML file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a task file must be a mapping")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "kind", "mirror", "hub"):
        if key not in raw:
            raise DataError(f"{path}: missing key '{key}'")
    kind = raw["kind"]
    if kind not in KINDS:
        raise DataError(f"{path}: kind '{kind}' is not one of {', '.join(KINDS)}")
    if raw["name"] != path.stem:
        raise DataError(f"{path}: name '{raw['name']}' must equal the file name '{path.stem}'")
    mirror, hub = raw["mirror"] or {}, raw["hub"] or {}
    if "split" not in mirror or not isinstance(mirror.get("files"), dict) or mirror["split"] not in mirror["files"]:
        raise DataError(f"{path}: mirror needs 'split' and 'files' with an entry for that split")
    if "path" not in hub:
        raise DataError(f"{path}: hub needs 'path'")
    prompt = raw.get("prompt") or {}
    unknown = set(prompt) - _PROMPT_KEYS
    if unknown:
        raise DataError(f"{path}: unknown prompt keys {sorted(unknown)}; allowed: {sorted(_PROMPT_KEYS)}")
    if kind != "perplexity":
        for key in ("context", "choices", "gold"):
            if key not in prompt:
                raise DataError(f"{path}: prompt needs '{key}' for a {kind} task")
        where = str(path)
        compile_template(prompt["context"], where)
        compile_expression(prompt["choices"], where)
        compile_expression(str(prompt["gold"]), where)
        if prompt.get("continuation") is not None:
            compile_template(prompt["continuation"], where)
    return TaskSpec(
        name=raw["name"],
        kind=kind,
        metrics=tuple(raw.get("metrics") or ()),
        split=str(mirror["split"]),
        mirror_files={str(k): str(v) for k, v in mirror["files"].items()},
        hub_path=str(hub["path"]),
        hub_name=hub.get("name"),
        hub_split=str(hub.get("split", mirror["split"])),
        hub_text_field=str(hub.get("text_field", "text")),
        context=prompt.get("context", ""),
        choices=prompt.get("choices", ""),
        gold=str(prompt.get("gold", "")),
        continuation=prompt.get("continuation"),
        target_delimiter=prompt.get("target_delimiter", " "),
        fewshot_delimiter=prompt.get("fewshot_delimiter", "\n\n"),
        text_join=raw.get("text_join", "\n\n"),
        lm_eval_task=raw.get("lm_eval_task", ""),
        description=raw.get("description", ""),
        source=str(path),
    )


@lru_cache(maxsize=1)
def _registry() -> dict[str, TaskSpec]:
    return {p.stem: _parse_spec(p) for p in sorted(TASK_DIR.glob("*.yaml"))}


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_registry())


def get_task(name: str, *, param: str = TASKS_PARAM) -> TaskSpec:
    """The spec of task ``name``; ``param`` is the params.yaml key named in the error."""
    reg = _registry()
    if not isinstance(name, str) or name not in reg:
        raise DataError(f"unknown task {name!r} (params: {param}); known: {', '.join(sorted(reg))}")
    return reg[name]


# ----------------------------------------------------------------------------------------- reading rows


def _mirror_path(spec: TaskSpec, mirror_dir: str | Path, split: str | None, param: str) -> Path:
    root = Path(mirror_dir)
    if not root.is_dir():
        raise DataError(f"mirror directory {root} not found (param {param})")
    path = root / spec.mirror_file(split)
    if not path.is_file():
        raise DataError(f"missing mirror file {path} for task '{spec.name}' (param {param})")
    return path


def datasets_cache() -> Path:
    """The ``cache_dir`` of every ``datasets.load_dataset`` call here: ``$SHADOWLLM_DATASETS_CACHE``, else
    ``<tmp>/shadowllm-datasets`` (outside the repository and ``~/.cache``; the Arrow files only speed up a
    second read: deleting them changes nothing)."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "shadowllm-datasets")


def _datasets(needed: str, remedy: str):
    """The ``datasets`` module, or the one-line DataError "<needed> is not installed: <remedy>"."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{needed} is not installed: {remedy}")
    import datasets  # lazy: heavy, and the package imports without it

    return datasets


def _mirror_datasets(param: str, why: str):
    return _datasets(f"{why} and the 'datasets' package", f"pip install 'shadowllm[pipeline]' (param {param})")


def _hub_datasets(param: str):
    return _datasets(
        f"{param} is not set and the 'datasets' package (hub loading)", f"pip install 'shadowllm[hub]' or set {param}"
    )


def _first_line(e: BaseException) -> str:
    """The first line of the most telling message: the cause ``datasets`` wrapped, else the error itself."""
    for x in (e.__cause__, e):
        if x is not None and str(x).strip():
            return str(x).strip().splitlines()[0]
    return type(e).__name__


def _load_local(builder: str, path: Path, param: str, **kwargs: Any) -> list[Any]:
    """Rows of one mirror file through ``datasets.load_dataset(builder, data_files=...)`` (Arrow cache under
    ``datasets_cache()``); [] for a file with no rows. ``datasets`` reports bad input as a generation error
    without a line number: then the file is scanned for the first bad line, so the error names it as the
    plain JSON reader did (``file:line: bad JSON``)."""
    datasets = _mirror_datasets(param, f"mirror file {path} is read with 'datasets'")
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(datasets_cache()), **kwargs
        )
        return ds.to_list()
    except Exception as e:  # datasets wraps parse errors in several types; report one line
        if builder == "json":
            _check_json_lines(path)
        if _blank(path):
            return []  # datasets: "corresponds to no data" / StopIteration for a file without rows
        raise DataError(f"{path}: unreadable: {_first_line(e)}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def _opener(path: Path):
    return gzip.open if path.suffix == ".gz" else open


def _blank(path: Path) -> bool:
    try:
        with _opener(path)(path, "rt", encoding="utf-8") as f:
            return not any(line.strip() for line in f)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable: {e}") from None


def _check_json_lines(path: Path) -> None:
    """Raise the DataError naming the first line of ``path`` that is not one JSON object (if any)."""
    try:
        with _opener(path)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: bad JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable: {e}") from None


def _read_jsonl(path: Path, param: str = MIRROR_PARAM) -> list[dict[str, Any]]:
    """The rows of a JSON-lines mirror file (gzip when it ends in ``.gz``), in file order."""
    return _load_local("json", path, param)


def _hub_rows(spec: TaskSpec, split: str, param: str) -> list[dict[str, Any]]:
    datasets = _hub_datasets(param)
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot load task '{spec.name}' from the hub ({spec.hub_path}, {spec.hub_name}, "
            f"{split}): {first} (set {param} to use a local mirror)"
        ) from None
    return [dict(r) for r in ds]


# ------------------------------------------------------------------------------------------- rendering


def _render(spec: TaskSpec, row: dict[str, Any], index: int, origin: str) -> Example:
    where = f"task '{spec.name}' example {index} ({origin})"
    try:
        context = compile_template(spec.context, spec.source).render(**row)
        choices = compile_expression(spec.choices, spec.source)(**row)
        gold = compile_expression(spec.gold, spec.source)(**row)
        shared = None if spec.continuation is None else compile_template(spec.continuation, spec.source).render(**row)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot render prompt: {type(e).__name__}: {e}") from None
    for value in (*(choices if isinstance(choices, (list, tuple)) else ()), gold):
        if isinstance(value, jinja2.Undefined):  # StrictUndefined only raises when used
            raise DataError(f"{where}: cannot render prompt: {value._undefined_message}")
    if isinstance(choices, (str, jinja2.Undefined)) or not isinstance(choices, (list, tuple)) or not choices:
        raise DataError(f"{where}: choices must render to a non-empty list, got {choices!r}")
    if not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: every choice must be a string, got {choices!r}")
    try:
        gold = int(gold)
    except Exception:
        raise DataError(f"{where}: gold must render to an integer, got {gold!r}") from None
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold {gold} out of range for {len(choices)} choices")
    delim = spec.target_delimiter
    if shared is None:
        contexts = (context,) * len(choices)
        continuations = tuple(delim + c for c in choices)
    else:
        contexts = tuple(context + c for c in choices)
        continuations = (delim + shared,) * len(choices)
    return Example(f"{spec.name}/{index}", spec.name, contexts, continuations, gold)


def load_examples(
    name: str, mirror_dir: str | Path | None, *, split: str | None = None, param: str = MIRROR_PARAM
) -> list[Example]:
    """All examples of task ``name`` in source order, from ``mirror_dir`` (or the hub when None)."""
    spec = get_task(name)
    if spec.kind == "perplexity":
        raise DataError(f"task '{name}' is a perplexity task: use load_text, not load_examples")
    if mirror_dir is not None:
        path = _mirror_path(spec, mirror_dir, split, param)
        rows, origin = _read_jsonl(path, param), str(path)
    else:
        hub_split = split or spec.hub_split
        rows, origin = _hub_rows(spec, hub_split, param), f"hub {spec.hub_path}:{hub_split}"
    if not rows:
        raise DataError(f"empty dataset for task '{name}': {origin} has no rows (param {param})")
    return [_render(spec, row, i, origin) for i, row in enumerate(rows)]


def load_text(name: str, mirror_dir: str | Path | None, *, split: str | None = None, param: str = MIRROR_PARAM) -> str:
    """Whole text of a perplexity task: its rows joined with ``text_join`` (WikiText-2: ``"\\n\\n"``).

    Mirror files hold one hub row per line, an empty row as a blank line (data SOURCES.md convention), read
    with the ``datasets`` ``text`` builder.
    """
    spec = get_task(name)
    if spec.kind != "perplexity":
        raise DataError(f"task '{name}' is a {spec.kind} task: use load_examples, not load_text")
    if mirror_dir is not None:
        path = _mirror_path(spec, mirror_dir, split, param)
        # the `text` builder, one row per line with its "\n" (a last line without one is a row too); text mode
        # reads "\r\n" as "\n"
        lines = [r["text"] for r in _load_local("text", path, param, keep_linebreaks=True)]
        rows = [line if line.endswith("\n") else line + "\n" for line in lines]
        rows = [row if row.strip() else "" for row in rows]
        origin = str(path)
    else:
        hub_split = split or spec.hub_split
        rows = [str(r[spec.hub_text_field]) for r in _hub_rows(spec, hub_split, param)]
        origin = f"hub {spec.hub_path}:{hub_split}"
    if not any(r.strip() for r in rows):
        raise DataError(f"empty dataset for task '{name}': {origin} has no text (param {param})")
    return spec.text_join.join(rows)


def check_tasks(
    names: Iterable[str], mirror_dir: str | Path | None, *, param: str = TASKS_PARAM, mirror_param: str = MIRROR_PARAM
) -> None:
    """Cheap pre-flight check (no parsing of data): names known, mirror files present and non-empty."""
    if isinstance(names, str):
        raise DataError(f"{param} must be a list of task names, got the string {names!r}")
    names = list(names)
    if not names:
        raise DataError(f"{param} is empty; known tasks: {', '.join(list_tasks())}")
    specs = [get_task(n, param=param) for n in names]
    if mirror_dir is None:
        _hub_datasets(mirror_param)
        return
    for spec in specs:
        path = _mirror_path(spec, mirror_dir, None, mirror_param)
        if path.stat().st_size == 0:
            raise DataError(f"empty dataset for task '{spec.name}': {path} is empty (param {mirror_param})")
    _mirror_datasets(mirror_param, f"the mirror files of {', '.join(names)} are read with 'datasets'")  # no weights yet
