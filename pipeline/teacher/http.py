"""HTTP transport for teacher clients: one aiohttp session per client, finite timeouts, status -> error class.

Every request has a total timeout and a connect timeout; bodies are read up to `max_body_bytes`. The
mapping is the one retry logic relies on (branch on class, never on text):

    connection refused/reset, body cut short  -> TeacherConnectionError   (retryable)
    no answer within the timeout               -> TeacherTimeout           (retryable)
    HTTP 429                                   -> TeacherOverloaded        (retryable)
    HTTP 5xx (and 408)                         -> TeacherServerError/Timeout (retryable)
    other HTTP 4xx                             -> TeacherBadRequest        (permanent)

Error messages carry the server's own message, from either vLLM error schema: the nested
``{"error": {"message", "type", "code"}}`` (current) or the older flat ``{"object": "error", "message",
"type", "code"}``, or ``{"error": "Unauthorized"}`` (vLLM's 401), or the start of a plain-text body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from pipeline.errors import (
    GKDError,
    TeacherBadRequest,
    TeacherConnectionError,
    TeacherOverloaded,
    TeacherServerError,
    TeacherTimeout,
)


@dataclass(frozen=True)
class HttpLimits:
    """Timeouts and size limits of one client's HTTP traffic."""

    request_timeout_s: float = 60.0
    """Whole request, connect to last body byte."""
    connect_timeout_s: float = 5.0
    """TCP connect (and waiting for a pooled connection)."""
    max_body_bytes: int = 256 * 1024 * 1024
    """Largest response body accepted."""
    max_connections: int = 0
    """Connection pool size across endpoints (0: unlimited; per-endpoint semaphores bound it)."""


def make_session(limits: HttpLimits, api_key: str | None = None) -> aiohttp.ClientSession:
    """A session with the limits' timeouts, no proxy from the environment, and the Bearer key if given.

    Must be called inside the running event loop. The key lives only in the session's default headers.
    """
    connector = aiohttp.TCPConnector(
        limit=limits.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    timeout = aiohttp.ClientTimeout(
        total=limits.request_timeout_s,
        connect=limits.connect_timeout_s,
        sock_connect=limits.connect_timeout_s,
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        trust_env=False,
        raise_for_status=False,
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
    )


def server_message(raw: bytes) -> str:
    """The human message of an error body, from any of the schemas named in the module docstring."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:300].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
        if "detail" in body:  # FastAPI-style validation errors
            return str(body["detail"])[:300]
    return str(body)[:300]


def error_for_status(status: int, raw: bytes, url: str) -> GKDError:
    """The error class (with message) for a non-2xx answer; see the module docstring for the mapping."""
    msg = f"teacher {url} answered HTTP {status}: {server_message(raw)}"
    err: GKDError
    if status == 429:
        err = TeacherOverloaded(msg)
    elif status == 408:
        err = TeacherTimeout(msg)
    elif status >= 500:
        err = TeacherServerError(msg)
    else:
        err = TeacherBadRequest(msg)
    setattr(err, "status", status)  # noqa: B010 (an attribute the hierarchy does not declare)
    return err


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an error raised by `request` (None for connection errors and timeouts)."""
    return getattr(exc, "status", None)


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    body: Any = None,
    data: bytes | None = None,
    limits: HttpLimits,
    accept: str = "application/json",
) -> tuple[bytes, dict[str, str]]:
    """Send one request; return (body bytes, response headers) of a 2xx answer, else raise the mapped error.

    `body` is serialized with orjson (or pass pre-serialized JSON as `data`). The total timeout of the
    session applies; the body is read incrementally up to `limits.max_body_bytes`.
    """
    payload = orjson.dumps(body) if body is not None else data
    headers = {"Accept": accept}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        async with session.request(method, url, data=payload, headers=headers) as resp:
            raw = await _read_limited(resp, limits.max_body_bytes, url)
            if resp.status >= 300:
                raise error_for_status(resp.status, raw, url)
            return raw, dict(resp.headers)
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise TeacherTimeout(
            f"teacher {url}: no complete answer within {limits.request_timeout_s:g}s "
            f"(connect limit {limits.connect_timeout_s:g}s) ({type(exc).__name__})"
        ) from None
    except (aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise TeacherConnectionError(f"teacher {url}: response body cut short or corrupt ({exc})") from None
    except aiohttp.ClientResponseError as exc:
        raise TeacherConnectionError(
            f"teacher {url}: bad HTTP response ({exc.status} {exc.message})"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        # str(), not repr(): aiohttp's repr dumps its internal ConnectionKey(...).
        raise TeacherConnectionError(
            f"teacher {url}: cannot connect or connection lost ({type(exc).__name__}: {exc})"
        ) from None


async def _read_limited(resp: aiohttp.ClientResponse, max_bytes: int, url: str) -> bytes:
    length = resp.content_length
    if length is not None and length > max_bytes:
        raise TeacherBadRequest(
            f"teacher {url}: expected a body of at most {max_bytes} bytes, got "
            f"Content-Length {length} (raise max_body_bytes or lower T/k)"
        )
    # Chunks joined once: readexactly() costs ~1.8x the CPU for a 10 MB body (k = 64, T = 2048).
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > max_bytes:
            raise TeacherBadRequest(f"teacher {url}: expected a body of at most {max_bytes} bytes, got more")
        chunks.append(chunk)
    if length is not None and size != length:
        raise TeacherConnectionError(f"teacher {url}: body cut short ({size} of {length} bytes)")
    return b"".join(chunks)
