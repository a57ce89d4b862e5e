"""The on-disk format of a scored dataset: Parquet shards, one row per ScoredSample (format version 1).

The only module that spells a column name. Columns (Arrow types; Parquet keeps the Arrow schema, so a
reader gets the same types back):

| column | type | content |
|---|---|---|
| `id` | string | the sample's rollout id |
| `input_ids` | list<int32> [T] | prompt then completion |
| `prompt_len` | int32 | loss on tokens prompt_len..T-1 |
| `topk_ids` | list<fixed_size_list<int32>[k]> [R] | row r: the teacher's top-k for token prompt_len + r |
| `topk_logprobs` | list<fixed_size_list<halffloat or float>[k]> [R] | natural-log probabilities, sorted |
| `teacher` | string (dictionary) | teacher model id |
| `k` | int32 | top-k |
| `scored_ms` | int64 | when the teacher scored it |
| `policy_version`, `created_ms` | int64 | from the rollout |
| `source` | string (dictionary) | "student", "dataset", ... |
| `meta` | string | the rollout's meta map as JSON (msgpack bins as ``{"$b64": ...}``) |
| `content_hash` | fixed_size_binary(16) | `content_hash(input_ids, teacher, k)`: the cache key |

Shape legend: T = tokens of a sample, R = T - prompt_len scored rows, K = top-k, N = samples.
pyarrow is an optional dependency (the `datasets` extra): `require_pyarrow()` imports it or raises
`MissingExtra` naming the extra.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from pipeline.errors import MissingExtra, WireFormatError
from pipeline.wire.codec import Rollout, ScoredSample

FORMAT = "gkd-scored-dataset"
FORMAT_VERSION = 1
HASH_BYTES = 16
_HASH_DOMAIN = b"gkd-scored-v1\0"

#: Logprob dtypes by the run-config spelling (`logprob_dtype`).
LOGPROB_DTYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class ParquetOptions:
    """How shards are encoded. Lossless whatever the choice; the defaults are the smallest measured
    at k = 20 and 64 (`gkd bench export`)."""

    compression: str = "zstd"
    """Parquet codec: zstd, lz4, snappy, gzip or none."""
    compression_level: int | None = 3
    """Codec level (zstd 1-22; None: the codec's default)."""
    topk_ids_encoding: str = "BYTE_STREAM_SPLIT"
    """Encoding of the top-k ids: BYTE_STREAM_SPLIT, DELTA_BINARY_PACKED or PLAIN."""
    logprob_encoding: str = "BYTE_STREAM_SPLIT"
    """Encoding of the logprobs: BYTE_STREAM_SPLIT or PLAIN."""
    row_group_samples: int = 256
    """Samples per Parquet row group (the unit a reader decodes for one sample)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "compression": self.compression,
            "compression_level": self.compression_level,
            "topk_ids_encoding": self.topk_ids_encoding,
            "logprob_encoding": self.logprob_encoding,
            "row_group_samples": self.row_group_samples,
        }


def require_pyarrow() -> tuple[ModuleType, ModuleType]:
    """(pyarrow, pyarrow.parquet), or MissingExtra naming the extra that installs them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtra(
            "scored datasets (gkd export, gkd replay, --skip-scored) need pyarrow, which is not installed; "
            "install the extra: pip install 'gkd-pipeline[datasets]'"
        ) from None
    return pa, pq


def content_hash(input_ids: np.ndarray, teacher: str, k: int) -> bytes:
    """The cache key of a scored sequence: its exact token ids, the teacher and k (16 bytes).

    The same ids scored by the same teacher at the same k have the same top-k rows, whoever produced
    them; another teacher or k never matches.
    """
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(_HASH_DOMAIN)
    h.update(teacher.encode())
    h.update(b"\0")
    h.update(int(k).to_bytes(4, "little"))
    h.update(np.ascontiguousarray(input_ids, dtype="<i4").tobytes())
    return h.digest()


def arrow_schema(k: int, logprob_dtype: str) -> Any:
    """The Arrow schema of a shard of a dataset with this k and logprob dtype."""
    pa, _ = require_pyarrow()
    lp = pa.float16() if logprob_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("prompt_len", pa.int32()),
            ("topk_ids", pa.list_(pa.list_(pa.int32(), k))),
            ("topk_logprobs", pa.list_(pa.list_(lp, k))),
            ("teacher", pa.dictionary(pa.int32(), pa.string())),
            ("k", pa.int32()),
            ("scored_ms", pa.int64()),
            ("policy_version", pa.int64()),
            ("created_ms", pa.int64()),
            ("source", pa.dictionary(pa.int32(), pa.string())),
            ("meta", pa.string()),
            ("content_hash", pa.binary(HASH_BYTES)),
        ]
    )


def parquet_write_kwargs(opts: ParquetOptions) -> dict[str, Any]:
    """Keyword arguments of `pyarrow.parquet.ParquetWriter` for these options."""
    leaf = ".list.element.list.element"
    return {
        "compression": opts.compression,
        "compression_level": opts.compression_level,
        # Dictionaries pay only for the low-cardinality string columns; column_encoding requires the
        # encoded columns to be left out of them.
        "use_dictionary": ["teacher", "source"],
        "column_encoding": {
            "topk_ids" + leaf: opts.topk_ids_encoding,
            "topk_logprobs" + leaf: opts.logprob_encoding,
            "prompt_len": "PLAIN",
        },
        "write_statistics": ["id", "prompt_len", "k", "scored_ms"],
        "data_page_version": "2.0",
    }


# ---------------------------------------------------------------------------------------------- meta


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(obj)).decode()}
    raise TypeError(f"expected a plain msgpack value, got {type(obj).__name__}")


def _json_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$b64" in obj and isinstance(obj["$b64"], str):
        return base64.b64decode(obj["$b64"])
    return obj


def meta_to_json(meta: dict[str, Any]) -> str:
    """A rollout's meta map as JSON text (bins become {"$b64": ...}; map keys become strings)."""
    return json.dumps(meta, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def meta_from_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text, object_hook=_json_hook)
    if not isinstance(value, dict):
        raise WireFormatError("meta", f"expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------- rows


def samples_to_table(samples: Sequence[ScoredSample], k: int, logprob_dtype: str) -> Any:
    """One Arrow table of `samples` (all with this k and dtype; checked by the caller)."""
    pa, _ = require_pyarrow()
    schema = arrow_schema(k, logprob_dtype)
    lp_dtype = LOGPROB_DTYPES[logprob_dtype]
    ids_T = [np.asarray(s.rollout.input_ids, dtype="<i4") for s in samples]
    t_off = np.zeros(len(samples) + 1, dtype=np.int32)
    np.cumsum([a.shape[0] for a in ids_T], out=t_off[1:])
    r_off = np.zeros(len(samples) + 1, dtype=np.int32)
    np.cumsum([s.topk_ids.shape[0] for s in samples], out=r_off[1:])
    flat_ids = np.concatenate([s.topk_ids.reshape(-1) for s in samples]) if samples else np.empty(0, "<i4")
    flat_lp = (
        np.concatenate([s.topk_logprobs.reshape(-1) for s in samples]).astype(lp_dtype, copy=False)
        if samples
        else np.empty(0, lp_dtype)
    )

    def rows_of(flat: np.ndarray) -> Any:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), k)
        return pa.ListArray.from_arrays(pa.array(r_off), inner)

    columns = [
        pa.array([s.rollout.id for s in samples], pa.string()),
        pa.ListArray.from_arrays(
            pa.array(t_off), pa.array(np.concatenate(ids_T) if ids_T else np.empty(0, "<i4"))
        ),
        pa.array([s.rollout.prompt_len for s in samples], pa.int32()),
        rows_of(flat_ids.astype("<i4", copy=False)),
        rows_of(flat_lp),
        pa.array([s.teacher for s in samples], pa.string()).dictionary_encode(),
        pa.array([s.k for s in samples], pa.int32()),
        pa.array([s.scored_ms for s in samples], pa.int64()),
        pa.array([s.rollout.policy_version for s in samples], pa.int64()),
        pa.array([s.rollout.created_ms for s in samples], pa.int64()),
        pa.array([s.rollout.source for s in samples], pa.string()).dictionary_encode(),
        pa.array([meta_to_json(s.rollout.meta) for s in samples], pa.string()),
        pa.array(
            [content_hash(a, s.teacher, s.k) for a, s in zip(ids_T, samples, strict=True)],
            pa.binary(HASH_BYTES),
        ),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _flat_rows(col: Any) -> tuple[np.ndarray, Any]:
    """(offsets relative to the first row [N + 1], flat values) of a list column of one batch."""
    offsets = col.offsets.to_numpy()
    return offsets - offsets[0], col.flatten()


def _numpy(arr: Any) -> np.ndarray:
    out: np.ndarray = arr.to_numpy(zero_copy_only=False)
    return out


class RowBatch:
    """Zero-copy access to the samples of one Arrow record batch or table (decoded once per column)."""

    def __init__(self, batch: Any) -> None:
        if hasattr(batch, "combine_chunks"):
            batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else batch
        self.n = batch.num_rows
        names = batch.schema.names
        col = {name: batch.column(i) for i, name in enumerate(names)}
        self.ids = col["id"].to_pylist()
        self.t_off, ids = _flat_rows(col["input_ids"])
        self.input_ids = _numpy(ids)
        self.prompt_len = _numpy(col["prompt_len"])
        self.r_off, fsl = _flat_rows(col["topk_ids"])
        self.k = fsl.type.list_size
        self.topk_ids = _numpy(fsl.flatten())
        _, fsl_lp = _flat_rows(col["topk_logprobs"])
        self.topk_logprobs = _numpy(fsl_lp.flatten())
        self.teacher = _dict_strings(col["teacher"])
        self.k_col = _numpy(col["k"])
        self.scored_ms = _numpy(col["scored_ms"])
        self.policy_version = _numpy(col["policy_version"])
        self.created_ms = _numpy(col["created_ms"])
        self.source = _dict_strings(col["source"])
        self.meta = col["meta"].to_pylist()
        self.hashes = col["content_hash"].to_pylist()

    def sample(self, i: int, sample_id: str | None = None) -> ScoredSample:
        """Sample `i` of the batch (arrays are views into the batch); `sample_id` replaces its id."""
        if not 0 <= i < self.n:
            raise IndexError(f"row {i}: expected 0 <= row < {self.n}")
        t0, t1 = int(self.t_off[i]), int(self.t_off[i + 1])
        r0, r1 = int(self.r_off[i]), int(self.r_off[i + 1])
        k = self.k
        ro = Rollout(
            id=sample_id or self.ids[i],
            input_ids=self.input_ids[t0:t1],
            prompt_len=int(self.prompt_len[i]),
            policy_version=int(self.policy_version[i]),
            source=self.source[i],
            created_ms=int(self.created_ms[i]),
            meta=meta_from_json(self.meta[i]),
        )
        return ScoredSample(
            rollout=ro,
            topk_ids=self.topk_ids[r0 * k : r1 * k].reshape(r1 - r0, k),
            topk_logprobs=self.topk_logprobs[r0 * k : r1 * k].reshape(r1 - r0, k),
            teacher=self.teacher[i],
            k=int(self.k_col[i]),
            scored_ms=int(self.scored_ms[i]),
        )

    def __iter__(self) -> Iterator[ScoredSample]:
        return (self.sample(i) for i in range(self.n))


def _dict_strings(col: Any) -> list[str]:
    values: list[str] = col.to_pylist()
    return values
