"""Shared last step of every teacher protocol parser: flat numbers -> validated, sorted [R, K] arrays.

A protocol module (vllm.py, sglang.py) decodes its JSON, collects the numbers of the rows the loss uses
into flat lists (one list comprehension per field, no per-element Python work beyond that), and hands
them here. This module owns the checks that make a teacher answer trustworthy:

- every row has at least K entries (vLLM may add one more: the actual token when outside the top-k);
- no NaN; no logprob above 0 beyond float slack (`LOGPROB_SLACK`, then clamped to 0);
- no row whose logsumexp exceeds 0 (`LSE_SLACK`): a server in `--logprobs-mode raw_logits` sends logits;
- ids are non-negative.

Shape legend: R = rows the loss uses (T - prompt_len), K = requested top-k, E = entries in a row (K or K+1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import MalformedResponse

#: vLLM renders -inf as -9999.0; anything at or below this is -inf.
NEG_INF_SENTINEL = -9999.0
#: logprobs up to this much above 0 are float noise (clamped to 0); beyond it the row is wrong.
LOGPROB_SLACK = 1e-4
#: a row's top-k probabilities can sum to at most 1; allow this much (log space) for rounding.
LSE_SLACK = 1e-3
#: largest token id that fits the int32 wire format.
ID_MAX = 2**31 - 1


def to_float_array(values: list[Any], what: str) -> np.ndarray:
    """float64 [N] array of `values`; JSON null (orjson renders -inf as null) becomes -inf.
    Anything but plain numbers (strings, lists, ints beyond float range) is MalformedResponse."""
    try:
        arr = np.fromiter(values, dtype=np.float64, count=len(values))  # None becomes NaN here
        if arr.size == 0 or not np.isnan(arr.max()) or None not in values:
            return arr
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        arr = np.array([-np.inf if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedResponse(
            f"{what}: expected numbers as logprobs, got a non-numeric one ({exc})"
        ) from None
    if arr.ndim != 1:
        raise MalformedResponse(f"{what}: expected one number per logprob, got nested lists")
    return arr


def to_id_array(values: list[Any], what: str) -> np.ndarray:
    """int64 [N] array of integer token ids in [0, 2**31) (JSON ints); anything else is MalformedResponse."""
    try:
        arr = np.array(values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedResponse(f"{what}: expected integer token ids, got {exc}") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise MalformedResponse(
            f"{what}: expected integer token ids, got {arr.dtype} values of shape {arr.shape}"
        )
    return arr.astype(np.int64)


def keys_to_ids(joined: str, count: int, what: str) -> np.ndarray:
    """int64 array of `count` token ids given as comma-joined decimal strings (vLLM's dict keys, joined
    in C by `",".join(...)`), parsed in one numpy call."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        ids = np.fromstring(joined, dtype=np.int64, sep=",")  # one C-level parse of all keys
    except (TypeError, ValueError) as exc:
        raise MalformedResponse(f"{what}: expected decimal token-id keys, got {exc}") from None
    if ids.shape[0] != count:
        bad = next((p for p in joined.split(",") if not p.strip().lstrip("-").isdigit()), joined[:20])
        raise MalformedResponse(f"{what}: expected {count} decimal token-id keys, got {bad!r} among them")
    return ids


def finalize(
    ids_N: np.ndarray,
    logprobs_N: np.ndarray,
    lens_R: list[int] | None,
    k: int,
    what: str,
    *,
    row_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and sort flat entries into (ids int32 [R, K], logprobs float32 [R, K]).

    `ids_N`/`logprobs_N` hold all entries of all rows in row order; `lens_R` gives each row's entry
    count (None: every row has exactly K). Keeps each row's K best entries by logprob (dropping vLLM's
    extra actual-token entry when it is outside the top-k), sorted descending; -9999.0 becomes -inf.
    `row_offset` only labels rows in messages (e.g. the prompt position of row 0).
    Raises MalformedResponse on short rows, NaN, logprob > 0, raw logits, negative ids.
    """
    if ids_N.shape[0] != logprobs_N.shape[0]:
        raise MalformedResponse(f"{what}: {ids_N.shape[0]} token ids but {logprobs_N.shape[0]} logprobs")
    with np.errstate(invalid="ignore"):  # signalling NaNs are reported by _check_values
        lp_N = np.array(logprobs_N, dtype=np.float64)  # a private, writable copy
    _check_values(lp_N, lens_R, k, what, row_offset)
    if lp_N.shape[0] == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    ids_RE, lp_RE = _pad_rows(ids_N, lp_N, lens_R, k, what, row_offset)
    if lp_RE.shape[1] == k and bool(np.all(lp_RE[:, :-1] >= lp_RE[:, 1:])):
        top_ids, top_lp = ids_RE, lp_RE  # already sorted (SGLang, the reference server): no sort
    else:
        # NaN padding sorts last (after real -inf entries), so it is never kept.
        order_RK = np.argsort(-lp_RE, axis=1)[:, :k]
        top_ids = np.take_along_axis(ids_RE, order_RK, axis=1)
        top_lp = np.take_along_axis(lp_RE, order_RK, axis=1)
    bad_RK = (top_ids < 0) | (top_ids > ID_MAX)
    if bad_RK.any():
        r, c = (int(x) for x in np.argwhere(bad_RK)[0])
        raise MalformedResponse(
            f"{what}: expected token ids in [0, {ID_MAX}], got {int(top_ids[r, c])} in row {r + row_offset}"
        )
    _check_lse(top_lp, what, row_offset)
    return top_ids.astype(np.int32), top_lp.astype(np.float32)


def _row_of(index_N: int, lens_R: list[int] | None, k: int) -> int:
    """The row of flat entry `index_N` (for error messages only)."""
    if lens_R is None:
        return index_N // k
    return int(np.searchsorted(np.cumsum(lens_R), index_N, side="right"))


def _pad_rows(
    ids_N: np.ndarray, lp_N: np.ndarray, lens_R: list[int] | None, k: int, what: str, row_offset: int
) -> tuple[np.ndarray, np.ndarray]:
    """[R, E] matrices (E = longest row, K or K+1); short rows are an error, padding is NaN / id -1."""
    if lens_R is None:
        if lp_N.shape[0] % k:
            raise MalformedResponse(f"{what}: expected a multiple of k={k} entries, got {lp_N.shape[0]}")
        return ids_N.reshape(-1, k), lp_N.reshape(-1, k)
    lens = np.asarray(lens_R, dtype=np.int64)
    lo, hi = int(lens.min()), int(lens.max())
    if lo < k:
        r = int(np.argmax(lens < k))
        raise MalformedResponse(
            f"{what}: expected at least k={k} entries per row, got {int(lens[r])} in row {r + row_offset}"
        )
    if hi > k + 1:
        r = int(np.argmax(lens > k + 1))
        raise MalformedResponse(
            f"{what}: expected k={k} or k+1 entries per row, got {int(lens[r])} in row {r + row_offset} "
            f"(was prompt_logprobs sent with a larger k?)"
        )
    if lo == hi:
        return ids_N.reshape(-1, hi), lp_N.reshape(-1, hi)
    R = lens.shape[0]
    starts_R = np.cumsum(lens) - lens
    # flat destination of entry n of row r in the [R, hi] matrix: n + r * hi - starts[r]
    dest_N = np.arange(ids_N.shape[0], dtype=np.int64) + np.repeat(np.arange(R) * hi - starts_R, lens)
    ids_RE = np.full(R * hi, -1, dtype=np.int64)
    lp_RE = np.full(R * hi, np.nan, dtype=np.float64)
    ids_RE[dest_N] = ids_N
    lp_RE[dest_N] = lp_N
    return ids_RE.reshape(R, hi), lp_RE.reshape(R, hi)


def _check_values(lp_N: np.ndarray, lens_R: list[int] | None, k: int, what: str, row_offset: int) -> None:
    """NaN and logprob > 0 are errors; -9999.0 -> -inf and tiny positive noise -> 0 (in place)."""
    if lp_N.shape[0] == 0:
        return
    top = float(lp_N.max())  # NaN propagates through max
    if top != top:
        r = _row_of(int(np.argmax(np.isnan(lp_N))), lens_R, k)
        raise MalformedResponse(f"{what}: expected finite logprobs, got NaN in row {r + row_offset}")
    if top > LOGPROB_SLACK:
        n = int(np.argmax(lp_N > LOGPROB_SLACK))
        raise MalformedResponse(
            f"{what}: expected logprobs <= 0, got {float(lp_N[n]):.6g} in row "
            f"{_row_of(n, lens_R, k) + row_offset} (is the server returning raw logits, e.g. vLLM "
            f"--logprobs-mode raw_logits?)"
        )
    if top > 0:
        np.minimum(lp_N, 0.0, out=lp_N)
    lp_N[lp_N <= NEG_INF_SENTINEL] = -np.inf


def _check_lse(lp_RK: np.ndarray, what: str, row_offset: int) -> None:
    """A row's top-k probabilities must sum to <= 1: logsumexp <= 0 (else the numbers are not logprobs)."""
    with np.errstate(divide="ignore"):
        lse_R = np.log(np.exp(lp_RK).sum(axis=1))
    if float(lse_R.max()) > LSE_SLACK:
        r = int(np.argmax(lse_R))
        raise MalformedResponse(
            f"{what}: expected each row's top-k probabilities to sum to <= 1, got logsumexp "
            f"{float(lse_R[r]):.4g} > 0 in row {r + row_offset}: these are not normalized logprobs "
            f"(a vLLM server started with --logprobs-mode raw_logits or processed_logits?)"
        )
