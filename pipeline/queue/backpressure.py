"""Backpressure: producers pause above a high-water mark of the stream they feed, resume below low.

The level of a stream is (entries, bytes): entries is XLEN (acknowledged entries are deleted, so this is
waiting + in-flight work) and bytes is ``<stream>_bytes_in - <stream>_bytes_out`` from the `stats`
hash, both maintained atomically with the stream itself. Each producer may overshoot the high mark by
at most one batch, so Redis memory stays bounded by high + producers x batch, however slow the consumer.

In a run of P > 1 partitions the marks bound the sum over the partitions' streams (`wait_for_room`),
and each partition has a share of them (marks / P): a producer writes to the least filled partition
(`least_filled`), a worker does not read rollouts whose partition's ready stream is at its share
(`full`), so no partition runs far ahead of the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from pipeline.notice import WaitNotice
from pipeline.queue.schema import RunKeys, Stream

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
    """Waits for room in one work stream of a run (`keys.rollouts` or `keys.ready`), summed over the
    partitions in `parts` (the run's partition keys; default: the stream's own)."""

    def __init__(
        self,
        r: aioredis.Redis,
        stream: Stream,
        marks: WaterMarks,
        *,
        parts: list[RunKeys] | None = None,
        poll_s: float = 0.05,
        max_poll_s: float = 0.5,
    ) -> None:
        self.r = r
        self.stream = stream
        self.streams = [stream.of(p) for p in parts] if parts else [stream]
        self.marks = marks
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.paused = False
        self._notice = WaitNotice(log)
        self._turn = 0

    async def levels(self) -> list[tuple[int, int]]:
        """(entries, payload bytes) waiting or in flight in each partition's stream."""
        async with self.r.pipeline(transaction=False) as pipe:
            for st in self.streams:
                pipe.xlen(st.key)
                pipe.hmget(st.run.stats, [st.bytes_in, st.bytes_out])
            res = await pipe.execute()
        pairs = zip(res[::2], res[1::2], strict=True)
        return [(int(n), int(b_in or 0) - int(b_out or 0)) for n, (b_in, b_out) in pairs]

    async def level(self) -> tuple[int, int]:
        """(entries, payload bytes) waiting or in flight in the stream (all partitions)."""
        levels = await self.levels()
        return sum(n for n, _ in levels), sum(b for _, b in levels)

    async def least_filled(self) -> int:
        """The partition whose stream holds the fewest entries (then bytes); ties go round robin."""
        n_parts = len(self.streams)
        if n_parts == 1:
            return 0
        levels = await self.levels()
        start, self._turn = self._turn, (self._turn + 1) % n_parts
        return min(range(n_parts), key=lambda p: (*levels[p], (p - start) % n_parts))

    async def full(self) -> set[int]:
        """The partitions whose stream is at its share of the high-water mark (none with one partition:
        `wait_for_room` covers it)."""
        n_parts = len(self.streams)
        if n_parts == 1:
            return set()
        m = self.marks
        high_n, high_b = -(-m.high_entries // n_parts), -(-m.high_bytes // n_parts)
        return {p for p, (n, b) in enumerate(await self.levels()) if n >= high_n or b >= high_b}

    def _above_high(self, n: int, b: int) -> bool:
        return n >= self.marks.high_entries or b >= self.marks.high_bytes

    def _below_low(self, n: int, b: int) -> bool:
        return n <= self.marks.low_entries and b <= self.marks.low_bytes

    def _paused_text(self, n: int, b: int) -> str:
        m, run = self.marks, self.stream.run.run
        n_parts = len(self.streams)
        where = self.stream.key if n_parts == 1 else f"{self.stream.kind} of {n_parts} partitions"
        return (
            f"paused: {where} holds {n} entries ({b / 2**20:.1f} MB), at its high-water mark "
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
