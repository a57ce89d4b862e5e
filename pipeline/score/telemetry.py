"""What a worker tells the world: run stats counters, Prometheus metrics, heartbeats, outage log lines.

Counters are accumulated in memory and added to the run's `stats` hash on each heartbeat (one round
trip), so a hot loop never waits on Redis for bookkeeping. Outages (teacher or Redis) are logged once
when they start and once when they end, not once per failed call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.queue.runstate import heartbeat, incr_stats
from pipeline.queue.schema import RunKeys, Stat
from pipeline.score.metrics import WorkerMetrics
from pipeline.score.options import WorkerReport

log = logging.getLogger("gkd.worker")
T = TypeVar("T")

#: What a Redis outage (restart, network cut) raises from redis-py.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
#: The above, or any error the server answered (NOGROUP after a restart without data, OOM, ...).
REDIS_OR_SERVER_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, ResponseError)


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `event`; True if it is set."""
    if event.is_set():
        return True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()


def is_nogroup(exc: ResponseError) -> bool:
    """Redis's NOGROUP error (a missing stream or consumer group); Redis gives no finer class."""
    return "NOGROUP" in str(exc)


class Telemetry:
    """Stats, metrics and outage state of one worker named `name`."""

    def __init__(self, name: str, metrics: WorkerMetrics, report: WorkerReport, redis_backoff_max_s: float):
        self.name = name
        self.metrics = metrics
        self.report = report
        self.redis_backoff_max_s = redis_backoff_max_s
        self.stats: collections.Counter[str] = collections.Counter()
        self._teacher_down_since: float | None = None
        self._redis_down_since: float | None = None
        # Recent request latencies (ms) for the heartbeat's p50/p95, which `gkd status` shows.
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=512)

    # ---------------------------------------------------------------------------------- teacher events

    def on_event(self, name: str, fields: dict[str, Any]) -> None:
        """TeacherClient hook: request latency, retries and errors into stats and metrics."""
        endpoint = str(fields.get("endpoint") or "?")
        if name == "request":
            latency_s = float(fields.get("latency_s", 0.0))
            self.stats[Stat.TEACHER_REQUESTS] += 1
            self.stats[Stat.TEACHER_LATENCY_MS_SUM] += int(latency_s * 1000)
            self.metrics.latency.labels(endpoint=endpoint).observe(latency_s)
            self._latencies_ms.append(latency_s * 1000)
        elif name == "retry":
            self.stats[Stat.TEACHER_RETRIES] += 1
            self.metrics.retries.labels(endpoint=endpoint).inc()
        elif name == "error":
            err = fields.get("error")
            label = type(err).__name__ if isinstance(err, BaseException) else str(err or "error")
            self.stats[Stat.TEACHER_ERRORS] += 1
            self.metrics.errors.labels(error=label.split(":", 1)[0][:60]).inc()
        elif name == "breaker_open":
            log.warning("worker %s: teacher %s keeps failing; circuit breaker open", self.name, endpoint)

    def teacher_down(self, exc: BaseException) -> None:
        """A rollout's teacher call failed after the client's retries: log once per outage."""
        self.report.teacher_outage_retries += 1
        self.metrics.retries.labels(endpoint="all").inc()
        if self._teacher_down_since is None:
            self._teacher_down_since = time.monotonic()
            log.warning("worker %s: teacher unavailable (%s); keeping rollouts, retrying", self.name, exc)

    def teacher_up(self) -> None:
        if self._teacher_down_since is not None:
            down_s = time.monotonic() - self._teacher_down_since
            self._teacher_down_since = None
            log.info("worker %s: teacher back after %.1fs", self.name, down_s)

    # ---------------------------------------------------------------------------------- Redis outages

    def redis_ok(self) -> None:
        if self._redis_down_since is not None:
            down_s = time.monotonic() - self._redis_down_since
            self._redis_down_since = None
            log.info("worker %s: Redis back after %.1fs", self.name, down_s)

    async def redis_backoff(
        self, what: str, exc: BaseException, delay: float, stop: asyncio.Event | None = None
    ) -> float:
        """Log (once per outage) and wait the capped, doubled delay; return it for the next call.

        With `stop`, the wait ends early when it is set (the read loop); without, it is a plain sleep
        (publishing results is worth trying through the grace period).
        """
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            log.warning("worker %s: Redis unreachable during %s (%s); retrying", self.name, what, exc)
        self.metrics.errors.labels(error="redis").inc()
        delay = min(max(delay * 2, 0.05), self.redis_backoff_max_s)
        wait_s = delay * random.uniform(0.5, 1.0)
        if stop is not None:
            await wait_event(stop, wait_s)
        else:
            await asyncio.sleep(wait_s)
        return delay

    async def redis_retry(self, what: str, fn: Callable[[], Awaitable[T]], lost: T) -> T:
        """`await fn()` until Redis answers (a stopping worker cancels this at the end of its grace).

        Returns `lost` when the consumer group no longer exists (Redis restarted without its data):
        nobody owns the entries any more. Other server errors (e.g. OOM while Redis is full) are
        waited out like outages.
        """
        delay = 0.0
        while True:
            try:
                out = await fn()
            except REDIS_ERRORS as exc:
                delay = await self.redis_backoff(what, exc, delay)
                continue
            except ResponseError as exc:
                if is_nogroup(exc):
                    log.warning("worker %s: %s: consumer group gone (Redis lost its data?)", self.name, what)
                    return lost
                delay = await self.redis_backoff(what, exc, delay)
                continue
            self.redis_ok()
            return out

    # ---------------------------------------------------------------------------------- heartbeat, stats

    async def beat(
        self, r: aioredis.Redis, keys: RunKeys, *, in_flight: int, ttl_ms: int, teacher: str
    ) -> None:
        """Write the heartbeat hash (expires after `ttl_ms`) and flush the counters."""
        extra: dict[str, object] = {
            "positions": self.report.positions,
            "scored": self.report.scored,
            "teacher": teacher,
        }
        if self._latencies_ms:
            ordered = sorted(self._latencies_ms)
            extra["latency_p50_ms"] = round(ordered[len(ordered) // 2], 1)
            extra["latency_p95_ms"] = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 1)
        await heartbeat(r, keys, self.name, role="worker", in_flight=in_flight, ttl_ms=ttl_ms, extra=extra)
        await self.flush(r, keys)

    async def flush(self, r: aioredis.Redis, keys: RunKeys) -> None:
        """Add the counters gathered since the last flush to `stats` (kept for next time on failure)."""
        counts, self.stats = self.stats, collections.Counter()
        try:
            await incr_stats(r, keys, counts)
        except BaseException:
            self.stats.update(counts)
            raise
