"""Batched handoff of finished ScoredSamples: one atomic Lua call publishes a whole batch (and how a result
is packed, or its failure worded, for it).

Each result is (source entry, ScoredSample bytes, positions). `StreamConsumer.handoff` publishes it to
`ready`, acknowledges and deletes the rollout in one script, and refuses an entry this consumer no longer
owns. In a partitioned run a batch is one script per partition (rollouts of p -> ready of p, one slot).
Batching cuts the round trips from one per rollout to one per batch; a batch closes after
`max_items`, `max_bytes`, or `linger_s` after its first result, whichever comes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import StreamGroupMissing, WireFormatError
from pipeline.queue.connection import RedisRetry
from pipeline.queue.lease import Entry
from pipeline.queue.partitions import Partitioned
from pipeline.queue.runstate import now_ms
from pipeline.queue.schema import Stream
from pipeline.teacher.config import TeacherScores
from pipeline.wire.codec import Rollout, ScoredSample, encode_scored


def pack_scored(
    rollout: Rollout, scores: TeacherScores, teacher: str, k: int, dtype: np.dtype[Any]
) -> tuple[bytes, int]:
    """The encoded ScoredSample of `teacher`'s (model id) scores, logprobs cast to the wire `dtype` (-inf
    stays -inf), and its R. Raises WireFormatError (or another error of the encoder) when it cannot."""
    logprobs_RK = scores.logprobs_RK
    if logprobs_RK.dtype != dtype:
        logprobs_RK = logprobs_RK.astype(dtype)
    sample = ScoredSample(
        rollout=rollout,
        topk_ids=scores.ids_RK,
        topk_logprobs=logprobs_RK,
        teacher=teacher,
        k=k,
        scored_ms=now_ms(),
        teacher_counts=scores.counts_RK,  # a sampled teacher's draws: written as version 2
    )
    return encode_scored(sample), int(scores.ids_RK.shape[0])


def dead_reason(exc: BaseException) -> str:
    """A dead-letter reason: WireFormatError messages name their field already; others get the class."""
    return str(exc) if isinstance(exc, WireFormatError) else f"{type(exc).__name__}: {exc}"


#: Called once per result after its batch was published: (entry, positions, published?).
OnPublished = Callable[[Entry, int, bool], None]


@dataclass
class _Result:
    entry: Entry
    payload: bytes
    positions: int
    done: asyncio.Future[bool]


class HandoffBatcher:
    """Collects results from many tasks and publishes them in batches; run `run()` as a task."""

    def __init__(
        self,
        consumer: Partitioned,
        dest: Stream,
        retry: RedisRetry,
        on_published: OnPublished,
        *,
        max_items: int = 32,
        max_bytes: int = 16 * 1024 * 1024,
        linger_s: float = 0.002,
    ) -> None:
        self.consumer = consumer
        self.dest = dest
        self.retry = retry
        self.on_published = on_published
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self._queue: asyncio.Queue[_Result] = asyncio.Queue()

    async def submit(self, entry: Entry, payload: bytes, positions: int) -> bool:
        """Queue one result and wait for its batch: True if published, False if the lease was lost."""
        res = _Result(entry, payload, positions, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(res)
        return await res.done

    async def run(self) -> None:
        """Publish batches until cancelled."""
        while True:
            batch = [await self._queue.get()]
            if self.linger_s > 0 and self._queue.qsize() < self.max_items:
                await asyncio.sleep(self.linger_s)
            size = len(batch[0].payload)
            while not self._queue.empty() and len(batch) < self.max_items and size < self.max_bytes:
                res = self._queue.get_nowait()
                batch.append(res)
                size += len(res.payload)
            await self._publish(batch)

    async def _publish(self, batch: list[_Result]) -> None:
        """One script per partition, concurrently: a partition whose master fails over holds back only
        its own results (each is retried on its own, so none is published twice)."""
        parts: dict[int, list[_Result]] = {}
        for res in batch:
            parts.setdefault(res.entry.part, []).append(res)
        await asyncio.gather(*(self._publish_part(group) for group in parts.values()))

    async def _publish_part(self, batch: list[_Result]) -> None:
        items = [(res.entry, res.payload, res.positions) for res in batch]
        # Cancelled mid-call at shutdown, the entries stay owned and get released; a release of an
        # entry the call did publish is refused by the ownership check, so nothing is duplicated.
        try:
            flags = await self.retry.call("handoff", lambda: self.consumer.handoff(self.dest, items))
        except StreamGroupMissing:  # Redis lost its data: nobody owns these entries any more
            flags = [False] * len(items)
        for res, ok in zip(batch, flags, strict=True):
            self.on_published(res.entry, res.positions, ok)
            if not res.done.done():
                res.done.set_result(ok)
