"""Run-wide state in Redis: stats counters, worker heartbeats, the fixed run config, the policy version."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis

from pipeline.errors import ConfigMismatch, NameInUse, PolicyRegression, RedisUnavailable, StreamGroupMissing
from pipeline.queue import schema as K
from pipeline.queue import scripts
from pipeline.queue.schema import HB, RunKeys

log = logging.getLogger("gkd.runstate")

# KEYS: config. ARGV: "1" to write missing fields (else only compare), then field, value pairs. Returns
# [field, stored, ours] for each field whose stored value differs, and writes nothing if one does.
# Atomic, so two processes racing to create a run agree.
_CHECK_CONFIG = """
local diff = {}
local missing = {}
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur then
    missing[#missing + 1] = ARGV[i]
    missing[#missing + 1] = ARGV[i + 1]
  elseif cur ~= ARGV[i + 1] then
    diff[#diff + 1] = ARGV[i]
    diff[#diff + 1] = cur
    diff[#diff + 1] = ARGV[i + 1]
  end
end
if #diff == 0 and #missing > 0 and ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], unpack(missing))
end
return diff
"""

# KEYS: policy. ARGV: version, then field, value pairs. Writes them unless the stored version is higher;
# returns the stored version then (a published policy version never decreases), else nil.
_PUBLISH_POLICY = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '-1')
if cur > tonumber(ARGV[1]) then
  return cur
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return false
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def check_run_config(
    r: aioredis.Redis, keys: RunKeys, settings: Mapping[str, object], *, record: bool = True
) -> None:
    """Refuse to join a run whose stored fixed settings differ from this process's; with `record`,
    store those not stored yet (the first process to name one fixes it).

    A process checks without `record` as soon as it can (refusing early), and records only once its
    own start-up checks have passed: a process that fails to start fixes nothing for the run.
    Raises ConfigMismatch naming every differing setting with the run's value and ours.
    """
    args: list[str] = []
    for name, value in sorted(settings.items()):
        args += [name, str(value)]
    if not args:
        return
    diff = await r.eval(_CHECK_CONFIG, 1, keys.config, "1" if record else "0", *args)
    if diff:
        parts = [
            f"{_s(diff[i])}: run has {_s(diff[i + 1])!r}, this process has {_s(diff[i + 2])!r}"
            for i in range(0, len(diff), 3)
        ]
        raise ConfigMismatch(
            f"run {keys.run!r} was started with different settings ({'; '.join(parts)}); "
            f"use the run's settings, another --run name, or clear the run (gkd runs delete {keys.run})"
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


async def other_runs(r: aioredis.Redis, keys: RunKeys, limit_keys: int = 20_000) -> list[str]:
    """Names of the other runs that have keys in this Redis (scans at most `limit_keys` keys): what an idle
    process names when its --run may be mistyped or forgotten."""
    runs: set[str] = set()
    n = 0
    async for key in r.scan_iter(match=K.ALL_RUNS_PATTERN, count=1000):
        runs.add(K.run_of_key(_s(key)))
        n += 1
        if n >= limit_keys:
            break
    return sorted(K.fold_partitions(runs) - {keys.run})


async def record_run_info(r: aioredis.Redis, keys: RunKeys, info: Mapping[str, object]) -> None:
    """Store informational run-config fields (latest writer wins; never compared)."""
    if info:
        await r.hset(keys.config, mapping={k: str(v) for k, v in info.items()})


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
    """The heartbeat hash of one process (role, host, pid, last seen, instance, plus `fields()`),
    expiring `ttl_ms` after the last beat. `gkd status` lists live processes from these hashes.

    An exclusive name (a stream consumer's) belongs to one live process: `claim()` refuses a name whose
    heartbeat another live process keeps beating (two consumers with one name would share each other's
    leases).
    """

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
        exclusive: bool = True,
    ) -> None:
        self.r, self.keys, self.name, self.role = r, keys, name, role
        self.exclusive = exclusive
        """False: several processes may share the name (no stream entries hang on it)."""
        self.ttl_ms = ttl_ms
        self.fields = fields
        self.counts = counts
        """Flushed to `stats` after every beat."""
        self.instance = uuid.uuid4().hex
        self._script = r.register_script(scripts.BEAT)

    async def _write(self, replace: str = "") -> dict[str, str] | None:
        """Write the hash; None, or the fields of the other instance that holds the name."""
        values: dict[str, object] = {
            HB.HOST: socket.gethostname(),
            HB.PID: os.getpid(),
            HB.ROLE: self.role,
            HB.LAST_SEEN_MS: now_ms(),
            **self.fields(),
        }
        flat = [x for k, v in values.items() for x in (k, str(v))]
        args: list[Any] = [self.instance, self.ttl_ms, replace if self.exclusive else "*", *flat]
        other = await self._script(keys=[self.keys.worker(self.name)], args=args)
        return {_s(k): _s(v) for k, v in zip(other[::2], other[1::2], strict=True)} if other else None

    async def claim(self) -> None:
        """Take the name (and beat once). A process that died keeps its heartbeat until the TTL: one on
        this host whose pid is gone is replaced at once; otherwise wait up to one TTL to see whether it
        still beats. Raises NameInUse when it does."""
        replace, first_seen, deadline = "", "", 0.0
        while (other := await self._write(replace)) is not None:
            seen, host, pid = other.get(HB.LAST_SEEN_MS, ""), other.get(HB.HOST), other.get(HB.PID, "")
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                replace = other.get(HB.INSTANCE, "")
            elif not deadline:
                first_seen, deadline = seen, time.monotonic() + self.ttl_ms / 1000 + 0.5
            elif seen != first_seen:
                raise NameInUse(
                    f"{self.name}: another live process uses this name (host {host}, pid {pid}); one name, "
                    f"one process (two would share each other's leases): stop it, or choose another --name"
                )
            elif time.monotonic() > deadline:
                replace = other.get(HB.INSTANCE, "")  # neither beating nor expiring: a clock far off
            else:
                await asyncio.sleep(0.1)
        if self.counts is not None:
            await self.counts.flush(self.r, self.keys)

    async def beat(self) -> None:
        """Write the hash now (and flush the counts)."""
        other = await self._write()
        if other is not None:
            log.error("%s: another process (pid %s on %s) holds this name now", self.name,
                      other.get(HB.PID), other.get(HB.HOST))  # fmt: skip
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def publish_policy(r: aioredis.Redis, keys: RunKeys, version: int, checkpoint: str) -> None:
    """Announce a new student policy; producers reload when the version changes.

    The published version never decreases: raises PolicyRegression (nothing written) when the run
    already has a higher one.
    """
    fields = [
        K.POLICY_VERSION,
        str(version),
        K.POLICY_CHECKPOINT,
        checkpoint,
        K.POLICY_UPDATED_MS,
        str(now_ms()),
    ]
    higher = await r.eval(_PUBLISH_POLICY, 1, keys.policy, str(version), *fields)
    if higher is not None:
        raise PolicyRegression(
            f"run {keys.run!r} already has policy version {int(higher)}; refusing to publish version "
            f"{version} ({checkpoint}): producers would go back to an older policy"
        )


async def read_policy(r: aioredis.Redis, keys: RunKeys) -> tuple[int, str | None]:
    """(version, checkpoint path) of the latest policy; (0, None) before the first publish."""
    raw = await r.hgetall(keys.policy)
    if not raw:
        return 0, None
    d = {_s(k): _s(v) for k, v in raw.items()}
    return int(d.get(K.POLICY_VERSION, 0)), d.get(K.POLICY_CHECKPOINT) or None
