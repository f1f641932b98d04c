"""Every built-in evaluation method, registered, and the lookups by name.

Importing this module imports the modules that register the built-in methods (`pipeline.evaluate.methods`:
dense, static, static_raw, oracle, shadowllm, dejavu, dejavu_lookahead; `pipeline.evaluate.thresholds`: teal,
cats, griffin, wina), so a lookup made through it always sees all of them. The registry itself
(`MethodSpec`, `METHODS`, `register`) lives in `pipeline.evaluate.registry`, which neither imports.
"""

from __future__ import annotations

from pipeline.evaluate import methods as _methods  # noqa: F401  (registers the unit-mask methods)
from pipeline.evaluate import thresholds as _thresholds  # noqa: F401  (registers teal, cats, griffin, wina)
from pipeline.evaluate.forward import Masking
from pipeline.evaluate.registry import METHODS, MethodContext, MethodSpec
from pipeline.masks import MaskSpec

__all__ = ["METHODS", "build", "granularity", "is_reference", "reference", "title"]


def granularity(name: str, configured: str) -> str:
    """The granularity method `name` runs at when `evaluate.granularity` is `configured`."""
    return METHODS.get(name, "evaluate.methods").granularity(configured)


def title(name: str, criterion: str | None, gran: str) -> str:
    """The method's name in tables: e.g. 'dejavu-l2_norm (dense inputs)'."""
    return METHODS.get(name, "evaluate.methods").title(criterion, gran)


def build(name: str, ctx: MethodContext, spec: MaskSpec) -> Masking:
    """A bound `Masking` of method `name` at `spec` (dense when the spec prunes nothing)."""
    return METHODS.get(name, "evaluate.methods").build(ctx, spec)


def reference() -> MethodSpec:
    """The unpruned reference every sweep evaluates once, at sparsity 0."""
    return next(spec for _, spec in METHODS.items() if spec.reference)


def is_reference(name: str) -> bool:
    """Whether a record's method is the unpruned reference (a name this registry does not know is not)."""
    return name in METHODS and METHODS.get(name).reference
