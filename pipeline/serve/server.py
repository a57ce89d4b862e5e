"""`gkd teacher`: the reference teacher server. A Hugging Face causal LM behind aiohttp, speaking vLLM's API.

Endpoints (vLLM shapes): `POST /v1/completions` (prompt as text, list of texts, token ids or lists of
them; `prompt_logprobs`, `logprobs`, `max_tokens` >= 1), `GET /v1/models`, `GET /health`,
`POST /tokenize`, `POST /detokenize`. Errors use vLLM's body ``{"error": {"message", "type", "param",
"code"}}`` and codes (400 for k above --max-logprobs with vLLM's wording, for max_tokens 0, for ids out of
vocabulary, for a bad body; 401 without the API key on /v1 routes; 404 for an unknown model; 429 when
too many requests are pending). Concurrent requests are batched into one forward pass (teacher_batcher).

Extensions, opt-in and advertised in /v1/models: the binary top-k (pipeline/teacher/binary.py) and draws
from the teacher's distribution with counts (pipeline/teacher/sampled.py; transformers engine only).

Deviation from vLLM: exactly one greedy token is generated whatever `max_tokens` is (finish_reason
"length"); the server exists for prompt logprobs, not for generation.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from pipeline.errors import ApiError, SettingsError
from pipeline.serve.api import render_binary, render_choice, render_sampled, validate_completion
from pipeline.serve.batcher import Batcher, BatcherConfig
from pipeline.serve.summary import Tally, log_summaries
from pipeline.serve.vllm_engine import VllmEngine
from pipeline.settings import setting
from pipeline.teacher import sampled, vllm
from pipeline.teacher.binary import BINARY
from pipeline.vocab import TOKENIZER_SIZE_FIELD

log = logging.getLogger("gkd.teacher.server")


@dataclass
class TeacherServerSettings:
    """Settings of `gkd teacher`."""

    model: str = setting("", "Hugging Face model path or id to serve (required).")
    engine: str = setting(
        "transformers",
        "What runs the model: transformers (batched forward passes here) or vllm (vLLM's engine, "
        "pip install 'gkd-pipeline[vllm]').",
        choices=("transformers", "vllm"),
    )
    device: str = setting(
        "cpu", "Torch device: cpu, cuda or cuda:N (--engine vllm: vLLM picks its platform)."
    )
    dtype: str = setting("float32", "Model dtype.", choices=("float32", "bfloat16", "float16"))
    max_logprobs: int = setting(64, "Largest prompt_logprobs/logprobs k a request may ask for (like vLLM's).")
    host: str = setting("127.0.0.1", "Address to bind (loopback unless told otherwise).")
    port: int = setting(8000, "TCP port (0: any free port).")
    api_key: str | None = setting(None, "Require Authorization: Bearer KEY on /v1 routes.", secret=True)
    served_model_name: str | None = setting(None, "Model id in /v1/models and responses (default: --model).")
    max_model_len: int | None = setting(
        None, "Longest prompt in tokens (default: the model's max positions)."
    )
    max_batch_tokens: int = setting(
        16384, "Largest padded batch (batch size x longest prompt) per forward (transformers engine)."
    )
    max_wait_ms: float = setting(
        5.0, "How long a request waits for others to share its forward pass (transformers engine)."
    )
    max_samples: int = setting(
        256, "Most draws per position a sampled request (RS-KD extension) may ask for (transformers engine)."
    )
    max_pending: int = setting(1024, "Prompts queued or running before new requests get HTTP 429.")
    max_body_bytes: int = setting(64 * 1024 * 1024, "Largest request body in bytes (413 above).")
    threads: int = setting(
        0,
        "Torch CPU threads (0: half the cores, at most 8; oversubscribed cores crawl; transformers engine).",
    )
    log_level: str = setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
    tensor_parallel_size: int = setting(1, "--engine vllm: GPUs to shard the model over.")
    vllm_args: str = setting(
        "", "--engine vllm: more engine arguments as a JSON object, e.g. '{\"enforce_eager\": true}'."
    )


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    """vLLM's error body (current nested schema)."""
    return json_response(vllm.error_body(err.status, err.message, err.type, err.param), err.status)


class TeacherServer:
    """The model, tokenizer and batcher behind the routes."""

    def __init__(self, settings: TeacherServerSettings, model: Any, tokenizer: Any) -> None:
        """`model`: a Hugging Face causal LM (batched here), or a started VllmEngine (--engine vllm)."""
        self.settings = settings
        self.tokenizer = tokenizer
        self.model_name = settings.served_model_name or settings.model
        self.batcher: Batcher | VllmEngine
        if isinstance(model, VllmEngine):
            self.batcher = model
            self.vocab_size, self.max_model_len = model.vocab_size, model.max_model_len
            self.max_samples = 0  # its prompt logprobs are a top-k: nothing to draw from
        else:
            self.vocab_size = int(model.config.vocab_size)
            self.max_model_len = settings.max_model_len or int(
                getattr(model.config, "max_position_embeddings", 2048)
            )
            self.max_samples = settings.max_samples
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            self.batcher = Batcher(
                model, settings.device, BatcherConfig(settings.max_batch_tokens, settings.max_wait_ms, pad)
            )
        self.pending = 0
        self.tally = Tally()
        self.created = int(time.time())
        self._decoded: list[str] | None = None
        self.id_strs = [str(i) for i in range(self.vocab_size)]

    def decoded(self) -> list[str]:
        """decoded_token text of every id (computed once; ids the tokenizer cannot decode give "")."""
        if self._decoded is None:
            out = []
            for i in range(self.vocab_size):
                try:
                    out.append(self.tokenizer.decode([i]))
                except Exception:  # ids past the tokenizer (padded embedding rows)
                    out.append("")
            self._decoded = out
        return self._decoded

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.decoded)
        self.batcher.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.batcher.stop()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.settings.api_key
        if key and request.path.startswith("/v1"):  # vLLM guards /v1 routes only
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return json_response(vllm.UNAUTHORIZED_BODY, 401)
        try:
            return await handler(request)
        except ApiError as err:
            self.tally.refused += 1
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status == 404:
                return json_response({"detail": "Not Found"}, 404)
            if exc.status == 413:
                return error_response(
                    ApiError(413, f"request body over {self.settings.max_body_bytes} bytes")
                )
            raise

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        body = vllm.models_body(
            self.model_name,
            max_model_len=self.max_model_len,
            owned_by="gkd",
            created=self.created,
            root=self.settings.model,
            parent=None,
            permission=[],
            **BINARY.card(),  # opt-in binary top-k (pipeline/teacher/binary)
            **(sampled.card(self.max_samples) if self.max_samples else {}),  # opt-in draws (RS-KD)
            **{TOKENIZER_SIZE_FIELD: len(self.tokenizer)},  # workers record it for the trainer's check
        )
        return json_response(body)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"expected a JSON body, got invalid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"expected a JSON object, got {type(body).__name__}")
        return body

    async def completions(self, request: web.Request) -> web.Response:
        req = validate_completion(await self._body(request), self)
        if self.pending + len(req.prompts) > self.settings.max_pending:
            raise ApiError(
                429,
                f"server busy: {self.pending} prompts pending (limit {self.settings.max_pending})",
                "TooManyRequests",
            )
        self.pending += len(req.prompts)
        self.tally.requests += 1
        self.tally.prompts += len(req.prompts)
        self.tally.positions += sum(len(p) for p in req.prompts)
        try:
            if req.draws is not None:  # only the transformers Batcher draws (max_samples 0 otherwise)
                assert isinstance(self.batcher, Batcher)
                results = [await self.batcher.submit(req.prompts[0], req.job_k, req.draws)]
            else:
                results = await asyncio.gather(*(self.batcher.submit(ids, req.job_k) for ids in req.prompts))
        finally:
            self.pending -= len(req.prompts)
        if req.draws is not None:
            body = render_sampled(results[0], self.model_name)
            return web.Response(body=body, content_type=sampled.MEDIA_TYPE)
        if req.rows_from is not None and BINARY.media_type in request.headers.get("Accept", ""):
            body = render_binary(req.prompts[0], results[0], req, self.model_name)
            return web.Response(body=body, content_type=BINARY.media_type)
        choices = [
            render_choice(i, ids, res, req, self)
            for i, (ids, res) in enumerate(zip(req.prompts, results, strict=True))
        ]
        n_prompt = sum(len(p) for p in req.prompts)
        doc = vllm.completion_body(
            choices, self.model_name, n_prompt, id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time())
        )
        return json_response(doc)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(
                400, f"expected prompt to be a string, got {type(prompt).__name__}", param="prompt"
            )
        ids = self.tokenizer(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))[
            "input_ids"
        ]
        return json_response(
            {"count": len(ids), "max_model_len": self.max_model_len, "tokens": list(ids), "token_strs": None}
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ApiError(400, "expected tokens to be a list of token ids", param="tokens")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"Token id {bad[0]} is out of vocabulary", param="tokens")
        return json_response({"prompt": self.tokenizer.decode(tokens)})

    def tokenize_prompt(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def load(settings: TeacherServerSettings) -> tuple[Any, Any]:
    """(model in eval mode on the device, tokenizer) for `settings.model`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load, redrawn in logs that are not a terminal
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    if settings.engine == "vllm":
        return VllmEngine(settings), tokenizer
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
    model = model.to(settings.device).eval()  # type: ignore[arg-type]
    return model, tokenizer


@dataclass
class RunningServer:
    """A server started in this event loop (tests, demo). `url` is its base URL."""

    server: TeacherServer
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(
    settings: TeacherServerSettings, model: Any = None, tokenizer: Any = None
) -> RunningServer:
    """Load (unless given) and serve in the running loop; port 0 picks a free port."""
    if model is None or tokenizer is None:
        if settings.engine == "vllm":  # vLLM's engine binds to the event loop it is built in
            model, tokenizer = load(settings)
        else:
            model, tokenizer = await asyncio.to_thread(load, settings)
    server = TeacherServer(settings, model, tokenizer)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _port_error(settings, exc) from None
    port = runner.addresses[0][1]
    return RunningServer(server, runner, f"http://{settings.host}:{port}")


def _port_error(settings: TeacherServerSettings, exc: OSError) -> SettingsError:
    where = f"{settings.host}:{settings.port}"
    return SettingsError(
        f"port: expected {where} to be free for the server, got {exc.strerror or exc}; stop what listens "
        f"there, or pass another --port (0: any free port)"
    )


def check_port(settings: TeacherServerSettings) -> None:
    """Raise SettingsError when the server could not bind its address (checked before the model loads)."""
    if settings.port == 0:
        return
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SettingsError(f"host: expected an address to bind, got {settings.host!r} ({exc})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind(addr)
        except OSError as exc:
            raise _port_error(settings, exc) from None


def set_threads(settings: TeacherServerSettings) -> int:
    """Set torch's intra-op threads for this process (the server's own process only: it is global)."""
    import torch

    n = settings.threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(n)
    return n


async def serve(settings: TeacherServerSettings, model: Any = None, tokenizer: Any = None) -> None:
    """Run until SIGINT/SIGTERM (`model`, `tokenizer`: loaded already, else loaded here)."""
    if settings.engine != "vllm":  # vLLM's engine core sets its own threads
        set_threads(settings)
    running = await start_server(settings, model, tokenizer)
    log.info(
        "gkd teacher serving %s on %s (max_logprobs=%d, device=%s, dtype=%s)",
        running.server.model_name,
        running.url,
        settings.max_logprobs,
        settings.device,
        settings.dtype,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    summaries = asyncio.create_task(log_summaries(running.server, running.url))
    await stop.wait()
    summaries.cancel()
    log.info("gkd teacher stopping")
    await running.stop()
