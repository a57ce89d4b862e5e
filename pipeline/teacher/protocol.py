"""What a teacher protocol object offers, and the one place that picks a protocol by name.

Each protocol (vLLM's completions, SGLang's /generate, the reference server's binary top-k) is one
object, defined in its own module, that both sides use: the client builds requests and parses answers
with it; the reference server, the test doubles and the bench servers render answers with it. Nothing
else spells a protocol's field names.

    proto = protocol.select("vllm")
    body = proto.request(input_ids, prompt_len, k, model)       # JSON-able dict, POSTed to proto.score_path
    ids_RK, logprobs_RK = proto.parse(raw, T, prompt_len, k)     # validated, sorted, MalformedResponse else

Shape legend: T = tokens, R = T - prompt_len, K = top-k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

#: Names a user may choose with --backend ("auto" detects one at start).
PROTOCOL_NAMES = ("vllm", "sglang")


class TeacherProtocol(ABC):
    """One teacher wire protocol: request body, scoring path, answer parser, media type."""

    name: ClassVar[str]
    """The name used in settings and logs."""
    score_path: ClassVar[str]
    """Path of the scoring request (POST)."""
    media_type: ClassVar[str] = "application/json"
    """Content type of a scoring answer in this protocol."""
    k_limit_hint: ClassVar[str] = "check the server's top-k limit"
    """How to fix a 400 refusing k (shown at start-up; `{k}` is filled in)."""
    models_path: ClassVar[str]
    """GET path that names the served model(s)."""
    strict_model: ClassVar[bool] = True
    """The server refuses a model id it does not serve, so a configured id is checked at start."""
    offers_binary: ClassVar[bool] = False
    """Servers of this protocol may advertise the binary top-k extension (pipeline/teacher/binary.py)."""

    @abstractmethod
    def served_models(self, body: Any) -> list[str]:
        """Model ids in a decoded `models_path` body (empty when it names none)."""

    @abstractmethod
    def request(self, input_ids: list[int], prompt_len: int, k: int, model: str) -> dict[str, Any]:
        """The scoring request body asking for the top-`k` of tokens prompt_len..T-1."""

    @abstractmethod
    def parse(self, raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [R, K], logprobs float32 [R, K]) from an answer body; MalformedResponse when invalid."""


def select(name: str, *, sglang_flat: bool = True) -> TeacherProtocol:
    """The protocol object for `name` (one of PROTOCOL_NAMES); ValueError naming the choices otherwise."""
    from pipeline.teacher import sglang, vllm

    if name == vllm.VLLM.name:
        return vllm.VLLM
    if name == sglang.SglangProtocol.name:
        return sglang.SglangProtocol(flat=sglang_flat)
    raise ValueError(f"teacher protocol: expected one of {PROTOCOL_NAMES}, got {name!r}")
