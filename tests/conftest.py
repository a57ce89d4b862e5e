"""Test fixtures: a private redis-server for the session (never the shared one on 6379), flushed per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from pipeline.local.redis_server import RedisServer
from pipeline.queue.connection import connect
from pipeline.queue.schema import RunKeys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole session. Fault tests may stop() and start() it."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the session server, flushed before the test (restarted first if a test left it down)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> RunKeys:
    return RunKeys.for_run("test")
