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
each written atomically; shard k holds examples [k·S, (k+1)·S) of the deterministic example list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_path

SCHEMA_VERSION = 2
META_KEY = b"shadowllm"


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
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False)
    return path.stat().st_size


def read_meta(path: Path) -> dict[str, Any] | None:
    """The shard's metadata, or None if the file is unreadable (treated as absent)."""
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[META_KEY])
    except Exception:
        return None


@dataclass
class Traces:
    """All shards of one trace directory, read into memory column by column."""

    directory: Path
    meta: dict[str, Any]
    shards: list[Path]

    @classmethod
    def open(cls, directory: str | Path) -> Traces:
        directory = Path(directory)
        shards = sorted(directory.glob("part-*.parquet"))
        if not shards:
            raise FileNotFoundError(f"no trace shards in {directory} (run the collect stage first)")
        meta = read_meta(shards[0])
        if meta is None or meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{shards[0]}: not a shadowllm trace of schema version {SCHEMA_VERSION}")
        for s in shards[1:]:
            m = read_meta(s)
            if m is None or m.get("params_hash") != meta.get("params_hash"):
                raise ValueError(f"{s}: shard from a different collect run than {shards[0]}")
        return cls(directory, meta, shards)

    @property
    def dims(self) -> dict[str, Any]:
        return self.meta["model"]["dims"]

    @property
    def criteria(self) -> list[str]:
        return list(self.meta["criteria"])

    def table(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables(pq.read_table(s, columns=columns) for s in self.shards)

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
