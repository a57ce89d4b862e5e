"""The lease layer: a consumer's hold on stream entries, from the read to the acknowledgement.

A consumer owns an entry from the moment XREADGROUP (or XAUTOCLAIM) gives it until it acknowledges it,
dead-letters it, publishes its result or hands it back. Each of those is one Lua script
(`pipeline.queue.scripts`) that first checks that this consumer still owns the entry, so a consumer
whose lease was taken over never creates a duplicate. An entry idle longer than the lease may be
reclaimed by any consumer of the group; `Held` keeps the entries a live consumer works on renewed.

Used by the teacher workers (rollouts), the trainers (ready) and the export/replay tools. Typical use::

    consumer = StreamConsumer(r, keys.rollouts, "w1", lease_ms=60_000)
    held = Held(consumer)                      # run held.renew_forever() as a task
    entries = await consumer.read(32, block_ms=250)
    held.add(entries)
    ...                                        # work on them
    flags = await consumer.ack(entries)        # False where the lease was lost meanwhile
    held.drop(entries)

Failures: every method raises RedisUnavailable (retry, e.g. with `RedisRetry`) or StreamGroupMissing
(Redis lost the group: `pipeline.queue.streams.ensure_groups`, then read again; nothing read before is
owned any more).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import redis.asyncio as aioredis

from pipeline.errors import RedisUnavailable, StreamGroupMissing
from pipeline.queue import schema as K
from pipeline.queue import scripts
from pipeline.queue.durable import Replicas
from pipeline.queue.schema import Stat, Stream

log = logging.getLogger("gkd.lease")

#: Entries per Lua call of the bulk operations (renew, ack): bounds how long one call blocks Redis.
CHUNK = 1000


@dataclass
class Entry:
    """One stream entry owned by a consumer."""

    sid: bytes
    """The Redis stream entry id."""
    id: str
    """The record id (field `id`)."""
    data: bytes
    """The msgpack payload (field `data`); empty once dropped with `hollow()`."""
    deliveries: int = 1
    """How many times the group has delivered this entry (1 on the first read)."""
    size: int = -1
    """Payload bytes, counted out of the stream's byte level when the entry leaves (-1: len(data))."""
    part: int = 0
    """The run partition whose stream holds the entry (`pipeline.queue.partitions`)."""

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.data)

    @property
    def ref(self) -> bytes:
        """The entry's id within its run: the stream id, prefixed ``<p>/`` for partitions p > 0 (two
        partitions' streams may give the same id)."""
        return self.sid if not self.part else b"%d/%s" % (self.part, self.sid)

    def hollow(self) -> Entry:
        """This entry without its payload (same sid, id, deliveries and size): cheap to keep."""
        return replace(self, data=b"")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(sid: bytes, fields: Any, deliveries: int = 1, part: int = 0) -> Entry:
    if isinstance(fields, list):  # RESP2 may give a flat list
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    fid = fields.get(K.FIELD_ID.encode(), b"")
    data = fields.get(K.FIELD_DATA.encode(), b"")
    return Entry(sid=sid, id=_s(fid), data=bytes(data), deliveries=deliveries, part=part)


def _sid_key(sid: bytes) -> tuple[int, int]:
    ms, _, seq = _s(sid).partition("-")
    return int(ms), int(seq or 0)


class StreamConsumer:
    """A named consumer in the group of one of the run's work streams (`keys.rollouts`, `keys.ready`)."""

    def __init__(
        self,
        r: aioredis.Redis,
        stream: Stream,
        consumer: str,
        *,
        lease_ms: int = 60_000,
        max_deliveries: int = 5,
        dead_max_entries: int = K.DEAD_MAX_ENTRIES,
        dead_max_payload_bytes: int = K.DEAD_MAX_PAYLOAD_BYTES,
        replicas: Replicas | None = None,
        wait_reads: bool = False,
    ) -> None:
        if stream.group is None:
            raise ValueError(f"stream: expected rollouts or ready (with a consumer group), got {stream.kind}")
        self.r = r
        self.source = stream
        self.keys = stream.run
        self.part = stream.run.index
        self.stream = stream.key
        self.group: str = stream.group
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.max_deliveries = max_deliveries
        self.dead_max_entries = dead_max_entries
        self.dead_max_payload_bytes = dead_max_payload_bytes
        self.replicas = replicas or Replicas(r)
        """Handoffs, acknowledgements and journal writes (and reads, with `wait_reads`) wait for these."""
        self.wait_reads = wait_reads
        self._cursor = "0-0"
        self._handoff = r.register_script(scripts.HANDOFF)
        self._ack = r.register_script(scripts.ACK)
        self._dead = r.register_script(scripts.DEAD)
        self._renew = r.register_script(scripts.RENEW)
        self._release = r.register_script(scripts.RELEASE)
        self._journal = r.register_script(scripts.JOURNAL)

    # ------------------------------------------------------------------------------------ reading

    async def read(self, count: int, block_ms: int | None = 1000) -> list[Entry]:
        """Up to `count` new entries, waiting at most `block_ms` for the first one (None: no wait)."""
        res: Any = await self._read(lambda c: c.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                             count=count, block=block_ms))  # fmt: skip
        return [_entry(sid, f, part=self.part) for _, msgs in res or [] for sid, f in msgs if f is not None]

    async def read_own_pending(self, count: int, after: bytes = b"0") -> tuple[list[Entry], bytes | None]:
        """Entries delivered earlier to this consumer name and not acknowledged (e.g. before a restart),
        after stream id `after`, in stream order, with their delivery counts.

        Returns (entries, cursor): pass the cursor as `after` for the next page; None when none is left.
        Entries deleted from the stream meanwhile are skipped.
        """
        res: Any = await self._read(lambda c: c.xreadgroup(self.group, self.consumer, {self.stream: after},
                                                             count=count))  # fmt: skip
        msgs = [m for _, page in res or [] for m in page]
        if not msgs:
            return [], None
        entries = await self._with_deliveries([_entry(sid, f, part=self.part) for sid, f in msgs if f])
        return entries, msgs[-1][0]

    async def reclaim(self, count: int) -> tuple[list[Entry], list[Entry]]:
        """Take over up to `count` entries idle longer than the lease (their consumer died or stalled).

        Returns (entries to process, entries over `max_deliveries`). The caller dead-letters the
        second list (`dead_letter`), which it now owns.
        """
        res = await self._read(lambda c: c.xautoclaim(self.stream, self.group, self.consumer, self.lease_ms,
                                                        start_id=self._cursor, count=count))  # fmt: skip
        nxt, msgs = res[0], res[1]
        self._cursor = _s(nxt)
        entries = await self._with_deliveries([_entry(sid, f, part=self.part) for sid, f in msgs if f])
        ok = [e for e in entries if e.deliveries <= self.max_deliveries]
        over = [e for e in entries if e.deliveries > self.max_deliveries]
        return ok, over

    async def _read(self, command: Any) -> Any:
        """`command(client)`: a read that records deliveries; with `wait_reads`, those reach the replicas
        before the entries are used (a failover then cannot hand them out again)."""
        if not self.wait_reads or self.replicas.n <= 0:
            return await command(self.r)
        (res,) = await self.replicas.call(self.stream, command)
        return res

    async def _with_deliveries(self, entries: list[Entry]) -> list[Entry]:
        if not entries:
            return entries
        sids = sorted((e.sid for e in entries), key=_sid_key)
        pend = await self.r.xpending_range(
            self.stream,
            self.group,
            min=sids[0],
            max=sids[-1],
            count=len(entries) * 4 + 16,
            consumername=self.consumer,
        )
        counts = {p["message_id"]: int(p["times_delivered"]) for p in pend}
        for e in entries:
            e.deliveries = counts.get(e.sid, e.deliveries)
        return entries

    # ------------------------------------------------------------------------------------ settling

    async def handoff(self, dest: Stream, items: Sequence[tuple[Entry, bytes, int]]) -> list[bool]:
        """Atomically publish results to `dest` and ack+delete their source entries.

        `items` are (source entry, result payload, scored positions). An item whose entry this
        consumer no longer owns is neither published nor acknowledged: its flag is False.
        """
        if not items:
            return []
        args: list[Any] = [
            self.group,
            self.consumer,
            self.source.bytes_out,
            dest.bytes_in,
            Stat.SCORED,
            Stat.SCORED_POSITIONS,
        ]
        for entry, payload, positions in items:
            args += [entry.sid, entry.id, payload, entry.size, positions]
        res = await self.replicas.script(self._handoff, [self.stream, dest.key, self.keys.stats], args)
        return [bool(x) for x in res]

    async def ack(self, entries: Sequence[Entry]) -> list[bool]:
        """Acknowledge and delete entries this consumer still owns; False for ones it lost."""
        flags: list[bool] = []
        for i in range(0, len(entries), CHUNK):
            args: list[Any] = [self.group, self.consumer, self.source.bytes_out]
            for e in entries[i : i + CHUNK]:
                args += [e.sid, e.size]
            res = await self.replicas.script(self._ack, [self.stream, self.keys.stats], args)
            flags += [bool(x) for x in res]
        return flags

    async def renew(self, entries: Sequence[Entry]) -> list[bool]:
        """Reset the idle time of owned entries so the lease does not lapse during long work."""
        flags: list[bool] = []
        for i in range(0, len(entries), CHUNK):
            sids = [e.sid for e in entries[i : i + CHUNK]]
            flags += [
                bool(x)
                for x in await self._renew(keys=[self.stream], args=[self.group, self.consumer, *sids])
            ]
        return flags

    async def release(self, entries: Sequence[Entry]) -> list[bool]:
        """Hand owned entries back (graceful shutdown): any consumer may reclaim them at once.

        The hand-back does not count as a delivery: the next reclaim brings the count to what it
        would have been had this consumer never read them again.
        """
        if not entries:
            return []
        args: list[Any] = [self.group, self.consumer, self.lease_ms + 1]
        for e in entries:
            args += [e.sid, max(e.deliveries - 1, 0)]
        res = await self._release(keys=[self.stream], args=args)
        return [bool(x) for x in res]

    async def journal(self, entries: Sequence[Entry], step: int) -> list[bool]:
        """Trained samples leave the stream (acknowledged, deleted) and enter the run's journal with the
        step that trained them, in one change per chunk. `entry.data` is the compact rollout to journal,
        `entry.size` the stream payload's size. False for entries this consumer no longer owns."""
        flags: list[bool] = []
        journal = self.keys.journal
        for i in range(0, len(entries), CHUNK):
            args: list[Any] = [self.group, self.consumer, step, self.source.bytes_out, journal.bytes_in]
            for e in entries[i : i + CHUNK]:
                args += [e.sid, e.id, e.data, e.size]
            res = await self.replicas.script(self._journal, [self.stream, journal.key, self.keys.stats], args)
            flags += [bool(x) for x in res]
        return flags

    async def dead_letter(self, entry: Entry, stage: str, reason: str) -> bool:
        """Move an owned entry to `dead` with its stage, reason, deliveries and payload (cut to the dead
        stream's payload limit; the stream is trimmed to its entry limit, both counted in `stats`)."""
        res = await self._dead(
            keys=[self.stream, self.keys.dead.key, self.keys.stats],
            args=[
                self.group,
                self.consumer,
                entry.sid,
                entry.id,
                stage,
                reason[:2000],
                entry.deliveries,
                entry.data,
                self.source.bytes_out,
                Stat.DEAD,
                self.source.dead_counter,
                self.dead_max_entries,
                self.dead_max_payload_bytes,
                Stat.DEAD_TRIMMED,
                Stat.DEAD_CUT,
            ],
        )
        return bool(res)


class Lessee(Protocol):
    """What `Held` needs of a consumer: a `StreamConsumer`, or a `partitions.Partitioned` of several."""

    consumer: str
    lease_ms: int

    async def renew(self, entries: Sequence[Entry]) -> list[bool]: ...


class Held:
    """The entries a consumer owns and works on, renewed every third of the lease until dropped.

    Thread-safe: the trainer adds entries on its IO loop and drops them from its training thread.
    Entries whose renewal was refused (taken over by another consumer) are collected in `lost` (by
    `Entry.ref`, as is membership: ``entry.ref in held``).
    """

    def __init__(self, consumer: Lessee) -> None:
        self.consumer = consumer
        self.lost: set[bytes] = set()
        self._by_sid: dict[bytes, Entry] = {}
        self._lock = threading.Lock()

    def add(self, entries: Iterable[Entry]) -> None:
        with self._lock:
            for e in entries:
                self._by_sid[e.ref] = e

    def drop(self, entries: Iterable[Entry]) -> None:
        with self._lock:
            for e in entries:
                self._by_sid.pop(e.ref, None)
                self.lost.discard(e.ref)

    def __contains__(self, ref: bytes) -> bool:
        return ref in self._by_sid

    def __len__(self) -> int:
        return len(self._by_sid)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._by_sid.values())

    async def renew(self) -> list[Entry]:
        """Renew every held entry once; returns (and records in `lost`) those no longer owned."""
        entries = self.entries()
        flags = await self.consumer.renew(entries)
        lost = [e for e, ok in zip(entries, flags, strict=True) if not ok and e.ref in self._by_sid]
        if lost:
            self.lost.update(e.ref for e in lost)
            log.warning(
                "%s: lease lost on %d held entries (taken over by another consumer): %s",
                self.consumer.consumer,
                len(lost),
                [e.id for e in lost[:5]],
            )
        return lost

    async def renew_forever(self) -> None:
        """`renew()` every third of the lease until cancelled; failed rounds wait for the next."""
        while True:
            await asyncio.sleep(max(self.consumer.lease_ms / 3000, 0.05))
            try:
                await self.renew()
            except (RedisUnavailable, StreamGroupMissing) as exc:
                log.debug("%s: lease renewal failed (%s); next period", self.consumer.consumer, exc)
