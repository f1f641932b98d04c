"""Collect per-example importance traces: forward + backward with hooks, criteria, Parquet shards.

Data flow: tokenised `Sequence`s -> `pipeline.scoring.score_batch` (one forward, one activation-only
backward, an optional Hessian-vector product) -> per-example columns -> atomically written shards, then
`manifest.json` (`pipeline.traces`) last. A rerun skips every complete, intact shard whose parameters
match, so a killed run resumes where it stopped; the manifest is removed first and rewritten at the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from torch import nn

from pipeline import criteria as crit
from pipeline.models.adapters import Layout
from pipeline.params import ParamError, Section, at_least, nonempty
from pipeline.scoring import NonFiniteError, ScoreSettings, Sequence, mc_sequence, score_batch, text_sequence
from pipeline.traces import (
    MANIFEST,
    SCHEMA_VERSION,
    read_meta,
    shard_is_intact,
    shard_name,
    write_manifest,
    write_shard,
)

__all__ = ["CollectParams", "NonFiniteError", "Sequence", "collect", "mc_sequence", "text_sequence"]


@dataclass(frozen=True)
class CollectParams(Section):
    """`collect:` — which calibration examples are scored, by which criteria, stored how."""

    SECTION: ClassVar[str] = "collect"
    tasks: list[str] = nonempty()
    n_per_task: int = at_least(1)
    num_fewshot: int = at_least(0)
    max_tokens: int = at_least(2)
    criteria: list[str] = nonempty()
    storage: Literal["float16", "float32"]
    layer_inputs: bool
    batch_size: int = at_least(1)
    shard_size: int = at_least(1)
    seed: int = at_least(0)

    def check(self, where: str) -> None:
        for c in self.criteria:
            if c not in crit.CRITERIA:
                raise ParamError(
                    f"parameter {where}.criteria: unknown criterion {c!r}; known: {', '.join(sorted(crit.CRITERIA))}"
                )

    @property
    def score(self) -> ScoreSettings:
        return ScoreSettings(tuple(self.criteria), self.layer_inputs)

    def storage_record(self) -> dict[str, Any]:
        """The settings that shape a shard (part of its params hash)."""
        return {
            "criteria": list(self.criteria),
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            "storage": self.storage,
            "layer_inputs": self.layer_inputs,
        }


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The source files that decide what a trace row holds (scoring, capture, criteria, storage, features,
# calibration data and tokenisation, architecture adapters). Their hash is part of every shard's
# metadata: a resumed run reuses a shard only when this code is unchanged, so an edit never mixes
# new rows with stale ones (DVC reruns the stage, but `persist: true` keeps the old shards).
_PKG = Path(__file__).resolve().parent
CODE_FILES: tuple[str, ...] = (
    "collect.py",
    "scoring.py",
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
    settings: CollectParams,
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
        settings=settings.storage_record(),
        n_examples=len(seqs),
    )
    meta.setdefault("code_hash", code_hash())
    meta["params_hash"] = params_hash({k: v for k, v in meta.items() if k != "shard"})
    n_shards = math.ceil(len(seqs) / settings.shard_size)
    # First of all: until this run has written every shard, the directory is not a trace set.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for stale in [*out_dir.glob(".part-*.tmp"), *out_dir.glob(f".{MANIFEST}.*.tmp")]:
        stale.unlink()
    done = set()
    discarded: dict[str, int] = {}
    for p in sorted(out_dir.glob("part-*.parquet")):
        m = read_meta(p)
        k = int(p.stem.split("-")[1])
        same = m is not None and m.get("params_hash") == meta["params_hash"] and k < n_shards
        # A reused shard goes into the new manifest's hashes: read it whole first, so a corrupt one is rewritten.
        if same and shard_is_intact(p):
            done.add(k)
            continue
        reason = (
            "unreadable"
            if m is None
            else "corrupt"
            if same
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
            parts.append(score_batch(model, layout, batch, settings.score))
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
    write_manifest(out_dir, n_examples=len(seqs))
    stats.seconds = time.perf_counter() - t0
    return stats
