"""`Partitioned`: one consumer name in one work stream of every partition of a run.

A run of P partitions (`RunKeys.parts`) has P rollouts streams, P ready streams, ... each under its own
hash tag, so a Redis Cluster spreads them over its masters. A worker or a trainer reads all of them:
`Partitioned` holds one `StreamConsumer` per partition and offers the same methods, sending every
command to the partition of its entries (`Entry.part`): one read per partition (a partition lives in
one slot), one script per partition and call, so every script still touches one slot only. With one
partition it is a thin layer over one `StreamConsumer`.

Reads are fair: each read starts at the partition after the one the previous read started at, and
takes from each partition at most an even share of what is left to read, without waiting; it waits
(`block_ms`) only when none had anything. A partition whose master cannot answer (a failover) does not
hold up the others: a read raises only when no partition gave anything. Entries whose read reply was
lost stay pending for this consumer and are reclaimed after the lease.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis

from pipeline.errors import RedisUnavailable
from pipeline.queue.lease import Entry, StreamConsumer
from pipeline.queue.schema import RunKeys, Stream

T = TypeVar("T")
Flags = Coroutine[Any, Any, list[bool]]


class Partitioned:
    """A consumer of one work stream (`keys.rollouts` or `keys.ready`) in every partition of a run."""

    def __init__(
        self, r: aioredis.Redis, stream: Stream, parts: Sequence[RunKeys], consumer: str, **options: Any
    ) -> None:
        self.parts = list(parts)
        self.of = [StreamConsumer(r, stream.of(p), consumer, **options) for p in self.parts]
        first = self.of[0]
        self.consumer = consumer
        self.lease_ms = first.lease_ms
        self.max_deliveries = first.max_deliveries
        self._start = 0

    @property
    def single(self) -> bool:
        return len(self.of) == 1

    def _rotation(self) -> list[StreamConsumer]:
        """The partitions in this round's order (the first moves on by one each round)."""
        n = len(self.of)
        start, self._start = self._start, (self._start + 1) % n
        return [self.of[(start + i) % n] for i in range(n)]

    # ------------------------------------------------------------------------------------ reading

    async def read(self, count: int, block_ms: int = 1000, skip: Collection[int] = ()) -> list[Entry]:
        """Up to `count` new entries from the partitions (but those in `skip`), fairly: what each has at
        once, in rotating order; when none has any, wait up to `block_ms` on up to `count` of them."""
        if self.single:
            return [] if 0 in skip else await self.of[0].read(count, block_ms)
        order = [c for c in self._rotation() if c.part not in skip]
        out: list[Entry] = []
        down: list[RedisUnavailable] = []
        for i, c in enumerate(order):  # each takes at most an even share of what is left
            share = -(-(count - len(out)) // (len(order) - i))
            try:
                out += await c.read(share, block_ms=None) if share > 0 else []
            except RedisUnavailable as exc:  # its master is failing over: the others go on
                down.append(exc)
        if out:
            return out
        if down:
            raise down[0]
        if not order:  # every partition is skipped (its ready stream full): wait a little, not spin
            await asyncio.sleep(min(block_ms or 0, 100) / 1000)
            return out
        waiting = order[: max(min(count, len(order)), 1)]
        shares = [count // len(waiting) + (i < count % len(waiting)) for i in range(len(waiting))]
        reads = [c.read(max(n, 1), block_ms) for c, n in zip(waiting, shares, strict=True)]
        got = await asyncio.gather(*reads, return_exceptions=True)
        fails = [g for g in got if isinstance(g, BaseException)]
        entries = [e for page in got if not isinstance(page, BaseException) for e in page]
        if fails and not entries:
            raise fails[0]
        return entries

    async def read_own_pending(self, count: int, after: bytes = b"0") -> tuple[list[Entry], bytes | None]:
        """Entries delivered earlier to this consumer name and not acknowledged, partition by partition.
        `after` is the cursor of the previous page (b"0" to begin); None when none is left."""
        if self.single:
            return await self.of[0].read_own_pending(count, after)
        part, _, sid = after.partition(b"/") if b"/" in after else (b"0", b"", after)
        p = int(part)
        while p < len(self.of):
            entries, cursor = await self.of[p].read_own_pending(count, after=sid or b"0")
            if cursor is not None:
                return entries, b"%d/%s" % (p, cursor)
            p, sid = p + 1, b"0"
        return [], None

    async def reclaim(self, count: int) -> tuple[list[Entry], list[Entry]]:
        """Entries idle past the lease in the partitions (rotating order), up to `count` in all."""
        ok: list[Entry] = []
        over: list[Entry] = []
        for c in self._rotation() if not self.single else self.of:
            if len(ok) + len(over) >= count:
                break
            got, dead = await c.reclaim(count - len(ok) - len(over))
            ok += got
            over += dead
        return ok, over

    # ------------------------------------------------------------------------------------ settling

    async def _each(
        self, entries: Sequence[T], part: Callable[[T], int], call: Callable[[int, list[T]], Flags]
    ) -> list[bool]:
        """`call(p, items)` for the items of each partition p; the flags back in the items' order."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(entries):
            groups[part(item)].append(i)
        flags = [False] * len(entries)
        for p, idx in groups.items():
            for i, ok in zip(idx, await call(p, [entries[i] for i in idx]), strict=True):
                flags[i] = ok
        return flags

    async def handoff(self, dest: Stream, items: Sequence[tuple[Entry, bytes, int]]) -> list[bool]:
        """`StreamConsumer.handoff` per partition: results go to `dest` of their entry's partition."""
        return await self._each(
            items, lambda it: it[0].part, lambda p, its: self.of[p].handoff(dest.of(self.parts[p]), its)
        )

    async def ack(self, entries: Sequence[Entry]) -> list[bool]:
        return await self._each(entries, _part, lambda p, es: self.of[p].ack(es))

    async def renew(self, entries: Sequence[Entry]) -> list[bool]:
        return await self._each(entries, _part, lambda p, es: self.of[p].renew(es))

    async def release(self, entries: Sequence[Entry]) -> list[bool]:
        return await self._each(entries, _part, lambda p, es: self.of[p].release(es))

    async def journal(self, entries: Sequence[Entry], step: int) -> list[bool]:
        """`StreamConsumer.journal` per partition: each partition's trained samples enter its journal."""
        return await self._each(entries, _part, lambda p, es: self.of[p].journal(es, step))

    async def dead_letter(self, entry: Entry, stage: str, reason: str) -> bool:
        return await self.of[entry.part].dead_letter(entry, stage, reason)


def _part(e: Entry) -> int:
    return e.part
