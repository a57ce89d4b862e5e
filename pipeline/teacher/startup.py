"""Start-up checks of a teacher client: health, backend detection, model id, tokenizer agreement.

Each check fails with a message that says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from pipeline.errors import (
    GKDError,
    MalformedResponse,
    TeacherBadRequest,
    TeacherConnectionError,
    TeacherIncompatible,
)
from pipeline.teacher import sampled, sglang, vllm
from pipeline.teacher.binary import BINARY
from pipeline.teacher.endpoints import Endpoint
from pipeline.teacher.http import HttpLimits, request, status_of
from pipeline.teacher.protocol import TeacherProtocol
from pipeline.vocab import PROBE_TEXTS, TOKENIZER_SIZE_FIELD, fingerprint

HEALTH_PATH = "/health"
TOKENIZE_PATH = "/tokenize"


async def probe_health(
    session: aiohttp.ClientSession, endpoints: Sequence[Endpoint], limits: HttpLimits
) -> list[str]:
    """URLs whose GET /health answers 2xx (in the given order); raises when none does, naming each failure."""

    async def one(ep: Endpoint) -> GKDError | None:
        try:
            await request(session, "GET", ep.url + HEALTH_PATH, limits=limits)
        except GKDError as exc:
            return exc
        return None

    results = await asyncio.gather(*(one(ep) for ep in endpoints))
    healthy = [ep.url for ep, err in zip(endpoints, results, strict=False) if err is None]
    if not healthy:
        detail = "; ".join(f"{ep.url}: {err}" for ep, err in zip(endpoints, results, strict=False))
        first = next(err for err in results if err is not None)
        cls = TeacherBadRequest if isinstance(first, TeacherBadRequest) else TeacherConnectionError
        raise cls(f"expected at least one teacher endpoint to answer GET {HEALTH_PATH}, got none: {detail}")
    return healthy


async def _get_json(session: aiohttp.ClientSession, url: str, limits: HttpLimits) -> Any:
    raw, _ = await request(session, "GET", url, limits=limits)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedResponse(f"GET {url}: expected JSON, got {raw[:80]!r}") from None


async def detect_backend(session: aiohttp.ClientSession, url: str, limits: HttpLimits) -> str:
    """ "sglang" when GET /get_model_info answers a model_path (SGLang also serves /v1/models, so that
    alone proves nothing), else "vllm" when /v1/models answers; raises when neither does."""
    sg = sglang.SglangProtocol()
    try:
        if sg.served_models(await _get_json(session, url + sg.models_path, limits)):
            return sg.name
    except TeacherBadRequest as exc:
        if status_of(exc) in (401, 403):
            raise
    except MalformedResponse:
        pass
    await _get_json(session, url + vllm.VLLM.models_path, limits)
    return vllm.VLLM.name


async def discover_model(
    session: aiohttp.ClientSession, url: str, proto: TeacherProtocol, wanted: str | None, limits: HttpLimits
) -> str:
    """The model id to send: `wanted` if the server serves it, else the server's first model.

    Asks the protocol's models path (vLLM: GET /v1/models; SGLang: `model_path` of GET /get_model_info).
    A wanted id the server does not list is an error naming the ids it serves, where the protocol's
    server refuses unknown ids (`strict_model`).
    """
    body = await _get_json(session, url + proto.models_path, limits)
    ids = proto.served_models(body)
    if not ids:
        raise MalformedResponse(
            f"GET {url}{proto.models_path}: expected the served model's id, got {str(body)[:120]}"
        )
    if wanted is None:
        return ids[0]
    if proto.strict_model and wanted not in ids:
        raise TeacherIncompatible(f"teacher {url}: expected it to serve model {wanted!r}, got models {ids}")
    return wanted


async def read_model_cards(
    session: aiohttp.ClientSession, endpoints: Sequence[Endpoint], limits: HttpLimits, *, binary: bool
) -> None:
    """Read each endpoint's `/v1/models` card: its `max_model_len`, how many draws it offers (sampled
    extension), and (with `binary`) whether it advertises the binary top-k response. An endpoint whose
    card cannot be read keeps the defaults."""
    for ep in endpoints:
        try:
            body = await _get_json(session, ep.url + vllm.MODELS_PATH, limits)
        except GKDError:
            continue
        cards = vllm.model_cards(body)
        limit = cards[0].get("max_model_len") if cards else None
        ep.max_model_len = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        ep.binary = binary and BINARY.advertised(body)
        ep.max_samples = sampled.max_samples(body)


def check_sampled(endpoints: Sequence[Endpoint], k: int) -> None:
    """TeacherIncompatible unless every endpoint offers k draws per position (sampled extension)."""
    for ep in endpoints:
        if ep.max_samples < k:
            offer = f"at most {ep.max_samples}" if ep.max_samples else "none (no gkd_sampled in its card)"
            raise TeacherIncompatible(
                f"teacher {ep.url} cannot draw {k} samples per position: it offers {offer}; expected the "
                f"reference server (gkd teacher --engine transformers, --max-samples >= {k}): vLLM and "
                f"SGLang return a top-k only. Fix: --teacher-mode topk, or another teacher"
            )


@dataclass(frozen=True)
class TeacherVocabulary:
    """What a teacher says about its tokenizer (None: it does not say); recorded in the run config."""

    fingerprint: str | None
    """`pipeline.vocab.fingerprint` of its /tokenize answers for the probe texts."""
    tokenizer_size: int | None
    """Tokens in its tokenizer (the reference server's model card)."""


async def probe_vocabulary(
    session: aiohttp.ClientSession, url: str, model: str | None, limits: HttpLimits, *, card: bool
) -> TeacherVocabulary:
    """The teacher's tokenizer fingerprint (POST /tokenize of the probe texts) and size (from its
    /v1/models card, when `card`: a vLLM-style server); what a server does not offer stays None."""
    ids: list[Any] = []
    for text in PROBE_TEXTS:
        body: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
        if model:
            body["model"] = model
        try:
            raw, _ = await request(session, "POST", url + TOKENIZE_PATH, body=body, limits=limits)
            tokens = orjson.loads(raw).get("tokens")
        except (TeacherBadRequest, MalformedResponse, orjson.JSONDecodeError, AttributeError):
            ids = []
            break
        if not isinstance(tokens, list):
            ids = []
            break
        ids.append(tokens)
    size = None
    if card:
        try:
            cards = vllm.model_cards(await _get_json(session, url + vllm.MODELS_PATH, limits))
        except GKDError:
            cards = []
        size = cards[0].get(TOKENIZER_SIZE_FIELD) if cards else None
    counted = isinstance(size, int) and not isinstance(size, bool)
    return TeacherVocabulary(fingerprint(ids) if ids else None, size if counted else None)


async def check_tokenizer(
    session: aiohttp.ClientSession,
    url: str,
    model: str | None,
    student_tokenizer: str,
    limits: HttpLimits,
    texts: Sequence[str] = PROBE_TEXTS,
) -> None:
    """Raise TeacherIncompatible unless the teacher's POST /tokenize of each probe text gives exactly the
    student tokenizer's ids (token-level distillation needs one vocabulary)."""
    tok = await asyncio.to_thread(_load_tokenizer, student_tokenizer)
    for text in texts:
        body: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
        if model:
            body["model"] = model
        try:
            raw, _ = await request(session, "POST", url + TOKENIZE_PATH, body=body, limits=limits)
        except TeacherBadRequest as exc:
            raise TeacherIncompatible(
                f"teacher {url}: cannot check the tokenizer, POST {TOKENIZE_PATH} failed ({exc}); "
                f"drop --student-tokenizer only if you are sure both use one vocabulary"
            ) from None
        teacher_ids = orjson.loads(raw).get("tokens")
        student_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if teacher_ids != student_ids:
            raise TeacherIncompatible(
                f"teacher {url} tokenizes {text!r} as {teacher_ids}, the student tokenizer "
                f"{student_tokenizer!r} as {student_ids}: expected identical ids (token-level distillation "
                f"needs the same vocabulary)"
            )


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)
