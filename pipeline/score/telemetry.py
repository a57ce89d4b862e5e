"""What a worker tells the world: run stats counters, Prometheus metrics, heartbeat fields, teacher outages.

Counters are accumulated in memory (`Counts`) and added to the run's `stats` hash on each heartbeat.
A teacher outage is logged once when it starts and once when it ends, not once per failed call
(Redis outages likewise, by `pipeline.queue.connection.RedisRetry`).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from pipeline.queue.runstate import Counts
from pipeline.queue.schema import HB, Stat
from pipeline.score.metrics import WorkerMetrics
from pipeline.score.options import WorkerReport

log = logging.getLogger("gkd.worker")


class Telemetry:
    """Stats, metrics and teacher outage state of one worker named `name`."""

    def __init__(self, name: str, metrics: WorkerMetrics, report: WorkerReport) -> None:
        self.name = name
        self.metrics = metrics
        self.report = report
        self.stats = Counts()
        self._teacher_down_since: float | None = None
        # Recent request latencies (ms) for the heartbeat's p50/p95, which `gkd status` shows.
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=512)

    # ---------------------------------------------------------------------------------- teacher events

    def on_event(self, name: str, fields: dict[str, Any]) -> None:
        """TeacherClient hook: request latency, retries and errors into stats and metrics."""
        endpoint = str(fields.get("endpoint") or "?")
        if name == "request":
            latency_s = float(fields.get("latency_s", 0.0))
            self.stats.add(Stat.TEACHER_REQUESTS)
            self.stats.add(Stat.TEACHER_LATENCY_MS_SUM, int(latency_s * 1000))
            self.metrics.latency.labels(endpoint=endpoint).observe(latency_s)
            self._latencies_ms.append(latency_s * 1000)
        elif name == "retry":
            self.stats.add(Stat.TEACHER_RETRIES)
            self.metrics.retries.labels(endpoint=endpoint).inc()
        elif name == "error":
            err = fields.get("error")
            label = type(err).__name__ if isinstance(err, BaseException) else str(err or "error")
            self.stats.add(Stat.TEACHER_ERRORS)
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

    # ---------------------------------------------------------------------------------- heartbeat

    def heartbeat_fields(self, teacher: str) -> dict[str, object]:
        """This worker's extra heartbeat fields: progress, teacher, latency percentiles."""
        fields: dict[str, object] = {
            HB.POSITIONS: self.report.positions,
            HB.SCORED: self.report.scored,
            HB.TEACHER: teacher,
        }
        if self._latencies_ms:
            ordered = sorted(self._latencies_ms)
            fields[HB.LATENCY_P50_MS] = round(ordered[len(ordered) // 2], 1)
            fields[HB.LATENCY_P95_MS] = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 1)
        return fields
