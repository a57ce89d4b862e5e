"""Redis connections with finite timeouts.

Every process uses `connect()`. Retries are off (``retry=None``-style: a dead server is noticed at once)
because every long-running loop in `workers/` handles `redis.exceptions.ConnectionError` itself, backs
off and reconnects; a hidden 4-second retry inside the client would only hide outages from the metrics.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: Longest a blocking XREADGROUP may wait; socket timeouts are set above it.
MAX_BLOCK_MS = 2000


def connect(url: str, *, socket_timeout_s: float = 10.0, connect_timeout_s: float = 5.0) -> aioredis.Redis:
    """An asyncio Redis client for `url` (``redis://``, ``rediss://`` for TLS, ``unix://``).

    Responses are bytes (payloads are binary). Every command has a finite socket timeout.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=max(socket_timeout_s, MAX_BLOCK_MS / 1000 + 5),
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


def connect_sync(url: str, *, socket_timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """A blocking Redis client (for `gkd status` and tests), same timeouts and no hidden retries."""
    import redis

    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
    )
