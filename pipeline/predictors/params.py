"""`train:` of params.yaml, typed: which predictor kinds, their widths, the training recipe
(`pipeline.predictors.fit`) and the held-out evaluation. No defaults here: params.yaml is their one source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.params import ParamError, Section, at_least, fraction, nonempty
from pipeline.predictors.base import PredictorWidths
from pipeline.predictors.registry import PREDICTORS
from pipeline.predictors.targets import TARGET_TRANSFORMS


@dataclass(frozen=True)
class TrainParams(Section):
    """`train:` — one predictor per kind in `kinds` and target criterion (`aggregate.targets`)."""

    SECTION: ClassVar[str] = "train"
    kinds: list[str] = nonempty()
    widths: dict[str, PredictorWidths]  # by kind; kinds not in `kinds` may have widths too
    epochs: int = at_least(1)
    lr: float = at_least(0.0)
    weight_decay: float = at_least(0.0)
    batch_size: int = at_least(1)
    val_fraction: float = fraction(above=0.0)  # the held-out rows: every metric is measured on them
    seed: int = at_least(0)
    device: str
    sparsities: list[float] = fraction()
    standardize: bool
    target_transform: str
    select_fraction: float = fraction(above=0.0)  # of the training rows: best-epoch and ridge-α selection
    ridge_alphas: tuple[float, ...] = field(metadata={"nonempty": True, "above": 0.0})

    def check(self, where: str) -> None:
        known = ", ".join(PREDICTORS.names())
        for k in self.kinds:
            if k not in PREDICTORS:
                raise ParamError(f"parameter {where}.kinds: unknown predictor kind {k!r}; known: {known}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ParamError(f"parameter {where}.kinds has duplicates: {self.kinds}")
        for k in self.widths:
            if k not in PREDICTORS:
                raise ParamError(f"parameter {where}.widths: unknown predictor kind {k!r}; known: {known}")
        for k in self.kinds:
            if k not in self.widths:
                raise ParamError(f"missing parameter {where}.widths.{k}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ParamError(f"parameter {where}.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.target_transform not in TARGET_TRANSFORMS:
            raise ParamError(
                f"parameter {where}.target_transform must be one of {', '.join(TARGET_TRANSFORMS)}, "
                f"got {self.target_transform!r}"
            )
