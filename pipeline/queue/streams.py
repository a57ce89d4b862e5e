"""Stream plumbing outside the leases: the consumer groups of a run and the producer's atomic add."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from pipeline.errors import RedisCommandError
from pipeline.queue import schema as K
from pipeline.queue import scripts
from pipeline.queue.durable import Replicas
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


async def ensure_groups(r: aioredis.Redis, keys: RunKeys, partitions: int = 1) -> None:
    """Create both consumer groups of a run (of each of its partitions)."""
    for part in keys.parts(partitions):
        for stream in part.work_streams:
            await ensure_group(r, stream)


async def add_rollouts(
    r: aioredis.Redis,
    keys: RunKeys,
    items: Sequence[tuple[str, bytes]],
    batch_id: str | None = None,
    replicas: Replicas | None = None,
) -> list[bytes]:
    """XADD (rollout id, payload) pairs to the rollouts stream of `keys` (a partition's keys in a
    partitioned run) in one script (`scripts.ADD`: all or nothing, one slot).

    Counts them in `stats` (produced, bytes in). With `batch_id`, the same script writes the batch's
    marker (`batch_landed`), so a caller whose reply was lost can tell whether it landed. With
    `replicas`, returns once they have it (or their WAIT timed out). Returns the stream entry ids.
    Callers wait for room first (`Backpressure.wait_for_room`).
    """
    script = r.register_script(scripts.ADD)
    script_keys = [keys.rollouts.key, keys.stats]
    if batch_id is not None:
        script_keys.append(keys.batch_marker(batch_id))
    args: list[Any] = [Stat.ROLLOUTS_PRODUCED, keys.rollouts.bytes_in, K.BATCH_MARKER_TTL_MS]
    for rid, payload in items:
        args += [rid, payload]
    res = await (replicas or Replicas(r)).script(script, script_keys, args)
    return list(res)


async def batch_landed(r: aioredis.Redis, keys: RunKeys, batch_id: str) -> bool:
    """Whether the batch written with this id landed (its marker lives `BATCH_MARKER_TTL_MS`)."""
    return bool(await r.exists(keys.batch_marker(batch_id)))
