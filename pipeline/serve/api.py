"""Request validation and response rendering of the reference teacher's `/v1/completions` (vLLM shapes).

vLLM's wording is kept where clients may show it to users: "Requested prompt logprobs of K, which is
greater than max allowed: M", "max_tokens must be at least 1, got 0.", "Token id N is out of vocabulary",
"This model's maximum context length is ...". Prompt logprobs rows follow vLLM: entry 0 null, entry i a
dict keyed by the token id (decimal string) of {"logprob", "rank", "decoded_token"}, the actual token
first, then the top-k by rank (k+1 entries when the actual token is outside the top-k), -inf as -9999.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ApiError
from pipeline.serve.batcher import Draws
from pipeline.teacher import binary, sampled, vllm
from pipeline.teacher.binary import BINARY

if TYPE_CHECKING:
    from pipeline.serve.batcher import ScoreResult
    from pipeline.serve.server import TeacherServer


@dataclass
class CompletionRequest:
    """A validated completions request: token-id prompts and what to return."""

    prompts: list[list[int]]
    prompt_k: int | None
    """Top-k prompt logprobs per position (None: not asked)."""
    sample_k: int | None
    """Top-n logprobs of the generated token (None: not asked, `logprobs` is null)."""
    rows_from: int | None = None
    """Binary extension: the first token whose distribution is returned (pipeline/teacher/binary.py)."""
    echo: bool = False
    """Return the prompt as part of the completion: text and, with `logprobs`, its tokens' logprobs."""
    generate: bool = True
    """False for `echo` with `max_tokens` 0: the completion is the prompt alone (lm-eval-harness style)."""
    draws: Draws | None = None
    """Sampled extension: draws from the teacher at tokens rows_from..T-1 (pipeline/teacher/sampled.py)."""

    @property
    def job_k(self) -> int:
        return max(self.prompt_k or 0, self.sample_k or 0, 1)


def _k(body: dict[str, Any], name: str, kind: str, server: TeacherServer) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
    if value == -1:
        value = server.vocab_size  # vLLM: -1 means the whole vocabulary
    if value < 0:
        raise ApiError(400, f"{name} must be non-negative or -1, got {value}", param=name)
    if value > server.settings.max_logprobs:
        raise ApiError(
            400,
            f"Requested {kind} logprobs of {value}, which is greater than max allowed: "
            f"{server.settings.max_logprobs}",
            param=name,
        )
    return value


def _prompts(body: dict[str, Any], server: TeacherServer) -> list[list[int]]:
    prompt = body.get("prompt")
    add_special = bool(body.get("add_special_tokens", True))
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt)
    ):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise ApiError(
            400,
            f"prompt must be a string, a list of strings, a list of token ids or a list of "
            f"such lists, got {str(prompt)[:60]}",
            param="prompt",
        )
    out = []
    for item in items:
        if isinstance(item, str):
            ids = server.tokenize_prompt(item, add_special)
        elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            ids = item
        else:
            raise ApiError(
                400,
                f"each prompt must be a string or a list of token ids, got {str(item)[:60]}",
                param="prompt",
            )
        if not ids:
            raise ApiError(400, "The prompt cannot be empty", param="prompt")
        bad = max(ids)
        if bad >= server.vocab_size or min(ids) < 0:
            bad = bad if bad >= server.vocab_size else min(ids)
            raise ApiError(400, f"Token id {bad} is out of vocabulary", param="prompt")
        if len(ids) + 1 > server.max_model_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {server.max_model_len} tokens. "
                f"However, you requested {len(ids) + 1} tokens ({len(ids)} in the messages, "
                f"1 in the completion). Please reduce the length of the messages or completion.",
                param="prompt",
            )
        out.append(ids)
    return out


def validate_completion(body: dict[str, Any], server: TeacherServer) -> CompletionRequest:
    """A CompletionRequest, or ApiError with vLLM's status and wording."""
    model = body.get("model")
    if model is not None and model != server.model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported by the gkd reference teacher", param="stream")
    if body.get("n", 1) != 1:
        raise ApiError(400, f"n must be 1 on the gkd reference teacher, got {body.get('n')}", param="n")
    echo = bool(body.get("echo"))
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < (0 if echo else 1)
    ):
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    prompt_k = _k(body, "prompt_logprobs", "prompt", server)
    sample_k = _k(body, "logprobs", "sample", server)
    if echo and prompt_k is None:
        prompt_k = sample_k  # vLLM: echo asks for the prompt's logprobs at the width of `logprobs`
    req = CompletionRequest(_prompts(body, server), prompt_k, sample_k, echo=echo, generate=max_tokens != 0)
    rows_from = body.get(binary.ROWS_FROM_FIELD)
    if rows_from is not None:
        T = len(req.prompts[0])
        ok = isinstance(rows_from, int) and 1 <= rows_from < T and len(req.prompts) == 1 and prompt_k
        if not ok:
            raise ApiError(
                400,
                f"{binary.ROWS_FROM_FIELD}: expected an int in [1, {T}) with one token-id prompt and "
                f"prompt_logprobs >= 1, got {rows_from!r} with {len(req.prompts)} prompts",
                param=binary.ROWS_FROM_FIELD,
            )
        req.rows_from = rows_from
    if sampled.SAMPLES_FIELD in body:
        req.draws = _draws(body, req, server)
    return req


def _draws(body: dict[str, Any], req: CompletionRequest, server: TeacherServer) -> Draws:
    """The sampled extension's fields, or ApiError 400 naming the one that is wrong."""
    n, seed = body.get(sampled.SAMPLES_FIELD), body.get(sampled.SEED_FIELD, 0)
    limit = server.max_samples
    if limit == 0:
        raise ApiError(
            400,
            f"{sampled.SAMPLES_FIELD}: this server cannot draw from the teacher's distribution: its engine "
            f"({server.settings.engine}) returns top-k prompt logprobs only; serve the teacher with "
            f"--engine transformers for a sampled teacher",
            param=sampled.SAMPLES_FIELD,
        )
    if type(n) is not int or not 1 <= n <= limit or req.rows_from is None:
        raise ApiError(
            400,
            f"{sampled.SAMPLES_FIELD}: expected an int in [1, {limit}] (--max-samples) with "
            f"{binary.ROWS_FROM_FIELD}, got {n!r} with {binary.ROWS_FROM_FIELD}={req.rows_from!r}",
            param=sampled.SAMPLES_FIELD,
        )
    if type(seed) is not int or not 0 <= seed < sampled.SEED_LIMIT:
        raise ApiError(
            400,
            f"{sampled.SEED_FIELD}: expected an int in [0, 2**63), got {seed!r}",
            param=sampled.SEED_FIELD,
        )
    return Draws(n, seed, req.rows_from)


def render_sampled(res: ScoreResult, model: str) -> bytes:
    """The sampled body: the draws of rows rows_from..T-1."""
    assert res.drawn is not None
    ids_RS, counts_RS, lp_RS = res.drawn
    return sampled.render(ids_RS, counts_RS, lp_RS, model)


def render_binary(ids: list[int], res: ScoreResult, req: CompletionRequest, model: str) -> bytes:
    """The binary top-k body: rows for tokens rows_from..T-1 (row p of `res` is over token p + 1)."""
    assert req.rows_from is not None and req.prompt_k is not None
    T, k = len(ids), req.prompt_k
    return BINARY.render(
        res.topk_ids_TK[req.rows_from - 1 : T - 1, :k],
        res.topk_logprobs_TK[req.rows_from - 1 : T - 1, :k],
        model,
    )


def render_choice(
    index: int, ids: list[int], res: ScoreResult, req: CompletionRequest, server: TeacherServer
) -> dict[str, Any]:
    """One `choices[i]`: the greedy next token as text, its logprobs and the prompt logprobs if asked.
    With `echo` the text starts with the prompt, and `logprobs` covers the prompt's tokens too (vLLM)."""
    decoded = server.decoded()
    T = len(ids)
    next_id = int(res.topk_ids_TK[T - 1, 0])
    prompt_logprobs = None
    if req.prompt_k is not None:
        # row p of `res` (the distribution at position p) is vLLM's row p + 1, over token p + 1
        k = req.prompt_k
        prompt_logprobs = vllm.prompt_logprobs_rows(
            res.topk_ids_TK[: T - 1, :k],
            res.topk_logprobs_TK[: T - 1, :k],
            np.asarray(ids[1:]),
            res.actual_logprobs_T[: T - 1],
            res.actual_ranks_T[: T - 1],
            decoded=decoded,
            id_strs=server.id_strs,
        )
    text = server.tokenizer.decode([next_id]) if req.generate else ""
    if req.echo:
        text = server.tokenizer.decode(ids) + text
    logprobs = None
    if req.sample_k is not None:
        logprobs = _completion_logprobs(ids, res, req, decoded, prompt_logprobs)
    return vllm.choice(index, text, prompt_logprobs, logprobs)


def _completion_logprobs(
    ids: list[int],
    res: ScoreResult,
    req: CompletionRequest,
    decoded: list[str],
    prompt_rows: list[Any] | None,
) -> dict[str, Any]:
    """The OpenAI `logprobs` object (vLLM's `_create_completion_logprobs`): per token its text, logprob
    and a dict of the top `logprobs` + 1 entries keyed by text; the first prompt token has nulls."""
    assert req.sample_k is not None
    n, T = req.sample_k, len(ids)
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if req.echo:
        assert prompt_rows is not None  # echo implies prompt logprobs
        for tid, row in zip(ids, prompt_rows, strict=True):
            tokens.append(decoded[tid])
            token_lps.append(None if row is None else row[str(tid)]["logprob"])
            tops.append(
                None
                if row is None
                else {e["decoded_token"]: e["logprob"] for e in list(row.values())[: n + 1]}
            )
    if req.generate:
        next_id = int(res.topk_ids_TK[T - 1, 0])
        top_lp = vllm.wire_logprobs(res.topk_logprobs_TK[T - 1, :n])
        tokens.append(decoded[next_id])
        token_lps += vllm.wire_logprobs(res.topk_logprobs_TK[T - 1, :1])
        tops.append({decoded[int(t)]: lp for t, lp in zip(res.topk_ids_TK[T - 1, :n], top_lp, strict=True)})
    offsets = [0]
    for tok in tokens[:-1]:
        offsets.append(offsets[-1] + len(tok))
    return {
        "text_offset": offsets[: len(tokens)],
        "token_logprobs": token_lps,
        "tokens": tokens,
        "top_logprobs": tops if n > 0 else None,
    }
