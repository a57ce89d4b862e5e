"""Backpressure: producers pause above a high-water mark of the stream they feed, resume below low.

The level of a stream is (entries, bytes): entries is XLEN (acknowledged entries are deleted, so this is
waiting + in-flight work) and bytes is ``<stream>_bytes_in - <stream>_bytes_out`` from the `stats`
hash, both maintained atomically with the stream itself. Each producer may overshoot the high mark by
at most one batch, so Redis memory stays bounded by high + producers x batch, however slow the consumer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from pipeline.notice import WaitNotice
from pipeline.queue.schema import Stream

log = logging.getLogger("gkd.backpressure")


@dataclass(frozen=True)
class WaterMarks:
    """Hysteresis bounds on a stream's waiting entries and bytes."""

    high_entries: int = 4096
    """Pause when this many entries wait in the stream."""
    low_entries: int = 2048
    """Resume once no more than this many entries wait."""
    high_bytes: int = 512 * 1024 * 1024
    """Pause when this many payload bytes wait in the stream."""
    low_bytes: int = 256 * 1024 * 1024
    """Resume once no more than this many payload bytes wait."""

    def __post_init__(self) -> None:
        if not (0 <= self.low_entries <= self.high_entries and self.high_entries > 0):
            raise ValueError(
                f"water marks: expected 0 <= low_entries <= high_entries, high > 0, "
                f"got low={self.low_entries} high={self.high_entries}"
            )
        if not (0 <= self.low_bytes <= self.high_bytes and self.high_bytes > 0):
            raise ValueError(
                f"water marks: expected 0 <= low_bytes <= high_bytes, high > 0, "
                f"got low={self.low_bytes} high={self.high_bytes}"
            )


class Backpressure:
    """Waits for room in one work stream of a run (`keys.rollouts` or `keys.ready`)."""

    def __init__(
        self,
        r: aioredis.Redis,
        stream: Stream,
        marks: WaterMarks,
        *,
        poll_s: float = 0.05,
        max_poll_s: float = 0.5,
    ) -> None:
        self.r = r
        self.stream = stream
        self.marks = marks
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.paused = False
        self._notice = WaitNotice(log)

    async def level(self) -> tuple[int, int]:
        """(entries, payload bytes) waiting or in flight in the stream."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream.key)
            pipe.hmget(self.stream.run.stats, [self.stream.bytes_in, self.stream.bytes_out])
            n, (b_in, b_out) = await pipe.execute()
        return int(n), int(b_in or 0) - int(b_out or 0)

    def _above_high(self, n: int, b: int) -> bool:
        return n >= self.marks.high_entries or b >= self.marks.high_bytes

    def _below_low(self, n: int, b: int) -> bool:
        return n <= self.marks.low_entries and b <= self.marks.low_bytes

    def _paused_text(self, n: int, b: int) -> str:
        m, run = self.marks, self.stream.run.run
        return (
            f"paused: {self.stream.key} holds {n} entries ({b / 2**20:.1f} MB), at its high-water mark "
            f"({m.high_entries} entries or {m.high_bytes / 2**20:.0f} MB); waiting until its readers bring "
            f"it down to {m.low_entries} entries (gkd status --run {run})"
        )

    async def wait_for_room(self, stop: asyncio.Event | None = None) -> float:
        """Return at once below the high mark; else wait until the level falls to the low mark.

        Returns the seconds waited. Returns early (without room) if `stop` is set.
        """
        n, b = await self.level()
        if not self._above_high(n, b):
            return 0.0
        self.paused = True
        start = time.monotonic()
        delay = self.poll_s
        try:
            while not (stop is not None and stop.is_set()):
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, self.max_poll_s)
                n, b = await self.level()
                if self._below_low(n, b):
                    break
                self._notice.waiting(functools.partial(self._paused_text, n, b))
        finally:
            self.paused = False
            self._notice.over()
        self._notice = WaitNotice(log)
        return time.monotonic() - start
