"""Student generation for on-policy rollouts: in process with transformers, or an OpenAI-compatible server.

Both take prompts as token ids and return completion token ids (ending with EOS when the model stopped),
so the rollout holds exactly the ids the student produced, never a re-tokenization of its text. Both can
load a newly published checkpoint: in process by loading its weights, on a server through an optional
reload endpoint (SGLang's ``POST /update_weights_from_disk {"model_path": ...}``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from pipeline.errors import MalformedResponse, PermanentError, RetryableError
from pipeline.teacher import vllm

log = logging.getLogger("gkd.rollouts")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0


class Generator(Protocol):
    async def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """One completion (token ids) per prompt."""
        ...

    async def load(self, checkpoint: str) -> None:
        """Serve the weights of `checkpoint` from now on."""
        ...

    async def close(self) -> None: ...


def _cut_at_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids


class LocalGenerator:
    """transformers `generate` in a worker thread (the event loop stays free for Redis)."""

    def __init__(self, model_path: str, tokenizer: Any, sampling: Sampling, device: str = "auto") -> None:
        import torch

        self.torch = torch
        self.sampling = sampling
        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.model = self._load(model_path)

    def _load(self, path: str) -> Any:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        dtype = self.torch.bfloat16 if self.device.type == "cuda" else self.torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(self.device).eval()

    async def load(self, checkpoint: str) -> None:
        self.model = await asyncio.to_thread(self._load, checkpoint)

    async def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        return await asyncio.to_thread(self._generate, prompts, seed)

    def _generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        torch, s = self.torch, self.sampling
        width = max(map(len, prompts))
        # Left padding: every prompt ends at the same column, where generation starts.
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "pad_token_id": self.pad,
            "eos_token_id": self.eos,
        }
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return [_cut_at_eos(row[width:].tolist(), self.eos) for row in out]

    async def close(self) -> None:
        return None


class ServerGenerator:
    """``POST <url>/v1/completions`` with token-id prompts (vLLM, SGLang and other OpenAI-compatible servers).

    Completion ids come from ``choices[i].token_ids`` (vLLM's ``return_token_ids``), else from
    ``logprobs.tokens`` in the ``token_id:<n>`` form, else by tokenizing ``text`` (logged once: the ids
    may then differ from what the server sampled).

    The model id sent is the one the server lists in ``GET /v1/models``: `model` when it is listed, else
    the first listed (a server started from the same folder often serves it under another name).
    """

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer: Any,
        sampling: Sampling,
        *,
        timeout_s: float = 120.0,
        reload_path: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self.reload_path = reload_path
        self._session: aiohttp.ClientSession | None = None
        self._warned = False
        self._model_checked = False

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def _served_model(self) -> str:
        """`self.model` if the server lists it in /v1/models, else the first listed id (asked once)."""
        if self._model_checked:
            return self.model
        try:
            body = await self._request("GET", vllm.MODELS_PATH, None)
        except PermanentError:  # a server without /v1/models: send the configured name
            body = None
        served = vllm.VLLM.served_models(body)
        if served and self.model not in served:
            log.info("student server %s serves %s, not %r: generating with %r", self.url, served, self.model,
                     served[0])  # fmt: skip
            self.model = served[0]
        self._model_checked = True
        return self.model

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            async with self._http().request(method, self.url + path, json=body) as resp:
                text = await resp.text()
                if resp.status >= 500 or resp.status == 429:
                    raise RetryableError(
                        f"student server {self.url}{path}: expected 200, got {resp.status}: {text[:200]}"
                    )
                if resp.status != 200:
                    raise PermanentError(
                        f"student server {self.url}{path}: expected 200, got {resp.status}: {text[:200]}"
                    )
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RetryableError(
                f"student server {self.url}{path}: expected a response, got {type(exc).__name__}: {exc}"
            ) from exc

    async def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        s = self.sampling
        body = {
            "model": await self._served_model(),
            "prompt": prompts,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": seed,
            "return_token_ids": True,
        }
        data = await self._post("/v1/completions", body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            got = len(choices) if isinstance(choices, list) else type(choices).__name__
            raise MalformedResponse(f"student server: expected {len(prompts)} choices, got {got}")
        choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
        return [self._ids(c) for c in choices]

    def _ids(self, choice: dict[str, Any]) -> list[int]:
        ids = choice.get("token_ids")
        if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
            return _cut_at_eos(ids, self.tokenizer.eos_token_id)
        tokens = (choice.get("logprobs") or {}).get("tokens")
        if isinstance(tokens, list) and tokens and all(str(t).startswith("token_id:") for t in tokens):
            return _cut_at_eos([int(str(t)[9:]) for t in tokens], self.tokenizer.eos_token_id)
        text = choice.get("text")
        if not isinstance(text, str):
            raise MalformedResponse(
                f"student server: expected token_ids or text in a choice, got {sorted(choice)}"
            )
        if not self._warned:
            log.warning("student server returns no token ids; re-tokenizing its text (ids may differ)")
            self._warned = True
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if choice.get("finish_reason") == "stop" and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    async def load(self, checkpoint: str) -> None:
        if self.reload_path is None:
            log.warning(
                "policy %s published, but no --student-server-reload path: the server keeps its weights",
                checkpoint,
            )
            return
        await self._post(self.reload_path, {"model_path": checkpoint})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
