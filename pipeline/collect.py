"""Collect per-example importance traces: forward + backward with hooks, criteria, Parquet shards.

Data flow: tokenised `Sequence`s -> `score_batch` (one forward, one activation-only backward, an
optional Hessian-vector product) -> per-example columns -> atomically written shards. A rerun
skips every complete shard whose parameters match, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import time
from collections.abc import Sequence as Seq
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline import criteria as crit
from pipeline.data.tokenize import keep_last
from pipeline.features import context_position, text_position
from pipeline.hooks import UnitCapture, embeddings_require_grad
from pipeline.models.adapters import Layout
from pipeline.traces import SCHEMA_VERSION, head_col, neuron_col, read_meta, shard_name, write_shard


class NonFiniteError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sequence:
    """One tokenised calibration example. The loss covers the last `n_target` tokens."""

    id: str
    task: str
    input_ids: tuple[int, ...]
    n_target: int
    text: bool = False  # plain text: every token after the first is a target (pipeline.features)

    def __post_init__(self):
        if not 0 < self.n_target < len(self.input_ids):
            raise ValueError(f"{self.id}: n_target {self.n_target} must be in [1, {len(self.input_ids) - 1}]")

    @property
    def feature_pos(self) -> int:
        """Where the predictor features are read (`pipeline.features`: the last context token)."""
        n = len(self.input_ids)
        return text_position(n) if self.text else context_position(n, self.n_target)


def mc_sequence(
    ex_id: str, task: str, ctx: list[int], cont: list[int], max_tokens: int, *, bos_id: int | None = None
) -> Sequence:
    """Context + gold continuation, truncated from the left to `max_tokens` (the target is kept).

    `bos_id` (set when the model's BOS policy is on): a sequence starting with it keeps the BOS at
    position 0 and is cut after it, as evaluation's `_prepare` does (`keep_last`)."""
    ids = keep_last(list(ctx) + list(cont), max_tokens, bos_id=bos_id)
    return Sequence(ex_id, task, tuple(ids), min(len(cont), len(ids) - 1))


def text_sequence(ex_id: str, task: str, ids: list[int]) -> Sequence:
    """Plain text: every token after the first is a target (under the BOS policy the first token of a
    window is the BOS, so then every text token is one)."""
    return Sequence(ex_id, task, tuple(ids), len(ids) - 1, text=True)


@dataclass
class CollectSettings:
    criteria: list[str]
    batch_size: int = 8
    shard_size: int = 64
    storage: str = "float16"
    layer_inputs: bool = True

    def __post_init__(self):
        for c in self.criteria:
            crit.get(c)
        if self.storage not in ("float16", "float32"):
            raise ValueError(f"storage dtype must be float16 or float32 (params: collect.storage), got {self.storage}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("collect.batch_size and collect.shard_size must be >= 1")


def _pad(seqs: Seq[Sequence], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, real-token mask and next-token labels (-100 outside the targets)."""
    T = max(len(s.input_ids) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        valid[b, :n] = True
        start = n - s.n_target  # first target token
        labels[b, start - 1 : n - 1] = ids[b, start:n]
    return ids.to(device), valid.to(device), labels.to(device)


def _at(x: Tensor, pos: Tensor) -> Tensor:
    """x [B, T, ...] at one position per row, pos [B] -> [B, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


def score_batch(model: nn.Module, layout: Layout, seqs: Seq[Sequence], settings: CollectSettings) -> dict[str, Any]:
    """Scores and predictor features for one batch; arrays are numpy [B, K]."""
    device = next(model.parameters()).device
    ids, valid, labels = _pad(seqs, device)
    chosen = [crit.get(c) for c in settings.criteria]
    need_grad = any(c.needs_grad for c in chosen)
    need_hvp = any(c.needs_hvp for c in chosen)
    # Double backward (grasp) needs the composite "math" attention kernel; fused kernels lack it.
    kernels = sdpa_kernel([SDPBackend.MATH]) if need_hvp else nullcontext()
    with UnitCapture(model, layout, layer_inputs=settings.layer_inputs) as cap, torch.enable_grad(), kernels:
        grad_hooks = embeddings_require_grad(model) if need_grad else None
        try:
            logits = model(input_ids=ids, attention_mask=valid.long(), use_cache=False).logits
        finally:
            if grad_hooks is not None:
                grad_hooks.remove()
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        n_target = (labels >= 0).sum(1)
        loss = ce.sum(1) / n_target
        raw = cap.raw()
        grads: list[Tensor | None] = [None] * len(raw)
        hvps: list[Tensor | None] = [None] * len(raw)
        if need_grad:
            grads = list(torch.autograd.grad(loss.sum(), raw, create_graph=need_hvp))
            if need_hvp:
                z = sum((g * g.detach()).sum() for g in grads)
                hvps = list(torch.autograd.grad(z, raw))
                grads = [g.detach() for g in grads]
    _check_finite(seqs, loss, grads)
    L = layout.n_layers
    pos = torch.tensor([s.feature_pos for s in seqs], dtype=torch.long)

    def units(view, tensors: list[Tensor | None], offset: int) -> Tensor | None:
        """All layers' units side by side: heads [B, T, L·H, D], neurons [B, T, L·F] (float32)."""
        if tensors[offset] is None:
            return None
        return torch.cat([view(t.detach()).float() for t in tensors[offset : offset + L]], dim=2)

    scores: dict[str, Tensor] = {}
    with torch.no_grad():
        for view, offset, column, pick in (
            (cap.heads, 0, head_col, lambda c: c.heads),
            (cap.neurons, L, neuron_col, lambda c: c.neurons),
        ):
            unit = crit.UnitBatch(
                a=units(view, list(raw), offset),
                g=units(view, grads, offset),
                valid=valid,
                hg=units(view, hvps, offset),
                labels=labels,
            )
            for c in chosen:
                if pick(c) is not None:
                    scores[column(c.name)] = pick(c)(unit)
    out: dict[str, Any] = {
        "example_id": [s.id for s in seqs],
        "task": [s.task for s in seqs],
        "n_tokens": np.array([len(s.input_ids) for s in seqs], dtype=np.int32),
        "n_target": np.array([s.n_target for s in seqs], dtype=np.int32),
        "loss": loss.detach().float().cpu().numpy(),
        "feat_pos": np.array([s.feature_pos for s in seqs], dtype=np.int32),
        "feat_l0": _at(cap.heads(raw[0].detach()), pos).flatten(1).float().cpu().numpy(),
    }
    if settings.layer_inputs:
        feats = torch.stack([_at(h, pos) for h in cap.layer_inputs], 1)  # [B, L, E]
        out["feat_layers"] = feats.flatten(1).float().cpu().numpy()
    for name, value in scores.items():
        out[name] = value.cpu().numpy()
    return out


def _check_finite(seqs: Seq[Sequence], loss: Tensor, grads: list[Tensor | None]) -> None:
    bad = ~torch.isfinite(loss)
    for g in grads:
        if g is not None:
            bad |= ~torch.isfinite(g.reshape(loss.shape[0], -1)).all(1)
    if bad.any():
        ids = [seqs[i].id for i in torch.nonzero(bad).flatten().tolist()]
        raise NonFiniteError(f"non-finite loss or gradient for example(s) {', '.join(ids)}")


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The source files that decide what a trace row holds (scoring, capture, criteria, storage, features,
# calibration data and tokenisation, architecture adapters). Their hash is part of every shard's
# metadata: a resumed run reuses a shard only when this code is unchanged, so an edit never mixes
# new rows with stale ones (DVC reruns the stage, but `persist: true` keeps the old shards).
_PKG = Path(__file__).resolve().parent
CODE_FILES: tuple[str, ...] = (
    "collect.py",
    "criteria.py",
    "hooks.py",
    "traces.py",
    "features.py",
    "calibration.py",
    "models/adapters.py",
    "data",
)


def code_hash(files: Seq[str | Path] = CODE_FILES, root: Path = _PKG) -> str:
    """Content hash of `files` (paths relative to `root`; a directory means every file under it)."""
    h = hashlib.sha256()
    for entry in files:
        path = root / entry
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode())
                h.update(b"\0")
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class CollectStats:
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    shards_discarded: dict[str, int] = field(default_factory=dict)  # reason -> count

    def resume_line(self) -> str:
        """One line: how many shards were reused and why the others were not."""
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.shards_discarded.items()))
        return f"{self.shards_reused} shards reused" + (f", discarded {why}" if why else "")

    def metrics(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "examples_per_s": self.examples / s,
            "tokens_per_s": self.tokens / s,
            "bytes_written": self.bytes_written,
            "shards_written": self.shards_written,
            "shards_reused": self.shards_reused,
            "shards_discarded": sum(self.shards_discarded.values()),
        }


def collect(
    model: nn.Module,
    layout: Layout,
    seqs: list[Sequence],
    out_dir: str | Path,
    settings: CollectSettings,
    meta: dict[str, Any],
    *,
    progress: bool = True,
) -> CollectStats:
    """Write `seqs`' traces into `out_dir` as shards, resuming from any complete matching shards.

    `meta` (model id/fingerprint/dims, run params) is stored in every shard together with a hash
    of it: a shard whose hash differs is from another run and is discarded, never mixed in."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(
        meta,
        schema_version=SCHEMA_VERSION,
        criteria=list(settings.criteria),
        storage=settings.storage,
        settings=asdict(settings),
        n_examples=len(seqs),
    )
    meta.setdefault("code_hash", code_hash())
    meta["params_hash"] = params_hash({k: v for k, v in meta.items() if k != "shard"})
    n_shards = math.ceil(len(seqs) / settings.shard_size)
    for stale in out_dir.glob(".part-*.tmp"):
        stale.unlink()
    done = set()
    discarded: dict[str, int] = {}
    for p in sorted(out_dir.glob("part-*.parquet")):
        m = read_meta(p)
        k = int(p.stem.split("-")[1])
        if m is not None and m.get("params_hash") == meta["params_hash"] and k < n_shards:
            done.add(k)
            continue
        reason = (
            "unreadable"
            if m is None
            else "code changed"
            if m.get("code_hash") != meta["code_hash"]
            else "params changed"
            if m.get("params_hash") != meta["params_hash"]
            else "beyond the example list"
        )
        discarded[reason] = discarded.get(reason, 0) + 1
        p.unlink()
    stats = CollectStats(shards_reused=len(done), shards_discarded=discarded)
    todo = [k for k in range(n_shards) if k not in done]
    total = sum(len(seqs[k * settings.shard_size : (k + 1) * settings.shard_size]) for k in todo)
    bar = tqdm(total=total, unit="ex", desc="collect", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for k in todo:
        # Similar lengths share a batch (less padding); the order inside a shard is still deterministic.
        shard = sorted(seqs[k * settings.shard_size : (k + 1) * settings.shard_size], key=lambda s: len(s.input_ids))
        parts = []
        for i in range(0, len(shard), settings.batch_size):
            batch = shard[i : i + settings.batch_size]
            parts.append(score_batch(model, layout, batch, settings))
            stats.examples += len(batch)
            stats.tokens += sum(len(s.input_ids) for s in batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - t0):.0f}")
        columns = {
            key: (
                np.concatenate([p[key] for p in parts])
                if isinstance(parts[0][key], np.ndarray)
                else functools.reduce(operator.iadd, (p[key] for p in parts), [])
            )
            for key in parts[0]
        }
        stats.bytes_written += write_shard(out_dir / shard_name(k), columns, dict(meta, shard=k), settings.storage)
        stats.shards_written += 1
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
