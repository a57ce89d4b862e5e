"""TeacherClient: top-k teacher scores for token sequences from one or more vLLM/SGLang/reference servers.

    async with TeacherClient(TeacherConfig(endpoints=["http://127.0.0.1:8000"], k=20)) as client:
        scores = await client.score(input_ids_T, prompt_len)   # ids_RK, logprobs_RK, R = T - prompt_len

`start()` checks each endpoint (`/health`), detects the backend, finds the model id, probes that k is
allowed (a 400 names --max-logprobs), validates one real answer (catches raw-logits servers), and, with
`student_tokenizer`, that the teacher tokenizes probe texts exactly like the student.

`score()` sends one request to the endpoint with the fewest outstanding requests. A RetryableError
(connection, timeout, 429, 5xx, all breakers open) is retried up to `max_retries` times with capped
exponential backoff and jitter, preferring an endpoint that has not failed this request (failover).
A PermanentError (4xx, malformed or invalid response) is raised at once: the caller dead-letters.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import orjson

from pipeline.errors import (
    GKDError,
    MalformedResponse,
    PermanentError,
    RetryableError,
    TeacherBadRequest,
    TeacherConnectionError,
    WireFormatError,
)
from pipeline.teacher import sampled
from pipeline.teacher.binary import BINARY
from pipeline.teacher.config import TeacherConfig, TeacherScores
from pipeline.teacher.endpoints import Endpoint, EndpointSet
from pipeline.teacher.http import HttpLimits, make_session, request, status_of
from pipeline.teacher.protocol import PROTOCOL_NAMES, TeacherProtocol, select
from pipeline.teacher.startup import (
    TeacherVocabulary,
    check_sampled,
    check_tokenizer,
    detect_backend,
    discover_model,
    probe_health,
    probe_vocabulary,
    read_model_cards,
)

log = logging.getLogger("gkd.teacher")

BACKENDS = (*PROTOCOL_NAMES, "auto")
EventHook = Callable[[str, dict[str, Any]], None]


@dataclass
class _Request:
    ids: list[int]
    prompt_len: int
    payload: bytes
    """The JSON body (vLLM or SGLang)."""
    binary_payload: bytes | None = None
    """The body for endpoints with the binary extension (built when first needed); sampled: the body."""
    tried: set[str] = field(default_factory=set)
    last_error: RetryableError | None = None
    seed: int = 0
    """Sampled: the seed of the draws (the same on every attempt and endpoint)."""


class TeacherClient:
    """Scores token sequences with the teacher. One instance per event loop; `start()` before `score()`."""

    def __init__(self, config: TeacherConfig, *, on_event: EventHook | None = None) -> None:
        if config.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {config.backend!r}")
        if config.k < 1:
            raise ValueError(f"k: expected >= 1, got {config.k}")
        self.config = config
        self._protocol: TeacherProtocol | None = None
        if config.backend != "auto":
            self._protocol = select(config.backend, sglang_flat=config.sglang_flat)
        self._model_id = config.model
        self._on_event = on_event
        self._limits = HttpLimits(config.request_timeout_s, config.connect_timeout_s, config.max_body_bytes)
        self.endpoints = EndpointSet(
            config.endpoints,
            concurrency=config.per_endpoint_concurrency,
            breaker_failures=config.breaker_failures,
            breaker_reset_s=config.breaker_reset_s,
        )
        self._session: Any = None
        self._started = False
        self.max_tokens: int | None = None
        """Longest rollout (T) the teachers accept: max_model_len - 1, as one token is generated (None:
        unknown). Read at start; a longer rollout fails at once with TeacherBadRequest."""
        self.vocabulary = TeacherVocabulary(None, None)
        """The teacher's tokenizer fingerprint and size, as far as its server says (read at start)."""

    # ------------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TeacherClient:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _ensure_session(self) -> Any:
        if self._session is None or self._session.closed:
            self._session = make_session(self._limits, self.config.api_key)
        return self._session

    async def start(self) -> None:
        """Run the start-up checks; raise a clear PermanentError or RetryableError subclass when one fails.

        Endpoints that fail /health while another passes start with an open breaker (re-probed later).
        """
        try:
            await self._start()
        except TeacherBadRequest as exc:
            if status_of(exc) in (401, 403):
                raise TeacherBadRequest(f"{exc} (is --api-key / GKD_API_KEY the server's key?)") from None
            raise

    async def _start(self) -> None:
        session = self._ensure_session()
        healthy = await probe_health(session, self.endpoints.endpoints, self._limits)
        for ep in self.endpoints.endpoints:
            if ep.url not in healthy:
                self.endpoints.force_open(ep)
                self._emit("breaker_open", {"endpoint": ep.url})
        first = healthy[0]
        if self._protocol is None:
            name = await detect_backend(session, first, self._limits)
            self._protocol = select(name, sglang_flat=self.config.sglang_flat)
        proto = self._protocol
        if self._model_id is None or proto.strict_model:
            self._model_id = await discover_model(session, first, proto, self._model_id, self._limits)
        alive = [e for e in self.endpoints.endpoints if e.url in healthy]
        if proto.offers_binary:  # a vLLM-style card: max_model_len, maybe the binary extension
            await read_model_cards(session, alive, self._limits, binary=self.config.binary)
        if self.config.sampled:
            check_sampled(alive, self.config.k)
        limits = [ep.max_model_len for ep in alive if ep.max_model_len is not None]
        self.max_tokens = min(limits) - 1 if limits else None
        for ep in alive:
            await self._probe_k(ep)
        if self.config.student_tokenizer:
            await check_tokenizer(session, first, self._model_id, self.config.student_tokenizer, self._limits)
        card = proto.offers_binary  # a vLLM-style /v1/models card
        self.vocabulary = await probe_vocabulary(session, first, self._model_id, self._limits, card=card)
        self._started = True
        log.info(
            "teacher client ready: backend=%s model=%s k=%d endpoints=%s (healthy %d)",
            proto.name,
            self._model_id,
            self.config.k,
            [e.url for e in self.endpoints.endpoints],
            len(healthy),
        )

    async def _probe_k(self, ep: Endpoint) -> None:
        """One real request with k on `ep`: a 400 means k is above the server's limit; the answer is
        parsed and validated like any other (so a raw-logits server is refused at start)."""
        url = ep.url
        ids = [0, 1, 2]
        req = _Request(ids, 1, self._json_payload(ids, 1))
        try:
            raw, content_type = await self._post(ep, req)
        except TeacherBadRequest as exc:
            hint = self.protocol.k_limit_hint
            raise TeacherBadRequest(
                f"teacher {url} refused top-k={self.config.k}: {exc}. Fix: {hint.format(k=self.config.k)}, "
                f"or lower --k"
            ) from None
        self._parse(raw, content_type, req)

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    @property
    def protocol(self) -> TeacherProtocol:
        """The protocol spoken with the teacher (given, or detected by `start()`)."""
        if self._protocol is None:
            raise RuntimeError("protocol: expected start() to have detected it, got none yet")
        return self._protocol

    @property
    def backend(self) -> str:
        """The protocol's name ("auto" until `start()` has detected it)."""
        return self._protocol.name if self._protocol is not None else "auto"

    @property
    def model_id(self) -> str:
        """The teacher model id (from the config or discovered by `start()`)."""
        if self._model_id is None:
            raise RuntimeError("model_id: expected start() to have discovered it, got no model yet")
        return self._model_id

    def in_flight(self) -> int:
        """Requests outstanding (on the wire or waiting for an endpoint slot)."""
        return self.endpoints.in_flight()

    # -------------------------------------------------------------------------------------- scoring

    def _json_payload(self, ids: list[int], prompt_len: int) -> bytes:
        return orjson.dumps(self.protocol.request(ids, prompt_len, self.config.k, self.model_id))

    def _parse(
        self, raw: bytes, content_type: str, req: _Request
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, logprobs, counts or None) of an answer, parsed as its content type says: an endpoint may
        answer JSON although binary was asked for (a proxy, a server restarted without the extension)."""
        T, k = len(req.ids), self.config.k
        if self.config.sampled:
            if not content_type.startswith(sampled.MEDIA_TYPE):
                raise MalformedResponse(
                    f"sampled teacher answer: expected {sampled.MEDIA_TYPE}, got {content_type or 'none'} "
                    f"(a teacher restarted without the sampled extension?)"
                )
            return sampled.parse_response(raw, T, req.prompt_len, k)
        proto = BINARY if content_type.startswith(BINARY.media_type) else self.protocol
        return (*proto.parse(raw, T, req.prompt_len, k), None)

    async def _post(self, ep: Endpoint, req: _Request) -> tuple[bytes, str]:
        """(body, content type) of `ep`'s answer to `req` (binary when `ep` offers it)."""
        proto = self.protocol
        payload, accept = req.payload, proto.media_type
        if self.config.sampled:
            if req.binary_payload is None:
                body = sampled.build_request(req.ids, self.config.k, self.model_id, req.prompt_len, req.seed)
                req.binary_payload = orjson.dumps(body)
            payload, accept = req.binary_payload, sampled.MEDIA_TYPE
        elif ep.binary:
            proto = BINARY
            if req.binary_payload is None:
                body = BINARY.request(req.ids, req.prompt_len, self.config.k, self.model_id)
                req.binary_payload = orjson.dumps(body)
            payload, accept = req.binary_payload, BINARY.media_type
        session = self._ensure_session()
        raw, headers = await request(
            session, "POST", ep.url + proto.score_path, data=payload, limits=self._limits, accept=accept
        )
        return raw, headers.get("Content-Type", "")

    async def score(self, input_ids: np.ndarray, prompt_len: int, seed: int = 0) -> TeacherScores:
        """Teacher top-k (or, `sampled`, k draws seeded by `seed`) for tokens prompt_len..T-1 of
        `input_ids` (int [T]).

        Raises WireFormatError (bad prompt_len), PermanentError subclasses at once (4xx, malformed or
        invalid answer), or the last RetryableError once max_retries retries and failover are exhausted.
        """
        if not self._started:
            raise RuntimeError("score: expected start() first (it runs the start-up checks)")
        ids = np.asarray(input_ids).reshape(-1)
        T = int(ids.shape[0])
        if not 1 <= prompt_len < T:
            raise WireFormatError("prompt_len", f"expected 1 <= prompt_len < T={T}, got {prompt_len}")
        if self.max_tokens is not None and self.max_tokens < T:
            raise TeacherBadRequest(
                f"rollout of T={T} tokens does not fit the teacher's context: expected T <= "
                f"max_model_len - 1 = {self.max_tokens} (one token is generated after the prompt). Fix: "
                f"serve the teacher with --max-model-len >= {T + 1}, or produce shorter rollouts"
            )
        ids_list = ids.tolist()
        req = _Request(ids_list, prompt_len, self._json_payload(ids_list, prompt_len), seed=seed)
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._attempt(req, attempts)
            except RetryableError as exc:
                info = {"endpoint": _url_of(exc), "error": type(exc).__name__}
                if attempts > self.config.max_retries:
                    self._emit("error", info)
                    raise
                self._emit("retry", info)
                await asyncio.sleep(self._backoff_s(attempts))

    def _backoff_s(self, attempt: int) -> float:
        """Capped exponential backoff with equal jitter: in [d/2, d], d = min(max, base * 2^(attempt-1))."""
        d = min(self.config.backoff_max_s, self.config.backoff_base_s * (2 ** (attempt - 1)))
        return d / 2 + random.uniform(0, d / 2)

    async def _attempt(self, req: _Request, attempt: int) -> TeacherScores:
        ep = self.endpoints.pick(req.tried)
        if ep is None:
            wait = min(self.endpoints.next_ready_in(), self.config.backoff_max_s)
            await asyncio.sleep(wait)
            last = f"; this request's last error: {req.last_error}" if req.last_error else ""
            raise _tag(
                TeacherConnectionError(
                    f"no teacher endpoint available: every circuit breaker is open "
                    f"({[e.url for e in self.endpoints.endpoints]}){last}"
                ),
                "",
            )
        t0 = time.perf_counter()
        verdict = False
        try:
            async with self.endpoints.slot(ep):
                raw, content_type = await self._post(ep, req)
            ids_RK, lp_RK, counts_RK = self._parse(raw, content_type, req)
            verdict = True
        except RetryableError as exc:
            verdict = True
            self._failed(ep, exc, req, time.perf_counter() - t0)
            raise
        except PermanentError as exc:
            verdict = True
            self._succeeded(ep)  # it answered: the endpoint is up, the request is wrong
            self._emit("request", {"endpoint": ep.url, "latency_s": time.perf_counter() - t0, "ok": False})
            self._emit("error", {"endpoint": ep.url, "error": type(exc).__name__})
            raise
        finally:
            if not verdict:  # cancelled or an unexpected exception: free a half-open probe slot
                self.endpoints.release_probe(ep)
        latency = time.perf_counter() - t0
        self._succeeded(ep)
        self._emit("request", {"endpoint": ep.url, "latency_s": latency, "ok": True})
        return TeacherScores(ids_RK, lp_RK, ep.url, latency, attempt, counts_RK)

    def _failed(self, ep: Endpoint, exc: RetryableError, req: _Request, latency: float) -> None:
        _tag(exc, ep.url)
        req.last_error = exc
        req.tried.add(ep.url)
        opened = self.endpoints.failure(ep) is not None
        self._emit("request", {"endpoint": ep.url, "latency_s": latency, "ok": False})
        if opened:  # once per outage; failed re-probes are counted and reported when it closes
            log.warning(
                "teacher %s: circuit breaker open after %d consecutive failures (last: %s); "
                "re-probing every %gs",
                ep.url,
                ep.consecutive_failures,
                exc,
                self.endpoints.breaker_reset_s,
            )
            self._emit("breaker_open", {"endpoint": ep.url})

    def _succeeded(self, ep: Endpoint) -> None:
        outage_s = self.endpoints.success(ep)
        if outage_s is not None:
            log.warning(
                "teacher %s: circuit breaker closed after %.1fs open (%d failed probes, %d failures in all)",
                ep.url,
                outage_s,
                ep.failed_probes,
                ep.failures,
            )
            self._emit("breaker_closed", {"endpoint": ep.url, "outage_s": outage_s})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(name, data)
        except Exception:  # a metrics hook must never break scoring
            log.exception("teacher client on_event hook raised for %s", name)


def _tag(exc: GKDError, url: str) -> GKDError:
    exc.endpoint = url  # type: ignore[attr-defined]
    return exc


def _url_of(exc: BaseException) -> str:
    return str(getattr(exc, "endpoint", ""))
