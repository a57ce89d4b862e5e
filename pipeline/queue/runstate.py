"""Run-wide state in Redis: stats counters, worker heartbeats, the fixed run config, the policy version."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis

from pipeline.errors import ConfigMismatch, RedisUnavailable, StreamGroupMissing
from pipeline.queue import schema as K
from pipeline.queue.schema import HB, RunKeys

log = logging.getLogger("gkd.runstate")

# KEYS: config. ARGV: field, value pairs. Writes missing fields; returns [field, stored, ours] for
# each field whose stored value differs. Atomic, so two processes racing to create a run agree.
_CHECK_CONFIG = """
local diff = {}
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  elseif cur ~= ARGV[i + 1] then
    diff[#diff + 1] = ARGV[i]
    diff[#diff + 1] = cur
    diff[#diff + 1] = ARGV[i + 1]
  end
end
return diff
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def check_run_config(r: aioredis.Redis, keys: RunKeys, settings: Mapping[str, object]) -> None:
    """Record this process's fixed run settings, or refuse to join a run whose stored ones differ.

    Settings not stored yet are added (the first process to name one fixes it). Raises
    ConfigMismatch naming every differing setting with the run's value and ours.
    """
    args: list[str] = []
    for name, value in sorted(settings.items()):
        args += [name, str(value)]
    if not args:
        return
    diff = await r.eval(_CHECK_CONFIG, 1, keys.config, *args)
    if diff:
        parts = [
            f"{_s(diff[i])}: run has {_s(diff[i + 1])!r}, this process has {_s(diff[i + 2])!r}"
            for i in range(0, len(diff), 3)
        ]
        raise ConfigMismatch(
            f"run {keys.run!r} was started with different settings ({'; '.join(parts)}); "
            f"use the run's settings or another --run name"
        )


async def read_config(r: aioredis.Redis, keys: RunKeys) -> dict[str, str]:
    """The run's fixed settings as stored (fields in `schema.Config`); empty before the first process."""
    raw = await r.hgetall(keys.config)
    return {_s(k): _s(v) for k, v in raw.items()}


async def live_workers(r: aioredis.Redis, keys: RunKeys) -> dict[str, dict[str, str]]:
    """Every process of the run whose heartbeat has not expired: name -> heartbeat fields."""
    out: dict[str, dict[str, str]] = {}
    async for key in r.scan_iter(match=keys.worker_pattern, count=500):
        raw = await r.hgetall(key)
        if raw:
            out[keys.worker_name(_s(key))] = {_s(k): _s(v) for k, v in raw.items()}
    return out


async def incr_stats(r: aioredis.Redis, keys: RunKeys, counts: Mapping[str, int]) -> None:
    """Add to monotonic counters in `stats` (one round trip)."""
    items = {k: int(v) for k, v in counts.items() if v}
    if not items:
        return
    async with r.pipeline(transaction=False) as pipe:
        for name, n in items.items():
            pipe.hincrby(keys.stats, name, n)
        await pipe.execute()


#: How long a heartbeat outlives its process's last beat; a process beats every third of it.
HEARTBEAT_TTL_MS = 5000


class Counts:
    """`stats` counters gathered in memory and added to Redis in one round trip per flush, so a hot
    loop never waits on Redis for bookkeeping. Thread-safe."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def update(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._counts.update(counts)

    async def flush(self, r: aioredis.Redis, keys: RunKeys) -> None:
        """Add what was counted since the last flush to `stats`; kept for the next flush on failure."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        try:
            await incr_stats(r, keys, counts)
        except BaseException:
            self.update(counts)
            raise


class Heartbeat:
    """The heartbeat hash of one process (role, host, pid, last seen, plus `fields()`), expiring
    `ttl_ms` after the last beat. `gkd status` lists live processes from these hashes."""

    def __init__(
        self,
        r: aioredis.Redis,
        keys: RunKeys,
        name: str,
        role: str,
        *,
        ttl_ms: int = HEARTBEAT_TTL_MS,
        fields: Callable[[], Mapping[str, object]] = dict,
        counts: Counts | None = None,
    ) -> None:
        self.r, self.keys, self.name, self.role = r, keys, name, role
        self.ttl_ms = ttl_ms
        self.fields = fields
        self.counts = counts
        """Flushed to `stats` after every beat."""

    async def beat(self) -> None:
        """Write the hash now (and flush the counts)."""
        values: dict[str, object] = {
            HB.HOST: socket.gethostname(),
            HB.PID: os.getpid(),
            HB.ROLE: self.role,
            HB.LAST_SEEN_MS: now_ms(),
            **self.fields(),
        }
        key = self.keys.worker(self.name)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={k: str(v) for k, v in values.items()})
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()
        if self.counts is not None:
            await self.counts.flush(self.r, self.keys)

    async def run(self) -> None:
        """Beat every third of the TTL until cancelled; a failed beat waits for the next."""
        while True:
            try:
                await self.beat()
            except (RedisUnavailable, StreamGroupMissing) as exc:
                log.debug("%s: heartbeat failed (%s)", self.name, exc)
            await asyncio.sleep(self.ttl_ms / 3000)

    async def remove(self) -> None:
        """Delete the hash (a clean exit): the process leaves `gkd status` at once."""
        await self.r.delete(self.keys.worker(self.name))


async def publish_policy(r: aioredis.Redis, keys: RunKeys, version: int, checkpoint: str) -> None:
    """Announce a new student policy; producers reload when the version changes."""
    await r.hset(
        keys.policy,
        mapping={
            K.POLICY_VERSION: str(version),
            K.POLICY_CHECKPOINT: checkpoint,
            K.POLICY_UPDATED_MS: str(now_ms()),
        },
    )


async def read_policy(r: aioredis.Redis, keys: RunKeys) -> tuple[int, str | None]:
    """(version, checkpoint path) of the latest policy; (0, None) before the first publish."""
    raw = await r.hgetall(keys.policy)
    if not raw:
        return 0, None
    d = {_s(k): _s(v) for k, v in raw.items()}
    return int(d.get(K.POLICY_VERSION, 0)), d.get(K.POLICY_CHECKPOINT) or None
