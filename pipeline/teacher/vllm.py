"""The vLLM protocol: `POST /v1/completions` with `prompt_logprobs`, its response body, and test vectors.

Request: ``{"model", "prompt": [token ids], "max_tokens": 1, "prompt_logprobs": k}``. Prompt logprobs
ignore temperature; `max_tokens` must be >= 1 in vLLM, so one token is generated and ignored.

Response: ``choices[0].prompt_logprobs`` is a list as long as the prompt. Entry 0 is null (nothing
predicts the first token); entry i is the distribution over token i given tokens < i, a dict keyed by the
token id as a decimal string, each value ``{"logprob", "rank", "decoded_token"}``, holding k entries, or
k+1 when the actual token i is not among the top-k (vLLM adds it, with its rank > k). -inf is sent as
-9999.0. The loss uses rows prompt_len..T-1 only; parsing touches nothing else.

A k above the server's ``--max-logprobs`` (default 20) answers HTTP 400 with
"Requested prompt logprobs of K, which is greater than max allowed: M".

Shape legend: T = tokens, R = T - prompt_len, K = top-k.
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Any

import numpy as np
import orjson

from pipeline.errors import MalformedResponse
from pipeline.teacher import rows

COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
#: vLLM's default --max-logprobs.
DEFAULT_MAX_LOGPROBS = 20


def build_request(input_ids: list[int], k: int, model: str) -> dict[str, Any]:
    """The `/v1/completions` body that asks for the top-`k` prompt logprobs of every position."""
    return {"model": model, "prompt": input_ids, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0}


def loads(raw: bytes, what: str) -> Any:
    """Decode a JSON body with orjson. Bodies with NaN/Infinity literals (stdlib-json servers) are
    decoded by the stdlib as a fallback, so the validation can name the NaN; anything else that does not
    decode (truncated, not JSON) is a MalformedResponse."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            tail = raw[-60:].decode("utf-8", "replace")
            raise MalformedResponse(
                f"{what}: expected a JSON body, got {len(raw)} bytes that do not decode ({exc}); "
                f"truncated? body ends with {tail!r}"
            ) from None


def prompt_logprobs_of(body: Any, what: str) -> list[Any]:
    """`choices[0].prompt_logprobs` of a decoded completions body, or MalformedResponse naming what came."""
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        shown = sorted(body)[:8] if isinstance(body, dict) else type(body).__name__
        raise MalformedResponse(f"{what}: expected a completions body with choices[0], got {shown}") from None
    pl = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
    if not isinstance(pl, list):
        raise MalformedResponse(
            f"{what}: expected choices[0].prompt_logprobs to be a list, got {type(pl).__name__} "
            f"(does the server support prompt_logprobs? vLLM does; an OpenAI-only server does not)"
        )
    return pl


def parse_response(raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [R, K], logprobs float32 [R, K]) of rows prompt_len..T-1, each sorted descending.

    Raises MalformedResponse when the body does not decode, the row count is not T, a needed row is
    null or short, or the numbers are not logprobs (NaN, > 0, raw logits).
    """
    what = "vLLM prompt_logprobs"
    pl = prompt_logprobs_of(loads(raw, what), what)
    if len(pl) != num_tokens:
        raise MalformedResponse(
            f"{what}: expected {num_tokens} rows (one per prompt token), got {len(pl)} "
            f"(prefix caching dropping rows, or a different prompt?)"
        )
    return parse_rows(pl[prompt_len:], k, what, row_offset=prompt_len)


def parse_rows(rows_R: list[Any], k: int, what: str, *, row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized core: the numbers of all rows go into flat lists in a few comprehensions, then numpy."""
    try:
        lens = list(map(len, rows_R))
        joined = ",".join(chain.from_iterable(rows_R))  # every row's keys, joined in C
        lps = [entry["logprob"] for row in rows_R for entry in row.values()]
    except (TypeError, AttributeError, KeyError):
        for i, row in enumerate(rows_R):
            ok = isinstance(row, dict) and all(isinstance(e, dict) and "logprob" in e for e in row.values())
            if not ok:
                raise MalformedResponse(
                    f"{what}: expected row {i + row_offset} to be a dict of {{token id: {{logprob, rank}}}}, "
                    f"got {str(row)[:80]}"
                ) from None
        raise
    ids_N = rows.keys_to_ids(joined, len(lps), what)
    lp_N = rows.to_float_array(lps, what)
    return rows.finalize(ids_N, lp_N, lens, k, what, row_offset=row_offset)


# -------------------------------------------------------------------------------------- test vectors


def build_prompt_logprobs_body(
    ids_TK: np.ndarray,
    logprobs_TK: np.ndarray,
    actual_ids_T: np.ndarray,
    *,
    actual_logprobs_T: np.ndarray | None = None,
    model: str = "teacher",
    shuffle_seed: int | None = None,
    decoded: bool = True,
) -> dict[str, Any]:
    """A vLLM `/v1/completions` response body (as a dict) for given top-k arrays: real format test vectors.

    Row t (t >= 1) of `ids_TK`/`logprobs_TK` is the distribution over token t (row 0 is ignored: vLLM
    sends null). `actual_ids_T` is the prompt. Where the actual token is not in row t's top-k, the row
    gets a (k+1)-th entry for it with logprob `actual_logprobs_T[t]` (default: 1.0 below the row's
    k-th) and rank k+1, like vLLM. -inf is written as -9999.0. `shuffle_seed` shuffles each row's key
    order (parsers must not rely on it). `decoded=False` leaves out "decoded_token" (smaller bodies).
    """
    T, k = ids_TK.shape
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    lp_TK = np.where(np.isneginf(logprobs_TK), rows.NEG_INF_SENTINEL, logprobs_TK).astype(np.float64)
    ids_l, lp_l, actual_l = ids_TK.tolist(), lp_TK.tolist(), [int(x) for x in actual_ids_T]
    extra_lp = None if actual_logprobs_T is None else np.asarray(actual_logprobs_T, np.float64).tolist()
    prompt_logprobs: list[Any] = [None]
    for t in range(1, T):
        entries = [
            (tid, {"logprob": lp, "rank": r + 1, **({"decoded_token": f"<{tid}>"} if decoded else {})})
            for r, (tid, lp) in enumerate(zip(ids_l[t], lp_l[t], strict=False))
        ]
        if actual_l[t] not in ids_l[t]:
            lp = extra_lp[t] if extra_lp is not None else max(lp_l[t][-1] - 1.0, rows.NEG_INF_SENTINEL)
            extra = {
                "logprob": lp,
                "rank": k + 1,
                **({"decoded_token": f"<{actual_l[t]}>"} if decoded else {}),
            }
            entries.append((actual_l[t], extra))
        if rng is not None:
            entries = [entries[i] for i in rng.permutation(len(entries))]
        prompt_logprobs.append({str(tid): e for tid, e in entries})
    return {
        "id": "cmpl-test",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": prompt_logprobs,
            }
        ],
        "usage": {"prompt_tokens": T, "completion_tokens": 1, "total_tokens": T + 1},
    }


def render_prompt_logprobs_body(
    ids_TK: np.ndarray, logprobs_TK: np.ndarray, actual_ids_T: np.ndarray, **kwargs: Any
) -> bytes:
    """`build_prompt_logprobs_body` serialized with orjson (what a vLLM server puts on the wire)."""
    return orjson.dumps(build_prompt_logprobs_body(ids_TK, logprobs_TK, actual_ids_T, **kwargs))
