"""The wire format: packed msgpack tensors and the two records (Rollout, ScoredSample).

Versions: a Rollout is version 1. A ScoredSample is version 1 (the teacher's top-k) or version 2 (a
sampled teacher, RS-KD: version 1's fields plus ``teacher_counts``, int32 [R, K], how often each entry was
drawn). A reader checks the version before any other field, so a reader that knows version 1 only refuses
a version-2 record with a WireFormatError naming ``v``: it never reads draws as a top-k.

The only module that spells a msgpack field. A tensor is the map
``{"dtype": "<i4" | "<i8" | "<f2" | "<f4", "shape": [..], "data": <bin, C order>}``.
Decoding is zero-copy: arrays are read-only ``numpy.frombuffer`` views into the message itself
(`pipeline.wire.mpack` reads bins as memoryview slices); encoding copies each tensor once. Only plain msgpack
types are decoded: no pickle, and ext types are rejected. Every
validation failure raises `WireFormatError` naming the field, what was expected and what came.

Shape legend: T = tokens in a rollout (prompt + completion), P = prompt_len, R = T - P rows scored,
K = teacher top-k.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import WireFormatError
from pipeline.wire import mpack

VERSION = 1
"""Rollouts and top-k ScoredSamples."""
SAMPLED_VERSION = 2
"""ScoredSamples of a sampled teacher (they carry ``teacher_counts``)."""
SCORED_VERSIONS = (VERSION, SAMPLED_VERSION)

#: dtype strings accepted on the wire (little-endian only).
TENSOR_DTYPES = frozenset({"<i4", "<i8", "<f2", "<f4"})
ID_DTYPES = frozenset({"<i4"})
LOGPROB_WIRE_DTYPES = frozenset({"<f2", "<f4"})

#: Rollout `meta` key set when a resume puts a trained rollout back to be scored and trained again:
#: the optimizer step that trained it before (in steps no checkpoint kept). Such a rollout is exempt
#: from the staleness filter: it already passed it once, and dropping it now would lose it.
META_RETRAIN_OF_STEP = "retrain_of_step"

#: Longest teacher name a Rollout may carry (names are checked against the workers' teachers).
MAX_TEACHER_NAME = 64


@dataclass(frozen=True)
class Limits:
    """Size limits applied to every decoded (and encoded) record."""

    max_tokens: int = 32768
    """Largest T (prompt + completion tokens) in one rollout."""
    max_k: int = 256
    """Largest teacher top-k."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest encoded record in bytes."""


DEFAULT_LIMITS = Limits()


@dataclass
class Rollout:
    """A student sequence waiting for teacher scores. Loss is on tokens prompt_len..T-1."""

    id: str
    input_ids: np.ndarray
    """int32 [T]: exactly the ids the student trains on, prompt then completion."""
    prompt_len: int
    policy_version: int = 0
    source: str = "dataset"
    created_ms: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    teacher_name: str | None = None
    """The named teacher that must score it (wire field `teacher_name`, absent when None: the run's
    default teacher). A worker without that teacher dead-letters it, naming the teachers it has."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class ScoredSample:
    """A Rollout with the teacher's top-k (or draws). Row r is the distribution over token prompt_len + r."""

    rollout: Rollout
    topk_ids: np.ndarray
    """int32 [R, K], each row sorted by logprob, descending. Sampled: the distinct drawn ids, then padding."""
    topk_logprobs: np.ndarray
    """float16 | float32 [R, K], natural-log probabilities normalized over the full vocabulary."""
    teacher: str
    k: int
    scored_ms: int = 0
    teacher_counts: np.ndarray | None = None
    """Sampled teacher only (version 2): int32 [R, K], how often each entry was drawn in the row's K = n
    draws (each row sums to K; count-0 entries are padding). None: a top-k sample (version 1)."""

    @property
    def sampled(self) -> bool:
        """Whether the rows are draws from the teacher (RS-KD) rather than its top-k."""
        return self.teacher_counts is not None


# ---------------------------------------------------------------------------------------------- tensors


def pack_tensor(arr: np.ndarray, name: str = "tensor") -> dict[str, Any]:
    """Return the msgpack map of a tensor; the data is a view when `arr` is C-contiguous (no copy here)."""
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == "=" else arr.dtype
    if dtype.str not in TENSOR_DTYPES:
        raise WireFormatError(
            name, f"expected dtype in {sorted(TENSOR_DTYPES)} (little-endian), got {arr.dtype.str!r}"
        )
    arr = np.ascontiguousarray(arr)
    return {"dtype": dtype.str, "shape": list(arr.shape), "data": arr.data.cast("B")}


def unpack_tensor(obj: Any, name: str, dtypes: frozenset[str], ndim: int) -> np.ndarray:
    """Validate a decoded tensor map and return a read-only zero-copy numpy view of its data."""
    if not isinstance(obj, dict):
        raise WireFormatError(name, f"expected a tensor map, got {type(obj).__name__}")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise WireFormatError(f"{name}.dtype", f"expected one of {sorted(dtypes)}, got {dtype!r}")
    if not isinstance(shape, list) or len(shape) != ndim:
        raise WireFormatError(f"{name}.shape", f"expected a list of {ndim} ints, got {shape!r:.80}")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise WireFormatError(f"{name}.shape", f"expected non-negative ints, got {shape!r:.80}")
    if not isinstance(data, (bytes, memoryview)):
        raise WireFormatError(f"{name}.data", f"expected bin, got {type(data).__name__}")
    itemsize = int(dtype[2:])
    expected = itemsize
    for d in shape:
        expected *= d
    if expected != len(data):
        raise WireFormatError(
            f"{name}.data",
            f"shape {shape} of {dtype} needs {expected} bytes, got {len(data)}",
        )
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


# ---------------------------------------------------------------------------------------------- records


def _unpack(
    buf: bytes | memoryview, limits: Limits, record: str, versions: tuple[int, ...] = (VERSION,)
) -> dict[str, Any]:
    if len(buf) > limits.max_message_bytes:
        raise WireFormatError(record, f"expected at most {limits.max_message_bytes} bytes, got {len(buf)}")
    try:
        obj = mpack.loads(buf)
    except ValueError as exc:
        raise WireFormatError(record, f"expected one plain msgpack map, got {exc}") from None
    if not isinstance(obj, dict):
        raise WireFormatError(record, f"expected a msgpack map, got {type(obj).__name__}")
    check_version(obj.get("v"), versions)
    return obj


def check_version(v: Any, versions: tuple[int, ...]) -> None:
    """Raise WireFormatError naming ``v`` unless it is one of the reader's `versions` (checked before any
    other field: a reader never reads a record of a version it does not know)."""
    if type(v) is not int or v not in versions:
        known = " or ".join(str(x) for x in versions)
        hint = ""
        if type(v) is int and v > max(versions):
            hint = " (written by a newer gkd-pipeline: upgrade this reader)"
        raise WireFormatError("v", f"expected version {known}, got {v!r}{hint}")


def _int(obj: Mapping[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise WireFormatError(name, f"expected an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise WireFormatError(name, f"expected an int in [{lo}, {hi}], got {value}")
    return value


def _str(obj: Mapping[str, Any], name: str, max_len: int = 1024) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise WireFormatError(name, f"expected a non-empty string of <= {max_len} chars, got {value!r:.80}")
    return value


def _check_rollout(r: Rollout, limits: Limits) -> None:
    ids = r.input_ids
    if ids.ndim != 1:
        raise WireFormatError("input_ids.shape", f"expected 1 dimension [T], got {list(ids.shape)}")
    t = ids.shape[0]
    if t > limits.max_tokens:
        raise WireFormatError("input_ids.shape", f"expected T <= {limits.max_tokens}, got {t}")
    if not 1 <= r.prompt_len < t:
        raise WireFormatError("prompt_len", f"expected 1 <= prompt_len < T = {t}, got {r.prompt_len}")
    if t and int(ids.min()) < 0:
        raise WireFormatError("input_ids", f"expected non-negative token ids, got {int(ids.min())}")
    name = r.teacher_name
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_TEACHER_NAME):
        raise WireFormatError(
            "teacher_name", f"expected None or a string of 1..{MAX_TEACHER_NAME} chars, got {name!r:.80}"
        )


def _rollout_map(r: Rollout, limits: Limits) -> dict[str, Any]:
    ids = r.input_ids
    if ids.dtype != np.int32:
        if ids.dtype.kind not in "iu":
            raise WireFormatError("input_ids", f"expected integer ids, got dtype {ids.dtype}")
        if ids.size and (int(ids.max()) > np.iinfo(np.int32).max):
            raise WireFormatError("input_ids", f"expected ids < 2**31, got {int(ids.max())}")
        ids = ids.astype(np.int32)
    _check_rollout(r, limits)
    out: dict[str, Any] = {
        "v": VERSION,
        "id": r.id,
        "input_ids": pack_tensor(ids, "input_ids"),
        "prompt_len": int(r.prompt_len),
        "policy_version": int(r.policy_version),
        "source": r.source,
        "created_ms": int(r.created_ms),
        "meta": r.meta,
    }
    if r.teacher_name is not None:
        out["teacher_name"] = r.teacher_name
    return out


def _rollout_from(obj: dict[str, Any], limits: Limits) -> Rollout:
    ids = unpack_tensor(obj.get("input_ids"), "input_ids", ID_DTYPES, 1)
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise WireFormatError("meta", f"expected a map, got {type(meta).__name__}")
    r = Rollout(
        id=_str(obj, "id"),
        input_ids=ids,
        prompt_len=_int(obj, "prompt_len"),
        policy_version=_int(obj, "policy_version", lo=0),
        source=_str(obj, "source"),
        created_ms=_int(obj, "created_ms", lo=0),
        meta=meta,
        teacher_name=_str(obj, "teacher_name", MAX_TEACHER_NAME) if "teacher_name" in obj else None,
    )
    _check_rollout(r, limits)
    return r


def encode_rollout(r: Rollout, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate and encode a Rollout (ids of any integer dtype are converted to int32)."""
    return mpack.dumps(_rollout_map(r, limits))


def decode_rollout(buf: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Rollout:
    """Decode and validate a Rollout. Raises WireFormatError naming the bad field."""
    return _rollout_from(_unpack(buf, limits, "rollout"), limits)


def _check_scores(r: Rollout, ids_RK: np.ndarray, logprobs_RK: np.ndarray, k: int, limits: Limits) -> None:
    rows = r.num_tokens - r.prompt_len
    if ids_RK.ndim != 2 or ids_RK.shape[0] != rows:
        raise WireFormatError(
            "topk_ids.shape", f"expected [R={rows}, k] (R = T - prompt_len), got {list(ids_RK.shape)}"
        )
    if ids_RK.shape != logprobs_RK.shape:
        raise WireFormatError(
            "topk_logprobs.shape",
            f"expected the shape of topk_ids {list(ids_RK.shape)}, got {list(logprobs_RK.shape)}",
        )
    if not 1 <= k <= limits.max_k:
        raise WireFormatError("k", f"expected 1 <= k <= {limits.max_k}, got {k}")
    if ids_RK.shape[1] != k:
        raise WireFormatError("topk_ids.shape", f"expected k = {k} columns, got {ids_RK.shape[1]}")
    if ids_RK.size and int(ids_RK.min()) < 0:
        raise WireFormatError("topk_ids", f"expected non-negative token ids, got {int(ids_RK.min())}")


def _check_counts(counts_RK: np.ndarray, k: int) -> None:
    """Draw counts: int32, the shape of topk_ids (checked before), non-negative, each row summing to K."""
    if counts_RK.size and int(counts_RK.min()) < 0:
        raise WireFormatError("teacher_counts", f"expected non-negative counts, got {int(counts_RK.min())}")
    sums_R = counts_RK.sum(axis=1, dtype=np.int64)
    bad = np.flatnonzero(sums_R != k)
    if bad.size:
        raise WireFormatError(
            "teacher_counts", f"expected every row to sum to k = {k} draws, got {int(sums_R[bad[0]])} "
            f"in row {int(bad[0])}"
        )  # fmt: skip


def encode_scored(s: ScoredSample, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate and encode a ScoredSample; topk_ids must be int32, logprobs float16 or float32, counts
    (a sampled teacher's; written as version 2) int32."""
    obj = _rollout_map(s.rollout, limits)
    _check_scores(s.rollout, s.topk_ids, s.topk_logprobs, s.k, limits)
    if s.topk_ids.dtype != np.int32:
        raise WireFormatError("topk_ids", f"expected dtype int32, got {s.topk_ids.dtype}")
    if s.topk_logprobs.dtype not in (np.float16, np.float32):
        raise WireFormatError(
            "topk_logprobs", f"expected dtype float16 or float32, got {s.topk_logprobs.dtype}"
        )
    obj["topk_ids"] = pack_tensor(s.topk_ids, "topk_ids")
    obj["topk_logprobs"] = pack_tensor(s.topk_logprobs, "topk_logprobs")
    obj["teacher"] = s.teacher
    obj["k"] = int(s.k)
    obj["scored_ms"] = int(s.scored_ms)
    if s.teacher_counts is not None:
        counts_RK = s.teacher_counts
        if counts_RK.dtype != np.int32 or counts_RK.shape != s.topk_ids.shape:
            raise WireFormatError(
                "teacher_counts", f"expected int32 {list(s.topk_ids.shape)} (as topk_ids), got "
                f"{counts_RK.dtype} {list(counts_RK.shape)}"
            )  # fmt: skip
        _check_counts(counts_RK, s.k)
        obj["v"] = SAMPLED_VERSION
        obj["teacher_counts"] = pack_tensor(counts_RK, "teacher_counts")
    out = mpack.dumps(obj)
    if len(out) > limits.max_message_bytes:
        raise WireFormatError("scored", f"expected at most {limits.max_message_bytes} bytes, got {len(out)}")
    return out


def decode_scored(buf: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> ScoredSample:
    """Decode and validate a ScoredSample (version 1 or 2). Raises WireFormatError naming the bad field."""
    obj = _unpack(buf, limits, "scored", SCORED_VERSIONS)
    r = _rollout_from(obj, limits)
    ids_RK = unpack_tensor(obj.get("topk_ids"), "topk_ids", ID_DTYPES, 2)
    logprobs_RK = unpack_tensor(obj.get("topk_logprobs"), "topk_logprobs", LOGPROB_WIRE_DTYPES, 2)
    k = _int(obj, "k")
    _check_scores(r, ids_RK, logprobs_RK, k, limits)
    counts_RK = None
    if obj["v"] == SAMPLED_VERSION:
        counts_RK = unpack_tensor(obj.get("teacher_counts"), "teacher_counts", ID_DTYPES, 2)
        if counts_RK.shape != ids_RK.shape:
            raise WireFormatError(
                "teacher_counts.shape",
                f"expected the shape of topk_ids {list(ids_RK.shape)}, got {list(counts_RK.shape)}",
            )
        _check_counts(counts_RK, k)
    elif "teacher_counts" in obj:
        raise WireFormatError("teacher_counts", f"expected none in a version {VERSION} record, got a value")
    return ScoredSample(
        rollout=r,
        topk_ids=ids_RK,
        topk_logprobs=logprobs_RK,
        teacher=_str(obj, "teacher"),
        k=k,
        scored_ms=_int(obj, "scored_ms", lo=0),
        teacher_counts=counts_RK,
    )
