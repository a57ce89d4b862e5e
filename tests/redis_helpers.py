"""Small Redis readers the tests share (`read_config` and `live_workers` are the product's own)."""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeline.queue.runstate import live_workers, read_config
from pipeline.queue.schema import RunKeys

__all__ = ["live_workers", "read_config", "read_stats"]


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def read_stats(r: aioredis.Redis, keys: RunKeys) -> dict[str, int]:
    raw = await r.hgetall(keys.stats)
    return {_s(k): int(v) for k, v in raw.items()}
