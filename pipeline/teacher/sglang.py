"""The SGLang protocol: `POST /generate` with input top logprobs, nested or flat/base64, and test vectors.

Request: ``{"input_ids", "return_logprob": true, "logprob_start_len": s, "top_logprobs_num": k,
"sampling_params": {"max_new_tokens": 1, "temperature": 0}}``; we send s = prompt_len - 1.

Row alignment (checked against SGLang's scheduler, `add_input_logprob_return_values`): the input
logprob lists start at `logprob_start_len`, not at 0. Entry j is the distribution over token s + j given
tokens < s + j; entry 0 (token s) is always null ("Always pad the first one with None"), because the
logits that would predict token s (at position s - 1) are not computed; the last position's logits are
the sampled token's and are popped. So the list has T - s entries, and with s = prompt_len - 1,
entries 1..T-s-1 are exactly the R = T - prompt_len rows the loss uses. (Older SGLang versions padded
the null only when s == 0; a list of exactly R non-null rows is accepted as that form.)

Nested: ``meta_info.input_top_logprobs`` is a list of null | list of ``[logprob, token_id, text]``
triples (text null unless `return_text_in_logprobs`). -inf appears as null (orjson renders -inf so).

Flat (``return_flat_raw_top_logprobs`` + ``return_flat_raw_top_logprobs_b64``): meta_info has
``input_top_logprobs_shape`` = [rows, k] (rows counting the null prefix), ``input_top_logprobs_null_prefix``
(leading null rows, normally 1), and ``input_top_logprobs_{val,idx}_flat_b64`` with
``..._b64_dtype`` ("float32"/"int32"): base64 of the (rows - null_prefix) x k C-order array, so covered
row p (>= null_prefix) starts at flat element (p - null_prefix) * k. No nested JSON to decode.

Shape legend: T = tokens, s = logprob_start_len, R = T - prompt_len, K = top-k.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar

import numpy as np
import orjson

from pipeline.errors import MalformedResponse
from pipeline.teacher import rows
from pipeline.teacher.protocol import TeacherProtocol
from pipeline.teacher.vllm import loads

GENERATE_PATH = "/generate"
MODEL_INFO_PATH = "/get_model_info"
_FLAT_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float64": np.dtype("<f8"),
}


def build_request(input_ids: list[int], prompt_len: int, k: int, *, flat: bool = True) -> dict[str, Any]:
    """The `/generate` body asking for the top-`k` input logprobs of tokens prompt_len..T-1."""
    body: dict[str, Any] = {
        "input_ids": input_ids,
        "return_logprob": True,
        "logprob_start_len": prompt_len - 1,
        "top_logprobs_num": k,
        "return_text_in_logprobs": False,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
    }
    if flat:
        body["return_flat_raw_top_logprobs"] = True
        body["return_flat_raw_top_logprobs_b64"] = True
    return body


def parse_response(raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [R, K], logprobs float32 [R, K]) of tokens prompt_len..T-1, sorted descending.

    Accepts the nested and the flat/base64 meta_info forms (whichever the server sent). Assumes the
    request used logprob_start_len = prompt_len - 1 (`build_request`). Raises MalformedResponse.
    """
    what = "SGLang input_top_logprobs"
    body = loads(raw, what)
    if isinstance(body, list) and len(body) == 1:
        body = body[0]  # /generate answers a list when the request was batched
    meta = body.get("meta_info") if isinstance(body, dict) else None
    if not isinstance(meta, dict):
        raise MalformedResponse(f"{what}: expected a /generate body with meta_info, got {str(body)[:80]}")
    start = prompt_len - 1
    covered = num_tokens - start  # entries SGLang returns: tokens s..T-1
    if "input_top_logprobs_shape" in meta:
        return _parse_flat(meta, covered, k, what, start)
    top = meta.get("input_top_logprobs")
    if not isinstance(top, list):
        raise MalformedResponse(
            f"{what}: expected meta_info.input_top_logprobs (list) or the flat fields, got keys "
            f"{sorted(meta)[:12]} (was return_logprob/top_logprobs_num sent?)"
        )
    if len(top) == covered and top[:1] == [None]:
        needed = top[1:]
    elif len(top) == covered - 1 and (not top or top[0] is not None):
        needed = top  # older SGLang: no null pad when logprob_start_len > 0
    else:
        raise MalformedResponse(
            f"{what}: expected {covered} rows (tokens {start}..{num_tokens - 1}, first null), got {len(top)}"
        )
    return parse_nested_rows(needed, k, what, row_offset=prompt_len)


def parse_nested_rows(
    rows_R: list[Any], k: int, what: str, *, row_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `[logprob, token_id, text]` triples -> validated [R, K] arrays (vectorized)."""
    try:
        lps = [e[0] for row in rows_R for e in row]
        ids = [e[1] for row in rows_R for e in row]
        lens = [len(row) for row in rows_R]
    except (TypeError, IndexError, KeyError):
        bad = next((i for i, row in enumerate(rows_R) if not isinstance(row, list)), 0)
        raise MalformedResponse(
            f"{what}: expected row {bad + row_offset} to be a list of [logprob, token_id, text], "
            f"got {str(rows_R[bad])[:80]}"
        ) from None
    return rows.finalize(
        rows.to_id_array(ids, what), rows.to_float_array(lps, what), lens, k, what, row_offset=row_offset
    )


def _decode_flat(meta: dict[str, Any], name: str, n: int, what: str) -> np.ndarray:
    dtype_name = meta.get(f"{name}_b64_dtype", "float32" if "val" in name else "int32")
    dtype = _FLAT_DTYPES.get(str(dtype_name))
    if dtype is None:
        raise MalformedResponse(
            f"{what}: expected {name}_b64_dtype in {sorted(_FLAT_DTYPES)}, got {dtype_name!r}"
        )
    data = meta.get(f"{name}_b64")
    if not isinstance(data, str):
        plain = meta.get(name)
        if isinstance(plain, list):  # flat lists without base64
            arr = rows.to_float_array(plain, what) if "val" in name else rows.to_id_array(plain, what)
            if arr.shape != (n,):
                raise MalformedResponse(f"{what}: expected {n} values in {name}, got {arr.shape}")
            return arr
        raise MalformedResponse(f"{what}: expected {name}_b64 (base64 string), got {type(data).__name__}")
    try:
        buf = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedResponse(f"{what}: {name}_b64 is not valid base64 ({exc})") from None
    if len(buf) != n * dtype.itemsize:
        raise MalformedResponse(
            f"{what}: expected {n} {dtype_name} values in {name}_b64, got {len(buf)} bytes"
        )
    return np.frombuffer(buf, dtype=dtype)


def _parse_flat(
    meta: dict[str, Any], covered: int, k: int, what: str, start: int
) -> tuple[np.ndarray, np.ndarray]:
    shape = meta.get("input_top_logprobs_shape")
    prefix = meta.get("input_top_logprobs_null_prefix", 0)
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) for x in shape)):
        raise MalformedResponse(f"{what}: expected input_top_logprobs_shape [rows, k], got {shape!r}")
    n_rows, width = shape
    if n_rows != covered or not isinstance(prefix, int) or not 0 <= prefix <= 1:
        raise MalformedResponse(
            f"{what}: expected {covered} rows (tokens {start}..{start + covered - 1}) with a null prefix "
            f"of 0 or 1, got shape {shape} and null_prefix {prefix!r}"
        )
    if width < k:
        raise MalformedResponse(f"{what}: expected k={k} entries per row, got {width}")
    n = (n_rows - prefix) * width
    val_raw = _decode_flat(meta, "input_top_logprobs_val_flat", n, what)
    idx_raw = _decode_flat(meta, "input_top_logprobs_idx_flat", n, what)
    if idx_raw.dtype.kind not in "iu":
        raise MalformedResponse(f"{what}: expected integer token ids in the idx field, got {idx_raw.dtype}")
    with np.errstate(invalid="ignore"):  # a signalling NaN from the wire is reported by the NaN check
        val_N = val_raw.astype(np.float64)
    idx_N = idx_raw.astype(np.int64)
    skip = (1 - prefix) * width  # drop token s's row when it was sent (it is before prompt_len)
    val_N, idx_N = val_N[skip:], idx_N[skip:]
    if width != k:
        val_N = val_N.reshape(-1, width)[:, :k].reshape(-1)
        idx_N = idx_N.reshape(-1, width)[:, :k].reshape(-1)
    return rows.finalize(idx_N, val_N, None, k, what, row_offset=start + 1)


# -------------------------------------------------------------------------------------- test vectors


def build_generate_body(
    ids_TK: np.ndarray, logprobs_TK: np.ndarray, prompt_len: int, *, flat: bool = False, text: str = ""
) -> dict[str, Any]:
    """A `/generate` response body for top-k arrays, as SGLang sends it for logprob_start_len =
    prompt_len - 1: row t (t >= prompt_len) of the arrays is the distribution over token t.

    Nested: `input_top_logprobs` = [null, rows prompt_len..T-1 as [logprob, id, null] triples], -inf as
    null. Flat: the base64 fields with shape [T - prompt_len + 1, k] and null_prefix 1.
    """
    T, k = ids_TK.shape
    start = prompt_len - 1
    meta: dict[str, Any] = {
        "id": "sglang-test",
        "finish_reason": {"type": "length", "length": 1},
        "prompt_tokens": T,
        "completion_tokens": 1,
        "cached_tokens": 0,
    }
    if flat:
        meta["input_top_logprobs_shape"] = [T - start, k]
        meta["input_top_logprobs_null_prefix"] = 1
        for name, arr, dt in (("val", logprobs_TK, "<f4"), ("idx", ids_TK, "<i4")):
            meta[f"input_top_logprobs_{name}_flat_b64"] = base64.b64encode(
                np.ascontiguousarray(arr[prompt_len:], dtype=dt).tobytes()
            ).decode()
            meta[f"input_top_logprobs_{name}_flat_b64_dtype"] = "float32" if name == "val" else "int32"
    else:
        lp = np.asarray(logprobs_TK, np.float64).tolist()
        ids = np.asarray(ids_TK).tolist()
        meta["input_top_logprobs"] = [None] + [
            [[None if v == float("-inf") else v, i, None] for v, i in zip(lp[t], ids[t], strict=False)]
            for t in range(prompt_len, T)
        ]
    return {"text": text, "meta_info": meta}


def render_generate_body(ids_TK: np.ndarray, logprobs_TK: np.ndarray, prompt_len: int, **kw: Any) -> bytes:
    """`build_generate_body` serialized with orjson."""
    return orjson.dumps(build_generate_body(ids_TK, logprobs_TK, prompt_len, **kw))


# ------------------------------------------------------------------------------------------ protocol


class SglangProtocol(TeacherProtocol):
    """SGLang's `/generate` with input top logprobs; `flat` asks for the base64 arrays (no nested JSON)."""

    name: ClassVar[str] = "sglang"
    score_path: ClassVar[str] = GENERATE_PATH
    k_limit_hint: ClassVar[str] = "check the server's top_logprobs_num limit"
    models_path: ClassVar[str] = MODEL_INFO_PATH
    strict_model: ClassVar[bool] = False  # SGLang ignores the model field of /generate

    def served_models(self, body: Any) -> list[str]:
        path = body.get("model_path") if isinstance(body, dict) else None
        return [path] if isinstance(path, str) else []

    def __init__(self, *, flat: bool = True) -> None:
        self.flat = flat

    def request(self, input_ids: list[int], prompt_len: int, k: int, model: str) -> dict[str, Any]:
        return build_request(input_ids, prompt_len, k, flat=self.flat)

    def parse(self, raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return parse_response(raw, num_tokens, prompt_len, k)
