"""The trace format: Parquet shards, one row per calibration example.

Columns (SCHEMA_VERSION 2):
- `example_id` string, `task` string, `n_tokens` int32 (sequence length), `n_target` int32
  (tokens in the loss), `loss` float32 (mean CE over the target tokens), `feat_pos` int32 (the
  token the features below are read at: the last context token, `pipeline.features`)
- `feat_l0`: fixed_size_list<float32>[H·D] — layer-0 head outputs (pre-o_proj) at `feat_pos`
  (the ShadowLLM predictor input)
- `feat_layers`: fixed_size_list<float32>[L·E] — each layer's input hidden state at `feat_pos`
  (the DejaVu predictor inputs), present when `layer_inputs` was collected
- per criterion c: `{c}_heads` fixed_size_list[L·H] and, where defined, `{c}_neurons`
  fixed_size_list[L·F] (row-major: layer, then unit). With float32 storage the values are stored
  as they are. With float16 storage each (row, layer) is divided by its largest magnitude, kept in
  a fixed_size_list<float32>[L] column `{col}_scale`, so that neither tiny (fisher ~1e-10) nor huge
  (jacov ~1e5) scores under- or overflow, and a layer whose scores are 1e-6 of another layer's
  keeps its own ranks (one scale per row, schema 1, left 21-31 % ties and many subnormals in such
  layers); `Traces.array` multiplies the scales back.

File metadata key `shadowllm` holds JSON: schema_version, model (id, fingerprint, dims),
criteria, storage dtype, the collect params and their hash. Shards are `part-NNNNN.parquet`,
each written atomically with Parquet page checksums (CRC32, verified on every read); shard k holds
examples [k·S, (k+1)·S) of the deterministic example list.

`manifest.json`, written by collect last (atomically, after every shard is complete; removed when a
run starts), makes a directory a trace set: manifest_version, schema_version, n_examples, n_shards,
params_hash, code_hash and per shard its file name, row count and sha256. `Traces.open` refuses a
directory without one, with missing or extra shards, or with a shard whose rows or bytes differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.io import atomic_path, sha256_file, write_json

SCHEMA_VERSION = 2
META_KEY = b"shadowllm"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RERUN = "rerun the collect stage"


class TraceError(UserError):
    """A trace directory that is missing, incomplete or corrupt; the message names the directory or shard."""


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def head_col(criterion: str) -> str:
    return f"{criterion}_heads"


def neuron_col(criterion: str) -> str:
    return f"{criterion}_neurons"


def _fixed(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _layer_scales(value: np.ndarray, n_layers: int) -> np.ndarray:
    """[N, L·U] -> [N, L] largest magnitude of each (row, layer); 1 where it is 0 or not finite."""
    x = np.abs(value.reshape(value.shape[0], n_layers, -1))
    with np.errstate(invalid="ignore"):
        scale = np.where(np.isfinite(x), x, 0.0).max(-1).astype(np.float32)
    scale[~np.isfinite(scale) | (scale == 0)] = 1.0
    return scale


def write_shard(path: Path, columns: dict[str, Any], meta: dict[str, Any], storage: str) -> int:
    """Write one shard atomically. Array columns are [N, K] numpy arrays. Returns bytes written.

    With float16 storage each score column is scaled per (row, layer); the layer count comes from
    `meta["model"]["dims"]["n_layers"]`."""
    arrays, names = [], []
    n_layers = int(meta["model"]["dims"]["n_layers"]) if storage == "float16" else 1
    for name, value in columns.items():
        if isinstance(value, np.ndarray) and value.ndim == 2:
            if storage == "float16" and not name.startswith("feat_"):
                if value.shape[1] % n_layers:
                    raise ValueError(f"column {name}: {value.shape[1]} values do not split into {n_layers} layers")
                scale = _layer_scales(value, n_layers)
                scaled = value.reshape(value.shape[0], n_layers, -1) / scale[:, :, None]
                arrays.append(_fixed(scaled.reshape(value.shape).astype(np.float16), pa.float16()))
                names.append(name)
                arrays.append(_fixed(scale, pa.float32()))
                names.append(f"{name}_scale")
                continue
            arrays.append(_fixed(value.astype(np.float32), pa.float32()))
        else:
            arrays.append(pa.array(value))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        # Dictionary encoding and statistics are useless on float scores and cost ~3x the write time.
        pq.write_table(
            table, tmp, compression="zstd", use_dictionary=False, write_statistics=False, write_page_checksum=True
        )
    return path.stat().st_size


def read_meta(path: Path) -> dict[str, Any] | None:
    """The shard's metadata, or None if the file is unreadable (treated as absent)."""
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[META_KEY])
    except Exception:
        return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A shard's columns, every page's CRC checked; an unreadable or corrupt shard is a `TraceError`."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise TraceError(f"{path}: corrupt shard ({_first_line(e)}); {RERUN}") from None


def shard_is_intact(path: Path) -> bool:
    """Whether every page of the shard reads back with its checksum (collect's check before reusing one)."""
    try:
        read_shard(path)
        return True
    except TraceError:
        return False


def _shards_present(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def _listing(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def write_manifest(directory: str | Path, n_examples: int | None = None) -> dict[str, Any]:
    """Write `manifest.json` (atomically) for the shards in `directory`, which must be part-00000 ..
    part-(n-1) of one run (`n_examples` rows in all, where given). Collect calls it last."""
    directory = Path(directory)
    shards = _shards_present(directory)
    names = [p.name for p in shards]
    if not shards or names != [shard_name(k) for k in range(len(shards))]:
        raise ValueError(f"{directory}: shards {names} are not part-00000 .. part-{len(shards) - 1:05d}")
    metas = [read_meta(p) for p in shards]
    hashes = {(m or {}).get("params_hash") for m in metas}
    if None in hashes or len(hashes) != 1:
        raise ValueError(f"{directory}: shards of different or unknown runs ({sorted(map(str, hashes))})")
    entries = [{"file": p.name, "rows": pq.read_metadata(p).num_rows, "sha256": sha256_file(p)} for p in shards]
    total = sum(e["rows"] for e in entries)
    if n_examples is not None and total != n_examples:
        raise ValueError(f"{directory}: shards hold {total} rows, expected {n_examples}")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": metas[0].get("schema_version"),
        "n_examples": total,
        "n_shards": len(entries),
        "params_hash": metas[0]["params_hash"],
        "code_hash": metas[0].get("code_hash"),
        "shards": entries,
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


def _without_manifest(directory: Path, shards: list[Path]) -> TraceError:
    """Why a directory without a manifest is not a trace set: the shards it lacks, from their own metadata."""
    meta = read_meta(shards[0]) or {}
    n, size = meta.get("n_examples"), (meta.get("settings") or {}).get("shard_size")
    have = {p.name for p in shards}
    if isinstance(n, int) and isinstance(size, int) and size > 0:
        expected = [shard_name(k) for k in range(math.ceil(n / size))]
        missing = [name for name in expected if name not in have]
        if missing:
            return TraceError(
                f"{directory}: incomplete trace set: {len(expected) - len(missing)} of {len(expected)} shards "
                f"(missing {_listing(missing)}); {RERUN}"
            )
    return TraceError(
        f"{directory}: incomplete trace set: no {MANIFEST} (collect did not finish, or the traces predate "
        f"manifests); {RERUN}"
    )


def check_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of `directory` once every shard it lists is present (and no other), with its rows and
    sha256 as listed; otherwise a `TraceError` naming what is missing or wrong."""
    shards = _shards_present(directory)
    path = directory / MANIFEST
    if not path.is_file():
        if not shards:
            raise TraceError(f"{directory}: no trace shards (run the collect stage first)")
        raise _without_manifest(directory, shards)
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["shards"]
        listed = [e["file"] for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise TraceError(f"{path}: unreadable manifest ({_first_line(e)}); {RERUN}") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("schema_version") != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: manifest version {manifest.get('manifest_version')} / schema {manifest.get('schema_version')}, "
            f"this code reads {MANIFEST_VERSION} / {SCHEMA_VERSION}; {RERUN}"
        )
    have = {p.name for p in shards}
    missing = [name for name in listed if name not in have]
    if missing:
        raise TraceError(
            f"{directory}: incomplete trace set: {len(listed) - len(missing)} of {len(listed)} shards "
            f"(missing {_listing(missing)}); {RERUN}"
        )
    extra = sorted(have - set(listed))
    if extra:
        raise TraceError(f"{directory}: shards not in {MANIFEST}: {_listing(extra)}; {RERUN}")
    for e in entries:
        shard = directory / e["file"]
        if sha256_file(shard) != e["sha256"]:
            raise TraceError(f"{shard}: content differs from its sha256 in {MANIFEST} (corrupt or replaced); {RERUN}")
        rows = pq.read_metadata(shard).num_rows
        if rows != e["rows"]:
            raise TraceError(f"{shard}: {rows} rows, {MANIFEST} lists {e['rows']}; {RERUN}")
    if sum(e["rows"] for e in entries) != manifest.get("n_examples"):
        raise TraceError(f"{path}: shard rows do not add up to n_examples {manifest.get('n_examples')}; {RERUN}")
    return manifest


@dataclass
class Traces:
    """All shards of one trace directory, read into memory column by column."""

    directory: Path
    meta: dict[str, Any]
    shards: list[Path]

    @classmethod
    def open(cls, directory: str | Path) -> Traces:
        """The trace set in `directory`, checked against its manifest (every shard's sha256: ~1 s per GB);
        a missing, incomplete or corrupt one is a `TraceError`."""
        directory = Path(directory)
        manifest = check_manifest(directory)
        shards = [directory / e["file"] for e in manifest["shards"]]
        meta = read_meta(shards[0])
        if meta is None or meta.get("schema_version") != SCHEMA_VERSION:
            raise TraceError(f"{shards[0]}: not a shadowllm trace of schema version {SCHEMA_VERSION}")
        for s in shards:
            m = read_meta(s)
            if m is None or m.get("params_hash") != manifest["params_hash"]:
                raise TraceError(f"{s}: shard from a different collect run than {MANIFEST}; {RERUN}")
        return cls(directory, meta, shards)

    @property
    def dims(self) -> dict[str, Any]:
        return self.meta["model"]["dims"]

    @property
    def criteria(self) -> list[str]:
        return list(self.meta["criteria"])

    def table(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables(read_shard(s, columns) for s in self.shards)

    def array(self, column: str) -> np.ndarray:
        """A fixed-size-list column as [N, K] float32."""
        scale_col = f"{column}_scale"
        has_scale = scale_col in pq.read_schema(self.shards[0]).names
        table = self.table([column, scale_col] if has_scale else [column])
        col = table.column(column).combine_chunks()
        k = col.type.list_size
        out = col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)
        if has_scale:
            sc = table.column(scale_col).combine_chunks()
            n_layers = sc.type.list_size
            scale = sc.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, n_layers)
            out = (out.reshape(out.shape[0], n_layers, -1) * scale[:, :, None]).reshape(out.shape)
        return out

    def scores(self, criterion: str, unit: str) -> np.ndarray:
        """Per-example scores as [N, L, H] (unit='heads') or [N, L, F] (unit='neurons')."""
        d = self.dims
        n_units = d["n_heads"] if unit == "heads" else d["ffn_dim"]
        col = head_col(criterion) if unit == "heads" else neuron_col(criterion)
        return self.array(col).reshape(-1, d["n_layers"], n_units)

    def column(self, name: str) -> list[Any]:
        return self.table([name]).column(name).to_pylist()
