"""What a teacher client is told (`TeacherConfig`) and what it answers (`TeacherScores`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass
class TeacherConfig:
    """How to reach the teacher servers and what to ask them."""

    endpoints: list[str]
    """Base URLs, e.g. "http://127.0.0.1:8000" (no /v1)."""
    backend: str = "auto"
    """"vllm" | "sglang" | "auto" (detected at start: /get_model_info answers -> sglang, else vllm)."""
    k: int = 20
    """Top-k logprobs per position; with `sampled`, draws per position (n)."""
    sampled: bool = False
    """Ask for n = k draws per position from the teacher's distribution (RS-KD) instead of its top-k:
    the reference server's sampled extension (pipeline/teacher/sampled.py); every endpoint must offer it."""
    model: str | None = None
    """Model id to send; None: discovered from /v1/models at start (per client instance)."""
    api_key: str | None = None
    """Sent as Authorization: Bearer; never logged."""
    request_timeout_s: float = 60.0
    """Whole request, connect to last body byte."""
    connect_timeout_s: float = 5.0
    """TCP connect."""
    max_retries: int = 4
    """Retries per request across endpoints (so at most max_retries + 1 attempts)."""
    backoff_base_s: float = 0.1
    """First retry delay; doubles per retry, with jitter."""
    backoff_max_s: float = 5.0
    """Cap of the retry delay."""
    per_endpoint_concurrency: int = 64
    """Requests on the wire per endpoint."""
    breaker_failures: int = 5
    """Consecutive retryable failures that open an endpoint's circuit breaker."""
    breaker_reset_s: float = 2.0
    """Seconds an open breaker waits before letting one probe request through (half-open)."""
    student_tokenizer: str | None = None
    """Path or id of the student's tokenizer: at start the teacher's /tokenize must give the same ids."""
    max_body_bytes: int = 256 * 1024 * 1024
    """Largest response body accepted."""
    sglang_flat: bool = True
    """SGLang: ask for the flat base64 top-logprobs (no nested JSON); servers without it answer nested."""
    binary: bool = True
    """Use the binary top-k response with endpoints that advertise it (the reference server does)."""


@dataclass
class TeacherScores:
    """The teacher's top-k for the rows the loss uses. Row r is the distribution over token prompt_len + r."""

    ids_RK: np.ndarray
    """int32 [R, k], each row sorted by logprob descending."""
    logprobs_RK: np.ndarray
    """float32 [R, k], natural-log probabilities over the full vocabulary; -inf allowed."""
    endpoint: str
    latency_s: float
    """Seconds of the successful attempt (HTTP + parse)."""
    attempts: int
    """Attempts made, 1 when the first succeeded."""
    counts_RK: np.ndarray | None = None
    """Sampled teacher: int32 [R, k] draw counts (rows sum to k; count-0 entries are padding)."""
