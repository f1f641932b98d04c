"""Predictor files: `model.safetensors` (weights) + `config.json` (kind, criterion, widths, dims,
model fingerprint, trace params_hash, metrics, `weights_sha256`: the weights file's sha256, written last).
Loading against another model, or weights whose bytes differ from `weights_sha256`, is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.io import atomic_path, check_sha256, read_json, sha256_file, write_json
from pipeline.predictors.base import Predictor
from pipeline.predictors.registry import build

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RERUN = "rerun the train stage"


class PredictorError(UserError):
    """A saved predictor that is missing, from an older version, or corrupt; the message names the file."""


def predictor_dir(root: str | Path, kind: str, criterion: str) -> Path:
    """Where the predictor of `kind` trained on `criterion` targets lives under `root` (the train stage's
    out): the one place its name is built."""
    return Path(root) / f"{kind}-{criterion}"


def save_predictor(pred: Predictor, out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write weights then config (atomically each; config last). `meta` must hold `model_fingerprint`
    and should hold `trace_params_hash` and `metrics`; it is merged over the predictor's own config."""
    if "model_fingerprint" not in meta:
        raise ValueError("save_predictor: meta needs 'model_fingerprint'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**pred.config(), **meta}
    with atomic_path(out / WEIGHTS) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in pred.state_dict().items()}
        save_file(state, str(tmp), metadata={"kind": pred.kind, "model_fingerprint": str(meta["model_fingerprint"])})
    write_json(out / CONFIG, dict(config, weights_sha256=sha256_file(out / WEIGHTS)))


def load_config(out_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(out_dir) / CONFIG, missing=f"no predictor in {out_dir}: run the train stage first")


def load_predictor(out_dir: str | Path, *, model_fingerprint: str | None = None) -> Predictor:
    """The predictor saved in `out_dir`, in eval mode on CPU. With `model_fingerprint`, refuse one fit
    to another model."""
    cfg = load_config(out_dir)
    have = cfg.get("model_fingerprint")
    if model_fingerprint is not None and have != model_fingerprint:
        raise PredictorError(
            f"predictor {out_dir} was trained for model fingerprint {have}, "
            f"not for this model (fingerprint {model_fingerprint})"
        )
    weights = Path(out_dir) / WEIGHTS
    want = cfg.get("weights_sha256")
    if want is None:
        raise PredictorError(f"{Path(out_dir) / CONFIG}: no weights_sha256 (saved by an older version); {RERUN}")
    check_sha256(weights, want, f"weights_sha256 in {CONFIG}", PredictorError, RERUN)
    pred = build(cfg["kind"], cfg["criterion"], cfg["dims"], cfg["widths"])
    try:
        pred.load_state_dict(load_file(str(weights)))
    except Exception as e:  # the hash matched: weights written for another config
        raise PredictorError(f"{weights}: does not load ({str(e).strip().splitlines()[0][:200]}); {RERUN}") from None
    return pred.eval()
