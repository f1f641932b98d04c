"""The sweep: every (method, sparsity) point on every task, each point cached on disk.

A point's cache file is `<cache_dir>/<key>.json`, key = sha256 of everything that determines its
result: model fingerprint, method, criterion, mask settings (sparsity per pool, scope, hybrid floor,
normalisation, granularity for contextual methods), the task and its evaluation settings (split seed
and fraction, limit, few-shot, BOS, max length or seq_len/max_windows), and a content hash of the
static scores or predictor the method reads. Adding a sparsity level, a method or a task reruns only
the new points; changing the model or a predictor reruns what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.evaluate.catalog import reference
from pipeline.evaluate.config import EvalConfig, MethodRef
from pipeline.evaluate.forward import Masking
from pipeline.io import write_json
from pipeline.masks import describe

CACHE_VERSION = 1
DENSE = MethodRef(reference())


def plan(cfg: EvalConfig) -> list[tuple[MethodRef, float]]:
    """(method, sparsity) pairs: the unpruned reference once at 0, every other method at every sparsity > 0."""
    out: list[tuple[MethodRef, float]] = [(DENSE, 0.0)]
    for m in cfg.methods:
        if m.spec.reference:
            continue
        out += [(m, s) for s in cfg.sparsities if s > 0]
    return out


def artifact_hash(cfg: EvalConfig, m: MethodRef) -> str | None:
    return cfg.artifact_hash(m)


def granularity_of(cfg: EvalConfig, m: MethodRef) -> str:
    return m.spec.granularity(cfg.granularity)


def task_settings(cfg: EvalConfig, task: str) -> dict[str, Any]:
    """The evaluation settings of `task` that enter its point key; `add_bos` is the model's *resolved* BOS
    policy (a bool: the same setting resolves differently for different tokenizers), for every task."""
    if not isinstance(cfg.add_bos, bool):
        raise ValueError(
            f"add_bos is unresolved ({cfg.add_bos!r}): resolve model.add_bos against the tokenizer "
            f"(pipeline.data.tokenize.resolve_add_bos) before keying points"
        )
    if task == cfg.ppl_task:
        return {
            "seq_len": cfg.seq_len,
            "max_windows": cfg.max_windows,
            "calib_text": cfg.calib_text,
            "calib_fraction": cfg.calib_fraction,
            "seed": cfg.seed,
            "add_bos": cfg.add_bos,
        }
    return {
        "limit": cfg.limit.get(task),
        "calib_fraction": cfg.calib_fraction,
        "seed": cfg.seed,
        "num_fewshot": cfg.num_fewshot,
        "add_bos": cfg.add_bos,
        "max_length": cfg.max_length,
    }


def point_key(
    cfg: EvalConfig, fp: str, m: MethodRef, sparsity: float, task: str, art: str | None, unit: float | None = None
) -> tuple[str, dict]:
    """The point's cache key and identity; `unit`: with `evaluate.sparsity_unit: bytes`, the unit sparsity solved
    for the byte target `sparsity` (both enter the key)."""
    ident = {
        "v": CACHE_VERSION,
        "model": fp,
        "method": m.name,
        "criterion": m.criterion,
        "task": task,
        "task_settings": task_settings(cfg, task),
        "artifact": art,
    }
    if not m.spec.reference:
        ident["mask"] = {
            "sparsity": sparsity,
            "pools": sorted(cfg.pools),
            "scope": cfg.scope,
            "min_keep": cfg.min_keep if cfg.scope == "hybrid" else None,
            "normalize": cfg.normalize if m.spec.normalizes else None,
            "granularity": granularity_of(cfg, m),
        }
        if cfg.sparsity_unit == "bytes":
            ident["mask"]["sparsity"] = unit
            ident["mask"]["byte_target"] = sparsity
    blob = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], ident


class Evaluator:
    """Holds the model, the tokenised tasks and the method context; evaluates points with caching."""

    def __init__(
        self,
        cfg: EvalConfig,
        model: nn.Module,
        tokenizer: Any,
        layout: Any,
        fingerprint: str,
        *,
        model_id: str,
        log: Callable[[str], None] = print,
    ):
        from pipeline.data.tokenize import resolve_add_bos
        from pipeline.evaluate.registry import MethodContext

        cfg = replace(cfg, add_bos=resolve_add_bos(cfg.add_bos, tokenizer))  # one BOS policy, resolved once
        self.cfg, self.model, self.tok, self.layout, self.fp = cfg, model, tokenizer, layout, fingerprint
        self.model_id, self.log = model_id, log
        self.ctx = MethodContext(
            model=model,
            layout=layout,
            fingerprint=fingerprint,
            scores_dir=cfg.scores_dir,
            predictors_dir=cfg.predictors_dir,
            criterion=None,
            granularity=cfg.granularity,
            calibration=self.calibration_sequences,
            oracle_batch=cfg.evaluate.oracle_batch_size,
        )
        self._weight_bytes = None
        self._tasks: dict[str, Any] = {}
        self._requests: dict[str, list] = {}
        self._gold: dict[str, list[int]] = {}
        self._text: str | None = None
        self.splits: dict[str, Any] = {}

    def plan_line(self) -> str:
        """What the sweep covers, for the stage's log."""
        cfg = self.cfg
        tasks = ", ".join(cfg.tasks + ([cfg.ppl_task] if cfg.ppl_task else []))
        bos = "on" if cfg.add_bos else "off"
        return f"{len(cfg.methods)} methods x {len(cfg.sparsities)} sparsities, tasks {tasks}; BOS {bos}"

    def report_info(self) -> dict[str, Any]:
        """The run's settings the report states (BOS: the resolved model.add_bos)."""
        cfg = self.cfg
        return {
            "model": self.model_id,
            "fingerprint": self.fp,
            "scope": cfg.scope,
            "pools": cfg.pools,
            "granularity": cfg.granularity,
            "seed": cfg.seed,
            "calib_fraction": cfg.calib_fraction,
            "limit": cfg.evaluate.limit,
            "seq_len": cfg.seq_len,
            "max_windows": cfg.max_windows,
            "cache_dir": cfg.cache_dir,
            "add_bos": cfg.add_bos,
            "sparsity_unit": cfg.sparsity_unit,
        }

    # ---- data ----
    def task_data(self, task: str):
        if task not in self._tasks:
            from pipeline.evaluate.tasks import eval_examples, requests_of

            td = eval_examples(
                task,
                self.cfg.mirror_dir,
                calib_fraction=self.cfg.calib_fraction,
                seed=self.cfg.seed,
                limit=self.cfg.limit.get(task),
                num_fewshot=self.cfg.num_fewshot,
            )
            self._tasks[task] = td
            # every candidate's oracle mask comes from its example's gold candidate
            starts = np.cumsum([0] + [len(e.continuations) for e in td.examples])
            self._gold[task] = [int(starts[k] + e.gold) for k, e in enumerate(td.examples) for _ in e.continuations]
            self._requests[task] = requests_of(td.examples, self.tok, add_bos=self.cfg.add_bos)
            self.splits[task] = {
                "seed": td.split.seed,
                "calib_fraction": self.cfg.calib_fraction,
                "n_eval_total": td.n_eval_total,
                "n_calib": len(td.split.calib_ids),
                "evaluated_ids": [e.id for e in td.examples],
            }
        return self._tasks[task], self._requests[task]

    def ppl_exclusions(self, n_windows_eval: int) -> set[int]:
        """Indices of evaluation windows that overlap the text windows `collect` calibrated on."""
        ct = self.cfg.calib_text
        if not ct:
            return set()
        from pipeline.calibration import text_split
        from pipeline.data.tokenize import encode_text_windows

        n_cal = len(encode_text_windows(self.tok, self.text(), ct["max_tokens"], add_bos=self.cfg.add_bos))
        calib, _ = text_split(self.cfg.ppl_task, n_cal, calib_fraction=self.cfg.calib_fraction, seed=self.cfg.seed)
        out = set()
        b = int(self.cfg.add_bos)  # text tokens per window: a BOS window holds one fewer
        S, Mt = self.cfg.seq_len - b, ct["max_tokens"] - b
        for i in calib[: ct["n_per_task"]]:
            lo, hi = i * Mt, (i + 1) * Mt
            out.update(range(lo // S, (hi - 1) // S + 1))
        return {j for j in out if j < n_windows_eval}

    def calibration_sequences(self) -> list[list[int]]:
        """The thresholders' calibration: a seeded sample of `evaluate.calibration_examples` of the calibration
        sequences `collect` scores (`pipeline.calibration.build` on the collect settings; never evaluated)."""
        from pipeline.calibration import build

        plan = self.cfg.calibration_plan(add_bos=bool(self.cfg.add_bos))
        seqs, _ = build(plan, self.tok)
        n = min(self.cfg.evaluate.calibration_examples or len(seqs), len(seqs))
        pick = sorted(np.random.default_rng(self.cfg.seed).choice(len(seqs), n, replace=False).tolist())
        return [list(seqs[i].input_ids) for i in pick]

    def text(self) -> str:
        if self._text is None:
            from pipeline.data.tasks import load_text

            self._text = load_text(self.cfg.ppl_task, self.cfg.mirror_dir)
        return self._text

    # ---- evaluation ----
    def byte_meter(self, masking: Masking):
        """A fresh per-point meter of the weight bytes `masking` lets a decode step skip (docs/thresholds.md)."""
        from pipeline.evaluate.thresholds import meter

        return meter(masking, self.weight_bytes())

    def weight_bytes(self):
        from pipeline.evaluate.thresholds import WeightBytes

        if self._weight_bytes is None:
            self._weight_bytes = WeightBytes.of(self.model, self.layout)
        return self._weight_bytes

    def unit_sparsity(self, m: MethodRef, sparsity: float) -> tuple[float | None, str]:
        """The unit sparsity `m` runs at for the planned `sparsity` (itself, or with `evaluate.sparsity_unit:
        bytes` the one solved for that byte target from the method's `prunes` and `skips`; None = out of
        reach), and a note saying so."""
        if self.cfg.sparsity_unit == "units" or m.spec.reference:
            return sparsity, ""
        from pipeline.evaluate.thresholds import unit_sparsity_for_bytes

        pools = [p for p in self.cfg.pools if p in m.spec.prunes]
        dense = self.cfg.mask_spec(0.0).dense_layers
        s, most = unit_sparsity_for_bytes(self.weight_bytes(), m.spec.skips, pools, dense, sparsity)
        if s is None:
            return None, f"byte sparsity {sparsity:.2f} out of reach: at most {most:.3f} with pools {pools}"
        return s, f"unit sparsity {s:.4f} for byte sparsity {sparsity:.2f}"

    def masking(self, m: MethodRef, sparsity: float) -> Masking:
        self.ctx.criterion = m.criterion
        g = granularity_of(self.cfg, m)
        self.ctx.granularity = "per_sequence" if g == "none" else g
        return m.spec.build(self.ctx, self.cfg.mask_spec(sparsity))

    def evaluate_task(self, masking: Masking, task: str) -> dict[str, Any]:
        from pipeline.evaluate.loglik import loglikelihoods
        from pipeline.evaluate.tasks import aggregate, per_example

        if task == self.cfg.ppl_task:
            from pipeline.data.tokenize import encode_text_windows
            from pipeline.evaluate.perplexity import perplexity

            n_win = len(encode_text_windows(self.tok, self.text(), self.cfg.seq_len, add_bos=self.cfg.add_bos))
            excl = self.ppl_exclusions(n_win)
            r = perplexity(
                self.model,
                self.tok,
                self.text(),
                seq_len=self.cfg.seq_len,
                batch_size=self.cfg.ppl_batch_size,
                max_windows=self.cfg.max_windows,
                masking=masking,
                exclude=excl,
                add_bos=self.cfg.add_bos,
            )
            n = r["n_windows"]
            metrics = {
                k: {"value": r[k], "stderr": None, "n": n}
                for k in ("token_perplexity", "word_perplexity", "bits_per_byte")
            }
            details = dict(r)  # with the per-window logliks: paired perplexity comparisons (claims)
            return {"metrics": metrics, "details": details, "seconds": r["seconds"]}
        td, reqs = self.task_data(task)
        t0 = time.perf_counter()
        stats: dict[str, int] = {}
        scored = loglikelihoods(
            self.model,
            reqs,
            masking=masking,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.max_length,
            stats=stats,
            mask_sources=self._gold[task],
            bos_id=int(self.tok.bos_token_id) if self.cfg.add_bos else None,
        )
        rows = per_example(td.examples, [s.loglik for s in scored], [s.is_greedy for s in scored])
        metrics = aggregate(task, rows)
        return {
            "metrics": metrics,
            "seconds": time.perf_counter() - t0,
            "details": stats,
            "per_example": [
                {
                    "id": r["id"],
                    "acc": r["acc"],
                    **({"acc_norm": r["acc_norm"]} if "acc_norm" in r else {}),
                    "loglik": [round(x, 5) for x in r["loglik"]],
                }
                for r in rows
            ],
        }

    def run(self, *, force: bool = False) -> list[dict[str, Any]]:
        """Evaluate (or read from cache) every planned point; returns the point records."""
        cfg = self.cfg
        tasks = list(cfg.tasks) + ([cfg.ppl_task] if cfg.ppl_task else [])
        cache = Path(cfg.cache_dir)
        records = []
        units = {"heads": self.layout.n_heads, "neurons": self.layout.ffn_dim}
        for m, s in plan(cfg):
            art = artifact_hash(cfg, m)
            unit, note = self.unit_sparsity(m, s)
            if unit is None:
                self.log(f"  skipped {m.label:<24} s={s:.2f}: {note}")
                continue
            masking = None
            for task in tasks:
                key, ident = point_key(cfg, self.fp, m, s, task, art, unit)
                path = cache / f"{key}.json"
                if path.is_file() and not force:
                    rec = json.loads(path.read_text())
                    rec["cached"] = True
                    records.append(rec)
                    self.log(f"  cached  {m.label:<24} s={s:.2f} {task}")
                    continue
                if masking is None:
                    masking = self.masking(m, unit)
                t0 = time.perf_counter()
                meter = self.byte_meter(masking)
                res = self.evaluate_task(meter.wrap(masking), task)
                spec = cfg.mask_spec(unit)
                desc = describe(spec, self.layout.n_layers, units)
                for pool in masking.missing:  # e.g. a static criterion without neuron scores
                    desc[pool]["effective"] = 0.0
                    desc[pool]["note"] = masking.missing_note
                desc["bytes"] = meter.summary()  # weight bytes a decode step skips, per token (mean, std)
                if cfg.sparsity_unit == "bytes":
                    desc["bytes"]["target"] = s  # the record's `sparsity`; the pools ran at `unit`
                    desc["unit_sparsity"] = unit
                if masking.measured_effective:  # thresholds: the realised count, not a rule's
                    for pool, u in desc["bytes"]["units"].items():
                        if u.get("effective") is not None and pool not in masking.missing:
                            desc[pool]["effective"] = u["effective"]
                rec = {
                    "key": key,
                    "ident": ident,
                    "model": self.model_id,
                    "model_fingerprint": self.fp,
                    "method": m.name,
                    "criterion": m.criterion or "",
                    "label": m.spec.title(m.criterion, granularity_of(cfg, m)),
                    "sparsity": s,
                    "granularity": granularity_of(cfg, m),
                    "scope": "none" if m.spec.reference else cfg.scope,
                    "task": task,
                    "sparsity_detail": desc,
                    **res,
                    "wall_seconds": time.perf_counter() - t0,
                }
                if task in self.splits:
                    rec["split"] = {k: v for k, v in self.splits[task].items() if k != "evaluated_ids"}
                write_json(path, rec)
                rec["cached"] = False
                records.append(rec)
                main = next(iter(res["metrics"].items()))
                self.log(
                    f"  ran     {m.label:<24} s={s:.2f} {task:<11} {main[0]}={main[1]['value']:.4f} "
                    f"n={main[1]['n']} {rec['wall_seconds']:.1f}s"
                )
        return records


def sweep(
    cfg: EvalConfig,
    opened: Any,
    run: Any,
    out_dir: Path,
    metrics_path: Path | None,
    records_path: Path | None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], float]:
    """The evaluate stage's work on an opened model (`pipeline.models.loading.open_model`): every point run or
    read from the cache, the report (`report.write_all`), split.json, the records (`records_path`, for
    `shadowllm claims`), metrics and the report logged to `run`. Returns the records and the sweep's seconds."""
    from pipeline.evaluate.claims import save_records
    from pipeline.evaluate.report import flat_metrics, write_all

    ev = Evaluator(
        cfg, opened.model, opened.tokenizer, opened.layout, opened.fingerprint, model_id=cfg.model.id, log=log
    )
    run.log_params({"add_bos": ev.cfg.add_bos})  # the resolved model.add_bos
    log(f"evaluate: model {cfg.model.id} ({opened.fingerprint}) loaded in {opened.load_seconds:.1f}s; {ev.plan_line()}")
    t0 = time.perf_counter()
    records = ev.run(force=force)
    eval_s = time.perf_counter() - t0
    for t in cfg.tasks:
        ev.task_data(t)  # the split record of every task, also when all points were cached
    out = write_all(out_dir, records, cfg, ev.report_info(), metrics_path)
    write_json(out_dir / "split.json", {"seed": cfg.seed, "calib_fraction": cfg.calib_fraction, "tasks": ev.splits})
    if records_path is not None:
        save_records(records_path, [{k: v for k, v in r.items() if k != "cached"} for r in records])
    n_new = sum(not r["cached"] for r in records)
    timing = {"load_seconds": opened.load_seconds, "eval_seconds": eval_s, "points_evaluated": n_new}
    run.log_metrics({**flat_metrics(out["metrics_full"]), **timing, "points_cached": len(records) - n_new})
    run.log_artifact(out_dir)
    return records, eval_s
