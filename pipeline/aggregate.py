"""Aggregation of per-example importance traces (SPEC §4).

- static importance per criterion ("train mean"): the mean over calibration examples of the predictor
  targets -> heads [L, H], neurons [L, F]. It is the reference every predictor is measured against and
  the static method of the comparison. The mean of the *raw* scores is kept as the named variant
  `raw_mean` (method `static_raw`): a few examples with large scores dominate it, and it ranks worse
  held out (SmolLM2-135M, before this change: plainact heads ρ 0.615 vs 0.678, fisher 0.584 vs 0.686);
- predictor targets: each example's scores min-max normalised per layer -> [N, L, U] in [0, 1].

A scores directory holds `static.safetensors` (keys `<criterion>/heads`, `<criterion>/neurons`: the
train mean; `raw/<criterion>/heads`, `raw/<criterion>/neurons`: the raw mean),
`targets-<criterion>.safetensors` (keys `heads`, `neurons`; rows in trace order) and `scores.json`
(the criteria, the trace params_hash, the model id/fingerprint/dims, a hash of the example order, and
`sha256`: each safetensors file's sha256, checked on load, so a corrupt or truncated file is refused by name).
Non-finite trace values (e.g. float16 overflow, log|det| of a singular kernel) are clipped to the
layer's finite range, counted, and the count is stored in the metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from safetensors.numpy import load_file, save_file

from pipeline import criteria as crit
from pipeline.errors import UserError
from pipeline.io import atomic_path, check_sha256, read_json, sha256_file, write_json
from pipeline.normalize import minmax
from pipeline.params import ParamError, Section, nonempty
from pipeline.traces import TraceError, Traces
from pipeline.units import POOLS

SCORES_SCHEMA = 1
STATIC_FILE = "static.safetensors"
META_FILE = "scores.json"
UNITS = POOLS


class InputError(UserError):
    """A stage input (traces, scores) that is missing or does not hold what is asked of it."""


def open_traces(directory: str | Path) -> Traces:
    """`Traces.open` (manifest and shard hashes checked, no column read); a missing, incomplete, corrupt or
    inconsistent trace directory is a one-line user error."""
    try:
        return Traces.open(directory)
    except TraceError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None


@dataclass(frozen=True)
class AggregateParams(Section):
    """`aggregate:` — the criteria that become per-example predictor targets, the heat map's criterion,
    the targets' file dtype. `targets` is also the train stage's list of criteria."""

    SECTION: ClassVar[str] = "aggregate"
    targets: list[str] = nonempty()
    heatmap: str
    target_dtype: Literal["float32", "float16"]

    def check(self, where: str) -> None:
        for name in self.targets:
            if name not in crit.CRITERIA:
                raise ParamError(
                    f"parameter {where}.targets: unknown criterion {name!r}; known: {', '.join(sorted(crit.CRITERIA))}"
                )
            if not crit.CRITERIA[name].predictable:
                raise ParamError(
                    f"parameter {where}.targets: criterion '{name}' is static-only and cannot be a predictor target"
                )
        if len(set(self.targets)) != len(self.targets):
            raise ParamError(f"parameter {where}.targets has duplicates: {self.targets}")

    def check_collected(self, collected: list[str]) -> None:
        """Every criterion named here is in the traces."""
        for name in self.targets:
            if name not in collected:
                raise ParamError(
                    f"parameter aggregate.targets: criterion '{name}' is not in the traces "
                    f"(collected: {', '.join(collected)}); add it to collect.criteria"
                )
        if self.heatmap not in collected:
            raise ParamError(
                f"parameter aggregate.heatmap: criterion {self.heatmap!r} is not in the traces "
                f"(collected: {', '.join(collected)})"
            )


def target_file(criterion: str) -> str:
    return f"targets-{criterion}.safetensors"


def clean(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """[N, L, U] -> (copy with non-finite values clipped to each (example, layer)'s finite range, count)."""
    x = np.asarray(scores, dtype=np.float32)
    bad = ~np.isfinite(x)
    n_bad = int(bad.sum())
    if not n_bad:
        return x, 0
    x = x.copy()
    lo = np.where(bad, np.inf, x).min(-1, keepdims=True)
    hi = np.where(bad, -np.inf, x).max(-1, keepdims=True)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    fill = np.where(np.isposinf(x), hi, lo)  # +inf -> layer max; -inf and nan -> layer min
    x[bad] = np.broadcast_to(fill, x.shape)[bad]
    return x, n_bad


minmax_per_layer = minmax  # [N, L, U]: per example and layer (pipeline.normalize)


def units_of(criterion: str) -> tuple[str, ...]:
    """The unit pools a criterion scores: heads always, neurons where the criterion defines them."""
    return UNITS if crit.get(criterion).neurons is not None else ("heads",)


def static_scores(traces: Traces, criterion: str, *, raw: bool = False) -> dict[str, np.ndarray]:
    """Train mean, the mean over examples of the per-layer min-max targets (`raw`: of the raw scores):
    {"heads": [L, H], "neurons": [L, F]} (no neurons for heads-only criteria)."""
    out = {}
    for unit in units_of(criterion):
        x, _ = clean(traces.scores(criterion, unit))
        out[unit] = (x if raw else minmax_per_layer(x)).mean(0, dtype=np.float64).astype(np.float32)
    return out


def targets(traces: Traces, criterion: str) -> tuple[dict[str, np.ndarray], int]:
    """Per-example predictor targets {"heads": [N, L, H], "neurons": [N, L, F]} and the non-finite count."""
    out, n_bad = {}, 0
    for unit in units_of(criterion):
        x, bad = clean(traces.scores(criterion, unit))
        out[unit], n_bad = minmax_per_layer(x), n_bad + bad
    return out, n_bad


def order_hash(example_ids: list[str]) -> str:
    """Hash of the example order, so that targets are only ever paired with the features they belong to."""
    return hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:16]


def scores_meta(traces: Traces, static: list[str], target: list[str], **extra: Any) -> dict[str, Any]:
    m = traces.meta["model"]
    return {
        "schema": SCORES_SCHEMA,
        "criteria": list(static),
        "targets": list(target),
        "trace_params_hash": traces.meta["params_hash"],
        "model": {"id": m.get("id"), "fingerprint": m["fingerprint"], "dims": m["dims"]},
        "n_examples": int(traces.meta.get("n_examples", 0)) or len(traces.column("example_id")),
        "example_order": order_hash([str(i) for i in traces.column("example_id")]),
        **extra,
    }


def _save(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(tmp),
            metadata={"shadowllm": json.dumps(meta, sort_keys=True)},
        )


def save_scores(
    path_dir: str | Path,
    static: dict[str, dict[str, np.ndarray]],
    targets: dict[str, dict[str, np.ndarray]],
    meta: dict[str, Any],
    *,
    dtype: str = "float32",
    raw_static: dict[str, dict[str, np.ndarray]] | None = None,
) -> None:
    """Write static scores of every criterion (train mean; `raw_static`: raw mean), per-example targets
    of the chosen ones, and the metadata.

    `static` / `raw_static` / `targets`: criterion -> {"heads": ..., "neurons": ...}. Each file is written
    atomically; `scores.json` last (with each file's sha256), so a directory with it is complete."""
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, criteria=sorted(static), targets=sorted(targets), target_dtype=dtype)
    tensors = {f"{c}/{u}": a for c, units in static.items() for u, a in units.items()}
    tensors.update({f"raw/{c}/{u}": a for c, units in (raw_static or {}).items() for u, a in units.items()})
    _save(d / STATIC_FILE, tensors, meta)
    for c, units in targets.items():
        _save(d / target_file(c), {u: a.astype(dtype) for u, a in units.items()}, meta)
    files = [STATIC_FILE, *(target_file(c) for c in targets)]
    write_json(d / META_FILE, dict(meta, sha256={f: sha256_file(d / f) for f in files}))


def load_meta(path_dir: str | Path) -> dict[str, Any]:
    try:
        return read_json(Path(path_dir) / META_FILE, missing=f"no scores in {path_dir}: run the aggregate stage first")
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


def _check_model(meta: dict[str, Any], model_fingerprint: str | None, what: str) -> None:
    have = meta["model"]["fingerprint"]
    if model_fingerprint is not None and model_fingerprint != have:
        raise InputError(f"{what} were computed for model fingerprint {have}, not for this model ({model_fingerprint})")


def _load(path_dir: str | Path, name: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of scores file `name` once its bytes match the sha256 in `scores.json`."""
    path = Path(path_dir) / name
    want = (meta.get("sha256") or {}).get(name)
    if want is None:
        raise InputError(f"{path}: no sha256 for it in {META_FILE} (older scores); rerun the aggregate stage")
    check_sha256(path, want, f"its sha256 in {META_FILE}", InputError, "rerun the aggregate stage")
    try:
        return load_file(str(path))
    except Exception as e:  # the hash matched: only a file written wrongly gets here
        raise InputError(f"{path}: unreadable ({str(e).strip()[:200]}); rerun the aggregate stage") from None


STATIC_VARIANTS = {"train_mean": "", "raw_mean": "raw/"}


def load_static(
    path_dir: str | Path, criterion: str, *, model_fingerprint: str | None = None, variant: str = "train_mean"
) -> dict[str, np.ndarray]:
    """{"heads": [L, H], "neurons": [L, F]} static scores of `criterion` (no neurons for heads-only
    criteria): `variant` "train_mean" (mean of the normalised targets) or "raw_mean"."""
    meta = load_meta(path_dir)
    _check_model(meta, model_fingerprint, f"static scores in {path_dir}")
    if criterion not in meta["criteria"]:
        raise InputError(
            f"no static scores for criterion '{criterion}' in {path_dir}; have {', '.join(meta['criteria'])}"
        )
    prefix = STATIC_VARIANTS[variant]
    data = _load(path_dir, STATIC_FILE, meta)
    out = {u: data[f"{prefix}{criterion}/{u}"] for u in UNITS if f"{prefix}{criterion}/{u}" in data}
    if not out:
        raise InputError(f"no {variant} static scores for '{criterion}' in {path_dir} (rerun the aggregate stage)")
    return out


def load_targets(path_dir: str | Path, criterion: str) -> dict[str, np.ndarray]:
    """{"heads": [N, L, H], "neurons": [N, L, F]} float32 per-layer min-max targets, rows in trace order."""
    meta = load_meta(path_dir)
    if criterion not in meta["targets"]:
        raise InputError(
            f"no predictor targets for criterion '{criterion}' in {path_dir}; have "
            f"{', '.join(meta['targets']) or 'none'} (params: aggregate.targets)"
        )
    return {u: a.astype(np.float32) for u, a in _load(path_dir, target_file(criterion), meta).items()}


def heatmap(static: dict[str, np.ndarray], criterion: str, path: str | Path) -> None:
    """Layer x unit image of static scores (each layer min-max scaled, so every row uses the full colour range)."""
    from pipeline.plots import figure, save_png

    units = list(static)
    fig, axes = figure(ncols=len(units), figsize=(6 * len(units), 4), squeeze=False)
    for ax, unit in zip(axes[0], units):
        img = ax.imshow(
            minmax_per_layer(static[unit][None])[0],
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            origin="lower",
        )
        ax.set(xlabel=unit[:-1] + " index", ylabel="layer", title=f"{criterion}: static {unit} (per-layer min-max)")
        fig.colorbar(img, ax=ax)
    save_png(fig, path, dpi=110)


def aggregate(traces: Traces, params: AggregateParams, out_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Static scores of every collected criterion (train mean and raw mean) and the targets of
    `params.targets`, written to `out_dir` -> (the scores metadata, {criterion: static scores})."""
    static = {c: static_scores(traces, c) for c in traces.criteria}
    raw_static = {c: static_scores(traces, c, raw=True) for c in traces.criteria}
    tgt, non_finite = {}, {}
    for c in params.targets:
        tgt[c], non_finite[c] = targets(traces, c)
    meta = scores_meta(traces, list(static), params.targets, non_finite=non_finite)
    save_scores(out_dir, static, tgt, meta, dtype=params.target_dtype, raw_static=raw_static)
    return meta, static
