"""Small Redis readers the tests share (the product reads these through `gkd status`'s sampler)."""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeline.queue.schema import RunKeys


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def read_config(r: aioredis.Redis, keys: RunKeys) -> dict[str, str]:
    raw = await r.hgetall(keys.config)
    return {_s(k): _s(v) for k, v in raw.items()}


async def read_stats(r: aioredis.Redis, keys: RunKeys) -> dict[str, int]:
    raw = await r.hgetall(keys.stats)
    return {_s(k): int(v) for k, v in raw.items()}


async def live_workers(r: aioredis.Redis, keys: RunKeys) -> dict[str, dict[str, str]]:
    """Every process whose heartbeat has not expired: name -> heartbeat fields."""
    out: dict[str, dict[str, str]] = {}
    async for key in r.scan_iter(match=keys.worker_pattern, count=500):
        raw = await r.hgetall(key)
        if raw:
            out[keys.worker_name(_s(key))] = {_s(k): _s(v) for k, v in raw.items()}
    return out
