"""Stream plumbing outside the leases: the consumer groups of a run and the producer's atomic add."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from pipeline.errors import RedisCommandError
from pipeline.queue import schema as K
from pipeline.queue.schema import RunKeys, Stat, Stream


async def ensure_group(r: aioredis.Redis, stream: Stream) -> None:
    """Create the group of `stream` (and the stream) if missing; a no-op when it exists."""
    if stream.group is None:
        raise ValueError(f"stream: expected rollouts or ready (with a consumer group), got {stream.kind}")
    try:
        await r.xgroup_create(stream.key, stream.group, id="0", mkstream=True)
    except RedisCommandError as exc:
        if exc.code != "BUSYGROUP":
            raise


async def ensure_groups(r: aioredis.Redis, keys: RunKeys) -> None:
    """Create both consumer groups of a run."""
    for stream in keys.work_streams:
        await ensure_group(r, stream)


async def add_rollouts(
    r: aioredis.Redis, keys: RunKeys, items: Sequence[tuple[str, bytes]], batch_id: str | None = None
) -> list[bytes]:
    """XADD (rollout id, payload) pairs to the rollouts stream in one MULTI transaction.

    Counts them in `stats` (produced, bytes in). With `batch_id`, the same transaction writes the
    batch's marker (`batch_landed`), so a caller whose reply was lost can tell whether it landed.
    Returns the stream entry ids. Callers wait for room first (`Backpressure.wait_for_room`).
    """
    async with r.pipeline(transaction=True) as pipe:
        for rid, payload in items:
            pipe.xadd(keys.rollouts.key, {K.FIELD_ID: rid, K.FIELD_DATA: payload})
        pipe.hincrby(keys.stats, Stat.ROLLOUTS_PRODUCED, len(items))
        pipe.hincrby(keys.stats, keys.rollouts.bytes_in, sum(len(p) for _, p in items))
        if batch_id is not None:
            pipe.set(keys.batch_marker(batch_id), 1, px=K.BATCH_MARKER_TTL_MS)
        res = await pipe.execute()
    return [sid for sid in res[: len(items)]]


async def batch_landed(r: aioredis.Redis, keys: RunKeys, batch_id: str) -> bool:
    """Whether the batch written with this id landed (its marker lives `BATCH_MARKER_TTL_MS`)."""
    return bool(await r.exists(keys.batch_marker(batch_id)))
