"""The reference teacher's opt-in sampled response (RS-KD): per position, the distinct token ids of n
draws from the teacher's distribution, with how often each was drawn and its log-probability.

A server that offers it says so in its `/v1/models` card: ``"gkd_sampled": MEDIA_TYPE`` and
``"gkd_max_samples": N`` (the most draws a request may ask for). A client that wants it sends the ordinary
vLLM completions body with the binary extension's ``"gkd_rows_from": prompt_len`` plus
``"gkd_samples": n`` and ``"gkd_seed": s`` (an int in [0, 2**63)), with ``Accept: MEDIA_TYPE``. The answer
is the msgpack map

    {"v": 1, "model": str, "samples": n, "ids": <int32 [R, n]>, "logprobs": <float32 [R, n]>,
     "counts": <int32 [R, n]>}

(tensors as in pipeline/wire/codec), where row r is over token gkd_rows_from + r: first the distinct ids
drawn, sorted by logprob descending, each with its count (>= 1) and its natural-log probability under the
teacher's full-vocabulary distribution at temperature 1; then padding (count 0, id 0, logprob -inf).
Each row's counts sum to n. The draws are made with replacement by a generator seeded with gkd_seed, so
the same tokens and seed give the same draws. vLLM and SGLang offer nothing like it (their prompt
logprobs are a top-k): a sampled run needs teachers that advertise it.

Shape legend: R = rows (T - rows_from), N = draws per row (the width of every array).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pipeline.errors import MalformedResponse
from pipeline.teacher import binary, rows, vllm
from pipeline.wire import mpack
from pipeline.wire.codec import ID_DTYPES, LOGPROB_WIRE_DTYPES, pack_tensor

MEDIA_TYPE = "application/x-gkd-sampled+msgpack"
ADVERT_FIELD = "gkd_sampled"
MAX_SAMPLES_FIELD = "gkd_max_samples"
SAMPLES_FIELD = "gkd_samples"
SEED_FIELD = "gkd_seed"
SEED_LIMIT = 2**63
VERSION = 1


def max_samples(models_body: Any) -> int:
    """The draws per request a `/v1/models` body's first card offers (0: it offers no sampled answer)."""
    cards = vllm.model_cards(models_body)
    if not cards or cards[0].get(ADVERT_FIELD) != MEDIA_TYPE:
        return 0
    n = cards[0].get(MAX_SAMPLES_FIELD)
    return n if type(n) is int and n > 0 else 0


def draw_seed(rollout_id: str) -> int:
    """The seed of a rollout's draws, in [0, 2**63): a function of its id alone, so a rollout scored again
    (a lease taken over, a resume's requeue) gets the same draws from the same teacher."""
    return int.from_bytes(hashlib.blake2b(rollout_id.encode(), digest_size=8).digest(), "little") >> 1


def card(limit: int) -> dict[str, Any]:
    """The `/v1/models` card fields of a server that offers up to `limit` draws per position."""
    return {ADVERT_FIELD: MEDIA_TYPE, MAX_SAMPLES_FIELD: limit}


def build_request(input_ids: list[int], n: int, model: str, prompt_len: int, seed: int) -> dict[str, Any]:
    """The completions body asking for n draws at each of tokens prompt_len..T-1."""
    return {**binary.build_request(input_ids, 1, model, prompt_len), SAMPLES_FIELD: n, SEED_FIELD: seed}


def render(ids_RN: np.ndarray, counts_RN: np.ndarray, logprobs_RN: np.ndarray, model: str) -> bytes:
    """The body for rows as `draw_teacher_samples` returns them (server side); padding gets -inf."""
    counts = np.ascontiguousarray(counts_RN, dtype="<i4")
    lp = np.where(counts > 0, logprobs_RN, -np.inf).astype("<f4")
    return mpack.dumps(
        {
            "v": VERSION,
            "model": model,
            "samples": int(counts.shape[1]),
            "ids": pack_tensor(np.ascontiguousarray(ids_RN, dtype="<i4"), "ids"),
            "logprobs": pack_tensor(lp, "logprobs"),
            "counts": pack_tensor(counts, "counts"),
        }
    )


def parse_response(
    raw: bytes, num_tokens: int, prompt_len: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [R, n], logprobs float32 [R, n], counts int32 [R, n]) from a sampled body, validated:
    shapes, counts >= 0 summing to n per row with the drawn entries first, distinct drawn ids, drawn
    logprobs finite and <= 0 (float slack clamped), no row whose drawn mass exceeds 1 (raw logits).
    MalformedResponse otherwise."""
    what = "sampled teacher answer"
    fields = {"ids": ID_DTYPES, "logprobs": LOGPROB_WIRE_DTYPES, "counts": ID_DTYPES}
    ids_RN, lp_RN, counts_RN = binary.read_tensors(raw, what, VERSION, fields)
    R = num_tokens - prompt_len
    if not ids_RN.shape == lp_RN.shape == counts_RN.shape == (R, n):
        raise MalformedResponse(
            f"{what}: expected [{R}, {n}] arrays, got {ids_RN.shape}, {lp_RN.shape} and {counts_RN.shape}"
        )
    _check_counts(counts_RN, n, what, prompt_len)
    drawn_RN = counts_RN > 0
    lp = np.where(drawn_RN, lp_RN.astype(np.float32), -np.inf).astype(np.float32)
    _check_drawn(ids_RN, lp, drawn_RN, what, prompt_len)
    return np.ascontiguousarray(ids_RN), np.minimum(lp, 0.0), np.ascontiguousarray(counts_RN)


def _check_counts(counts_RN: np.ndarray, n: int, what: str, offset: int) -> None:
    if counts_RN.size and int(counts_RN.min()) < 0:
        raise MalformedResponse(f"{what}: expected non-negative counts, got {int(counts_RN.min())}")
    sums = counts_RN.sum(1, dtype=np.int64)
    if (sums != n).any():
        r = int(np.flatnonzero(sums != n)[0])
        raise MalformedResponse(f"{what}: expected {n} draws in the row of token {offset + r}, got {sums[r]}")
    drawn = counts_RN > 0
    if (drawn[:, 1:] & ~drawn[:, :-1]).any():
        r = int(np.flatnonzero((drawn[:, 1:] & ~drawn[:, :-1]).any(1))[0])
        raise MalformedResponse(
            f"{what}: expected the drawn entries first, then padding, in row {offset + r}"
        )


def _check_drawn(ids_RN: np.ndarray, lp_RN: np.ndarray, drawn_RN: np.ndarray, what: str, offset: int) -> None:
    if ids_RN.size and int(ids_RN.min()) < 0:
        raise MalformedResponse(f"{what}: expected non-negative token ids, got {int(ids_RN.min())}")
    live = np.where(drawn_RN, lp_RN, 0.0)
    if np.isnan(live).any() or np.isinf(live).any():
        raise MalformedResponse(f"{what}: expected finite logprobs for drawn ids, got NaN or inf")
    if (live > rows.LOGPROB_SLACK).any():
        raise MalformedResponse(f"{what}: expected logprobs <= 0, got {float(live.max())} (raw logits?)")
    with np.errstate(divide="ignore"):
        lse_R = np.logaddexp.reduce(lp_RN, axis=1)
    if (lse_R > rows.LSE_SLACK).any():
        r = int(np.argmax(lse_R))
        raise MalformedResponse(
            f"{what}: expected the drawn ids' probabilities to sum to at most 1, got exp({lse_R[r]:.4f}) in "
            f"the row of token {offset + r} (a server sending logits?)"
        )
    ids_sorted = np.sort(np.where(drawn_RN, ids_RN.astype(np.int64), -1 - np.arange(ids_RN.shape[1])), axis=1)
    if (ids_sorted[:, 1:] == ids_sorted[:, :-1]).any():
        r = int(np.flatnonzero((ids_sorted[:, 1:] == ids_sorted[:, :-1]).any(1))[0])
        raise MalformedResponse(
            f"{what}: expected distinct drawn ids, got a repeated one in row {offset + r}"
        )
