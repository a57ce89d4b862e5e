"""A scripted loopback teacher for tests: real HTTP on 127.0.0.1 serving recorded vLLM and SGLang shapes.

    fake = await FakeTeacher(backend="vllm", k_max=20).start()
    fake.script("500", "500")            # the next two scoring requests fail, then normal answers
    fake.mode = "slow"                   # or: every scoring request has this fault until reset to "ok"
    ids_RK, lp_RK = fake.expected(input_ids, prompt_len, k)   # what a correct client must return
    await fake.stop()

The distribution at position p depends only on token p (a fixed random table over a small vocabulary),
so expected arrays are cheap to compute. Bodies are built with the protocol modules' test-vector
builders (k+1 entries when the actual token is outside the top-k, -9999.0 for -inf, optionally
shuffled key order) so they match the real servers' format.

Faults (one per scoring request: POST /v1/completions or /generate):
  ok, 500, 503, 429, slow (sleeps `slow_s` then answers), disconnect (closes without answering),
  truncated (Content-Length promises more than is sent, then the connection closes),
  truncated_json (a 200 whose complete body is cut-off JSON), malformed (200, not JSON),
  wrong_rows (one row missing), nan (a NaN literal), positive (a logprob of +0.5),
  raw_logits (logits instead of logprobs), unnormalized (every entry log 0.2: rows sum above 1),
  bad_request (400, nested vLLM error), bad_request_flat (400, the older flat vLLM error schema).
A request with prompt_logprobs above `k_max` gets vLLM's real 400:
"Requested prompt logprobs of K, which is greater than max allowed: M".
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import deque
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from pipeline.teacher import sglang, vllm

FAULTS = (
    "ok", "500", "503", "429", "slow", "disconnect", "truncated", "truncated_json", "malformed", "wrong_rows",
    "nan", "positive", "raw_logits", "unnormalized", "bad_request", "bad_request_flat",
)  # fmt: skip


def _err(status: int, message: str, typ: str = "BadRequestError", flat: bool = False) -> web.Response:
    body = vllm.error_body(status, message, typ, flat=flat)  # flat: vLLM before the OpenAI-style nesting
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class FakeTeacher:
    """A loopback HTTP teacher with scripted answers and faults (see the module docstring)."""

    def __init__(
        self,
        *,
        backend: str = "vllm",
        model: str = "fake-teacher",
        vocab: int = 64,
        k_max: int = 20,
        api_key: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        neg_inf: bool = True,
        sglang_flat: bool = True,
        slow_s: float = 5.0,
        delay_s: float = 0.0,
        max_model_len: int = 4096,
        tokenizer: Any = None,
    ) -> None:
        if backend not in ("vllm", "sglang"):
            raise ValueError(f"backend: expected vllm or sglang, got {backend!r}")
        self.backend, self.model, self.vocab, self.k_max = backend, model, vocab, k_max
        self.api_key, self.shuffle, self.sglang_flat = api_key, shuffle, sglang_flat
        self.slow_s, self.delay_s, self.max_model_len = slow_s, delay_s, max_model_len
        self.tokenizer = tokenizer
        """/tokenize answers with this Hugging Face tokenizer's ids (a teacher of the student's family);
        None: a byte tokenizer, which no real student matches."""
        rng = np.random.default_rng(seed)
        logits_VV = rng.normal(0.0, 3.0, (vocab, vocab))
        if neg_inf:  # a few impossible tokens per row, so -inf / -9999.0 shows up in top-k at large k
            logits_VV[rng.random((vocab, vocab)) < 0.05] = -np.inf
        m = logits_VV.max(axis=1, keepdims=True)
        self.table_VV = logits_VV - (m + np.log(np.exp(logits_VV - m).sum(axis=1, keepdims=True)))
        self.mode = "ok"
        self._script: deque[str] = deque()
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"} of every request
        self.scored = 0  # scoring requests answered (any fault included)
        self.inflight = 0  # scoring requests being answered now
        self.max_inflight = 0  # the most at once
        self.url = ""
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------------------------ control

    def script(self, *faults: str) -> None:
        """Queue faults for the next scoring requests (then `mode` applies again)."""
        for f in faults:
            if f not in FAULTS:
                raise ValueError(f"fault: expected one of {FAULTS}, got {f!r}")
        self._script.extend(faults)

    def _next_fault(self) -> str:
        return self._script.popleft() if self._script else self.mode

    def full_TV(self, ids: np.ndarray) -> np.ndarray:
        """float64 [T, V]: row p is the distribution at position p (over token p + 1)."""
        return self.table_VV[np.asarray(ids) % self.vocab]

    def topk_TK(self, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over positions 0..T-1 in vLLM's row convention: row t is the distribution over token t
        (row 0 is a placeholder), sorted descending, ties by id."""
        full = self.full_TV(ids)
        order = np.lexsort((np.broadcast_to(np.arange(self.vocab), full.shape), -full), axis=1)[:, :k]
        lp = np.take_along_axis(full, order, axis=1)
        pad = np.zeros((1, k))
        return np.vstack([pad.astype(np.int64), order[:-1]]), np.vstack([pad, lp[:-1]])

    def expected(self, ids: np.ndarray, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [R, k], logprobs float32 [R, k]) a correct client returns for these tokens."""
        ids_TK, lp_TK = self.topk_TK(ids, k)
        return ids_TK[prompt_len:].astype(np.int32), lp_TK[prompt_len:].astype(np.float32)

    # -------------------------------------------------------------------------------------- server

    async def start(self, port: int = 0) -> FakeTeacher:
        """Serve on 127.0.0.1:`port` (0: a free one); a stopped teacher restarts on its old port with
        `start(port_of(fake.url))`."""
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._record])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        if self.backend == "vllm":
            app.router.add_post("/v1/completions", self._completions)
        else:
            app.router.add_get("/get_model_info", self._model_info)
            app.router.add_post("/generate", self._generate)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        authorized = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        if self.api_key and request.path.startswith("/v1") and not authorized:
            return web.json_response(vllm.UNAUTHORIZED_BODY, status=401)
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            vllm.models_body(self.model, max_model_len=self.max_model_len, owned_by="fake")
        )

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"model_path": self.model, "tokenizer_path": self.model, "is_generation": True}
        )

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = str(body.get("prompt", ""))
        if self.tokenizer is not None:
            tokens = list(
                self.tokenizer(text, add_special_tokens=bool(body.get("add_special_tokens", True)))[
                    "input_ids"
                ]
            )
        else:
            tokens = list(text.encode())  # a byte tokenizer: no real student matches it
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": 4096})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        k = int(body.get("prompt_logprobs") or 0)
        if k > self.k_max:
            return _err(
                400, f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.k_max}"
            )
        fault = self._next_fault()
        ids = np.asarray(body["prompt"], dtype=np.int64)
        ids_TK, lp_TK = self.topk_TK(ids, k)
        full_TV = self.full_TV(ids)
        actual_lp = np.concatenate([[0.0], full_TV[np.arange(len(ids) - 1), ids[1:] % self.vocab]])
        doc = vllm.build_prompt_logprobs_body(
            ids_TK,
            lp_TK,
            ids,
            actual_logprobs_T=actual_lp,
            model=self.model,
            shuffle_seed=self.scored if self.shuffle else None,
        )
        if fault in DATA_FAULTS:
            rows = doc["choices"][0]["prompt_logprobs"]
            if fault == "wrong_rows":
                rows.pop()
            else:
                _corrupt_rows([list(row.values()) for row in rows[-2:]], "logprob", fault)
        return await self._deliver(request, doc, fault)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = self._next_fault()
        k = int(body["top_logprobs_num"])
        ids = np.asarray(body["input_ids"], dtype=np.int64)
        ids_TK, lp_TK = self.topk_TK(ids, k)
        flat = self.sglang_flat and bool(body.get("return_flat_raw_top_logprobs_b64"))
        doc = sglang.build_generate_body(ids_TK, lp_TK, int(body["logprob_start_len"]) + 1, flat=flat)
        meta = doc["meta_info"]
        if fault == "wrong_rows" and flat:
            meta["input_top_logprobs_shape"][0] -= 1
        elif fault == "wrong_rows":
            meta["input_top_logprobs"].pop()
        elif fault in DATA_FAULTS and flat:
            name = "input_top_logprobs_val_flat_b64"
            val_NK = np.frombuffer(base64.b64decode(meta[name]), "<f4").reshape(-1, k).copy()
            rows = val_NK[-2:].tolist()
            _corrupt_rows([[[v] for v in row] for row in rows], 0, fault, into=val_NK[-2:])
            meta[name] = base64.b64encode(val_NK.astype("<f4").tobytes()).decode()
        elif fault in DATA_FAULTS:
            _corrupt_rows(meta["input_top_logprobs"][-2:], 0, fault)
        return await self._deliver(request, doc, fault)

    async def _deliver(self, request: web.Request, doc: dict[str, Any], fault: str) -> web.StreamResponse:
        self.scored += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._deliver_inner(request, doc, fault)
        finally:
            self.inflight -= 1

    async def _deliver_inner(
        self, request: web.Request, doc: dict[str, Any], fault: str
    ) -> web.StreamResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if fault in ("500", "503"):
            return _err(int(fault), "Internal Server Error: fake fault", "InternalServerError")
        if fault == "429":
            return _err(429, "Too Many Requests: fake fault", "TooManyRequests")
        if fault in ("bad_request", "bad_request_flat"):
            return _err(400, "fake bad request", flat=fault == "bad_request_flat")
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        raw = json.dumps(doc).encode() if fault == "nan" else orjson.dumps(doc)  # stdlib writes NaN literals
        if fault == "malformed":
            raw = b"<html><body>502 Bad Gateway</body></html>"
        elif fault == "truncated_json":
            raw = raw[: len(raw) // 2]
        if fault in ("disconnect", "truncated"):
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            if fault == "truncated":
                await resp.write(raw[: len(raw) // 2])
            assert request.transport is not None
            request.transport.close()  # the client sees the body cut short
            return resp
        return web.Response(body=raw, status=200, content_type="application/json")


DATA_FAULTS = ("wrong_rows", "nan", "positive", "raw_logits", "unnormalized")


def _corrupt_rows(rows: list[Any], key: Any, fault: str, into: np.ndarray | None = None) -> None:
    """Corrupt the entries of the given rows in place (each entry a dict or list indexed by `key`)."""
    for r, row in enumerate(rows):
        for j, entry in enumerate(row):
            v = entry[key]
            if fault == "raw_logits":  # logits: mostly positive, rows far from normalized
                v = (v if v is not None and v > -9999 else -20.0) + 12.0
            elif fault == "unnormalized":  # each entry 0.6: the row sums above 1 although all are < 0
                v = float(np.log(0.6))
            elif j == 0:
                v = 0.5 if fault == "positive" else float("nan")
            entry[key] = v
            if into is not None:
                into[r, j] = v
