"""The vLLM protocol: `POST /v1/completions` with `prompt_logprobs`, its response body, and test vectors.

Request: ``{"model", "prompt": [token ids], "max_tokens": 1, "prompt_logprobs": k}``. Prompt logprobs
ignore temperature; `max_tokens` must be >= 1 in vLLM, so one token is generated and ignored.

Response: ``choices[0].prompt_logprobs`` is a list as long as the prompt. Entry 0 is null (nothing
predicts the first token); entry i is the distribution over token i given tokens < i, a dict keyed by the
token id as a decimal string, each value ``{"logprob", "rank", "decoded_token"}``, holding k entries, or
k+1 when the actual token i is not among the top-k (vLLM adds it, with its rank > k). -inf is sent as
-9999.0. The loss uses rows prompt_len..T-1 only; parsing touches nothing else.

Parsing costs less CPU than a plain JSON decode of the body: a typed msgspec decoder reads only the
token ids and logprobs (no dict per entry, "rank" and "decoded_token" skipped, ids decoded as ints) and
numpy takes the numbers from there. A body the typed decoder refuses (null or NaN logprobs, odd keys,
missing fields) goes through the generic orjson path, which names what is wrong. Both accept the same
bodies with the same numbers (fuzzed), except that the typed decoder does not check the UTF-8 of the
strings it skips, so a body with a broken `decoded_token` is still read.

A k above the server's ``--max-logprobs`` (default 20) answers HTTP 400 with
"Requested prompt logprobs of K, which is greater than max allowed: M".

Shape legend: T = tokens, R = T - prompt_len, K = top-k.
"""

from __future__ import annotations

import json
from itertools import chain
from operator import attrgetter
from typing import Any, ClassVar, Protocol

import msgspec
import numpy as np
import orjson

from pipeline.errors import MalformedResponse
from pipeline.teacher import rows
from pipeline.teacher.protocol import TeacherProtocol

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


def model_cards(body: Any) -> list[dict[str, Any]]:
    """The model cards (dicts) of a decoded `/v1/models` body; [] when it has none."""
    data = body.get("data") if isinstance(body, dict) else None
    return [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []


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


class _Entry(msgspec.Struct, gc=False):
    logprob: float


class _Choice(msgspec.Struct, gc=False):
    prompt_logprobs: list[dict[int, _Entry] | None]


class _Body(msgspec.Struct, gc=False):
    choices: list[_Choice]


_TYPED = msgspec.json.Decoder(_Body)
_LOGPROB = attrgetter("logprob")


def parse_response(raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [R, K], logprobs float32 [R, K]) of rows prompt_len..T-1, each sorted descending.

    Raises MalformedResponse when the body does not decode, the row count is not T, a needed row is
    null or short, or the numbers are not logprobs (NaN, > 0, raw logits).
    """
    what = "vLLM prompt_logprobs"
    try:
        body = _TYPED.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _parse_generic(raw, num_tokens, prompt_len, k, what)
    pl_T = body.choices[0].prompt_logprobs if body.choices else None
    if pl_T is None or len(pl_T) != num_tokens or any(row is None for row in pl_T[prompt_len:]):
        return _parse_generic(raw, num_tokens, prompt_len, k, what)  # for its error message
    rows_R: list[dict[int, _Entry]] = pl_T[prompt_len:]  # type: ignore[assignment]
    lens = list(map(len, rows_R))
    n = sum(lens)
    try:
        ids_N = np.fromiter(chain.from_iterable(rows_R), dtype=np.int64, count=n)
    except OverflowError:  # an id beyond int64: the generic path names it
        return _parse_generic(raw, num_tokens, prompt_len, k, what)
    lp_N = np.fromiter(
        map(_LOGPROB, chain.from_iterable(map(dict.values, rows_R))), dtype=np.float64, count=n
    )
    return rows.finalize(ids_N, lp_N, lens, k, what, row_offset=prompt_len)


def _parse_generic(
    raw: bytes, num_tokens: int, prompt_len: int, k: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The orjson path: any JSON a server may send (null or NaN logprobs, big ints), precise errors."""
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


# ------------------------------------------------------------------------------ rendering (servers)


class TokenTexts(Protocol):
    """Anything indexable by token id that gives the token's text or decimal string (a list, a table)."""

    def __getitem__(self, tid: int, /) -> str: ...


def wire_logprobs(logprobs: np.ndarray) -> list[Any]:
    """Logprobs as vLLM writes them: float64 Python numbers with -inf as -9999.0 (`rows.NEG_INF_SENTINEL`)."""
    return np.maximum(np.asarray(logprobs, dtype=np.float64), rows.NEG_INF_SENTINEL).tolist()


def prompt_logprobs_rows(
    top_ids_NK: np.ndarray,
    top_logprobs_NK: np.ndarray,
    actual_ids_N: np.ndarray,
    actual_logprobs_N: np.ndarray | None = None,
    actual_ranks_N: np.ndarray | None = None,
    *,
    decoded: TokenTexts | None = None,
    id_strs: TokenTexts | None = None,
    shuffle_seed: int | None = None,
) -> list[Any]:
    """vLLM's `prompt_logprobs` list for a prompt of N + 1 tokens: [null, row 1, ..., row N].

    Row n + 1 is the distribution over token n + 1 (`actual_ids_N[n]`): the actual token first, then the
    top-k by rank, each ``{"logprob", "rank", "decoded_token"}`` keyed by the id as a decimal string, so
    a row has k entries, or k + 1 when the actual token is outside the top-k (as vLLM sends them).
    `actual_logprobs_N`/`actual_ranks_N` default to 1.0 below the row's k-th and rank k + 1 (used only
    where the actual token is outside the top-k). `decoded[id]` is the token's text (None: no
    "decoded_token"); `id_strs[id]` its decimal string (precomputed by servers: this loop is their
    per-position Python cost). `shuffle_seed` shuffles each row's keys (parsers must not rely on order).
    """
    N, k = top_ids_NK.shape
    top_ids, top_lp = top_ids_NK.tolist(), wire_logprobs(top_logprobs_NK)
    actual = [int(x) for x in actual_ids_N]
    if actual_logprobs_N is None:
        act_lp = [max(row[-1] - 1.0, rows.NEG_INF_SENTINEL) if row else 0.0 for row in top_lp]
    else:
        act_lp = wire_logprobs(actual_logprobs_N)
    act_rank = [k + 1] * N if actual_ranks_N is None else [int(r) for r in actual_ranks_N]
    key: Any = id_strs.__getitem__ if id_strs is not None else str
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    ranks = range(1, k + 1)

    def entry(lp: float, rank: int, tid: int) -> dict[str, Any]:
        if decoded is None:
            return {"logprob": lp, "rank": rank}
        return {"logprob": lp, "rank": rank, "decoded_token": decoded[tid]}

    out: list[Any] = [None]
    for n in range(N):
        a = actual[n]
        row = {key(a): entry(act_lp[n], act_rank[n], a)}
        row.update({key(t): entry(lp, r, t) for t, lp, r in zip(top_ids[n], top_lp[n], ranks, strict=True)})
        if rng is not None:
            items = list(row.items())
            row = dict(items[i] for i in rng.permutation(len(items)))
        out.append(row)
    return out


def choice(
    index: int, text: str, prompt_logprobs: list[Any] | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One `choices[i]` of a completions body."""
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_logprobs": prompt_logprobs,
    }


def completion_body(
    choices: list[dict[str, Any]], model: str, prompt_tokens: int, *, id: str = "cmpl-test", created: int = 0
) -> dict[str, Any]:
    """A `/v1/completions` response body around `choices` (one generated token each)."""
    completion = len(choices)
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
    }


def models_body(
    model: str, *, max_model_len: int | None = None, owned_by: str = "vllm", **card: Any
) -> dict[str, Any]:
    """A `/v1/models` body listing one model; `card` adds fields (root, created, extensions)."""
    entry: dict[str, Any] = {"id": model, "object": "model", "owned_by": owned_by, **card}
    if max_model_len is not None:
        entry["max_model_len"] = max_model_len
    return {"object": "list", "data": [entry]}


#: vLLM's answer to a /v1 request without the right API key (HTTP 401).
UNAUTHORIZED_BODY = {"error": "Unauthorized"}


def error_body(
    status: int, message: str, type: str = "BadRequestError", param: str | None = None, *, flat: bool = False
) -> dict[str, Any]:
    """vLLM's error body: nested ``{"error": {...}}`` (current), or the older flat schema (`flat`)."""
    if flat:
        return {"object": "error", "message": message, "type": type, "param": param, "code": status}
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


# -------------------------------------------------------------------------------------- test vectors


class _AngleText:
    """decoded_token text "<id>" for any id (test vectors)."""

    def __getitem__(self, tid: int, /) -> str:
        return f"<{tid}>"


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
    sends null). `actual_ids_T` is the prompt; where token t is outside row t's top-k the row gets a
    (k+1)-th entry for it with logprob `actual_logprobs_T[t]` (default: 1.0 below the row's k-th).
    `decoded=False` leaves out "decoded_token" (smaller bodies). See `prompt_logprobs_rows`.
    """
    T = ids_TK.shape[0]
    pl = prompt_logprobs_rows(
        ids_TK[1:],
        logprobs_TK[1:],
        np.asarray(actual_ids_T)[1:],
        None if actual_logprobs_T is None else np.asarray(actual_logprobs_T)[1:],
        decoded=_AngleText() if decoded else None,
        shuffle_seed=shuffle_seed,
    )
    return completion_body([choice(0, "", pl)], model, T)


def render_prompt_logprobs_body(
    ids_TK: np.ndarray, logprobs_TK: np.ndarray, actual_ids_T: np.ndarray, **kwargs: Any
) -> bytes:
    """`build_prompt_logprobs_body` serialized with orjson (what a vLLM server puts on the wire)."""
    return orjson.dumps(build_prompt_logprobs_body(ids_TK, logprobs_TK, actual_ids_T, **kwargs))


# ------------------------------------------------------------------------------------------ protocol


class VllmProtocol(TeacherProtocol):
    """vLLM's `/v1/completions` with `prompt_logprobs` (also spoken by the reference server)."""

    name: ClassVar[str] = "vllm"
    score_path: ClassVar[str] = COMPLETIONS_PATH
    k_limit_hint: ClassVar[str] = "restart vLLM with --max-logprobs >= {k} (gkd teacher: --max-logprobs {k})"
    models_path: ClassVar[str] = MODELS_PATH
    offers_binary: ClassVar[bool] = True

    def served_models(self, body: Any) -> list[str]:
        return [str(card["id"]) for card in model_cards(body) if "id" in card]

    def request(self, input_ids: list[int], prompt_len: int, k: int, model: str) -> dict[str, Any]:
        return build_request(input_ids, k, model)

    def parse(self, raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return parse_response(raw, num_tokens, prompt_len, k)


VLLM = VllmProtocol()
