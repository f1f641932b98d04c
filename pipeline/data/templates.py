"""Jinja environment for task YAMLs, with the few named task-specific transforms as filters.

YAML refers to these filters by name (``{{ x | hellaswag_clean }}``); adding a transform is one function
plus one entry in ``FILTERS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jinja2

from .errors import DataError


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: strip, WikiHow ``[title]`` -> '. ', drop ``[...]``, squash double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def copa_connector(question: str) -> str:
    """COPA question type -> connector word ('cause' -> 'because', 'effect' -> 'therefore')."""
    return {"cause": "because", "effect": "therefore"}[question]


def lower_first(text: str) -> str:
    """Lower-case only the first character (COPA choices)."""
    return text[:1].lower() + text[1:]


def before_blank(sentence: str) -> str:
    """Winogrande: the sentence up to (not including) the '_' placeholder."""
    return sentence[: sentence.index("_")]


def after_blank(sentence: str) -> str:
    """Winogrande: the rest of the sentence after the '_' placeholder, stripped."""
    return sentence[sentence.index("_") + 1 :].strip()


FILTERS: dict[str, Callable[..., Any]] = {
    "hellaswag_clean": hellaswag_clean,
    "copa_connector": copa_connector,
    "lower_first": lower_first,
    "before_blank": before_blank,
    "after_blank": after_blank,
}


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """Strict (undefined names fail) jinja environment with the named filters, as lm-eval uses."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(FILTERS)
    return env


@lru_cache(maxsize=256)
def compile_template(source: str, where: str) -> jinja2.Template:
    """A string template (rendered to text)."""
    try:
        return environment().from_string(source)
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: bad jinja template {source!r}: {e}") from None


@lru_cache(maxsize=256)
def compile_expression(source: str, where: str) -> Callable[..., Any]:
    """A jinja expression (evaluated to a Python value: list of choices, gold index)."""
    try:
        return environment().compile_expression(source, undefined_to_none=False)
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: bad jinja expression {source!r}: {e}") from None
