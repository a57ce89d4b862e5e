"""`gkd replay --serve-rollouts`: score rollouts of the run from a scored dataset, without a teacher.

A consumer of the `rollouts` stream in the `teachers` group (named ``<name>-cache``). A rollout whose
exact token ids, teacher and k the dataset holds (its content hash) gets the stored rows from its
prompt_len on, keeps its own id, version, source and meta, and is handed off to `ready` in the same
atomic call as the workers use (published, acknowledged and deleted only while owned). A rollout the
dataset does not hold is released at once, not counted as a delivery, for teacher workers to take
(without teacher workers it waits in the stream). This serves, for instance, the rollouts a resumed
trainer puts back into `rollouts` for samples it had trained after its last checkpoint: in a replayed
run no teacher may be running, and these rollouts are exactly the dataset's sequences.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from pipeline.dataset.index import ScoredCache, ScoredIndex
from pipeline.errors import RedisUnavailable
from pipeline.queue.backpressure import Backpressure
from pipeline.queue.connection import RedisRetry
from pipeline.queue.lease import Entry, StreamConsumer
from pipeline.queue.runstate import Counts
from pipeline.queue.schema import RunKeys, Stat
from pipeline.wire.codec import decode_rollout, encode_scored

if TYPE_CHECKING:
    from pipeline.dataset.replayer import ReplaySettings, ReplaySummary

log = logging.getLogger("gkd.replay")


class RolloutServer:
    """Scores rollouts from the dataset of `s.dataset` until `stop` (or `s.idle_exit_s` without any)."""

    def __init__(
        self,
        r: aioredis.Redis,
        keys: RunKeys,
        s: ReplaySettings,
        bp: Backpressure,
        summary: ReplaySummary,
        counts: Counts,
    ) -> None:
        self.r, self.keys, self.s, self.bp, self.summary, self.counts = r, keys, s, bp, summary, counts
        self.retry = RedisRetry(f"replay {s.name} (rollouts)")
        self.consumer = StreamConsumer(r, keys.rollouts, f"{s.name}-cache", lease_ms=s.flow.lease_ms)
        self.cache = ScoredCache(ScoredIndex(s.dataset))
        log.info("serving rollouts from %d scored samples", len(self.cache.index))

    async def run(self, stop: asyncio.Event) -> None:
        # Entries an earlier process of this name left pending: look at them again first.
        after: bytes | None = b"0"
        while after is not None:
            cursor = after
            read = functools.partial(self.consumer.read_own_pending, 256, cursor)
            mine, after = await self.retry.call("read pending", read, stop=stop)
            await self._serve(mine)
        last = time.monotonic()
        while not stop.is_set():
            try:
                await self.bp.wait_for_room(stop)
                got = await self.consumer.read(64, block_ms=250)
                self.retry.recovered()
            except RedisUnavailable as exc:
                await self.retry.backoff("read rollouts", exc, 0.5, stop)
                continue
            if got:
                last = time.monotonic()
                await self._serve(got)
            elif self.s.idle_exit_s > 0 and time.monotonic() - last >= self.s.idle_exit_s:
                log.info("no rollouts for %.1fs: done serving", self.s.idle_exit_s)
                return

    async def _serve(self, entries: list[Entry]) -> None:
        hits: list[tuple[Entry, bytes, int]] = []
        misses: list[Entry] = []
        for e in entries:
            try:
                rollout = decode_rollout(e.data)
            except Exception:  # not ours to judge: a teacher worker dead-letters it with its reason
                misses.append(e)
                continue
            sample = self.cache.score(rollout)
            if sample is None:
                misses.append(e)
            else:
                hits.append((e, encode_scored(sample), int(sample.topk_ids.shape[0])))
        if hits:
            flags = await self.retry.call("handoff", lambda: self.consumer.handoff(self.keys.ready, hits))
            self.summary.served += sum(flags)
            self.counts.add(Stat.CACHE_SCORED, sum(flags))
        if misses:
            await self.retry.call("release", lambda: self.consumer.release(misses))
            self.summary.handed_back += len(misses)
            log.info("%d rollouts are not in the dataset: left for teacher workers", len(misses))
