"""The streams core: consumer groups, batched reads, lease reclaim, dead-lettering, the atomic handoff.

A consumer owns an entry from the moment XREADGROUP (or XAUTOCLAIM) gives it until it acknowledges it.
Every state change that depends on ownership runs as one Lua script that first checks, with XPENDING,
that this consumer still owns the entry: a consumer whose lease was taken over can neither publish,
acknowledge, renew nor dead-letter it, so a slow consumer never creates a duplicate.
Acknowledged entries are deleted in the same script, so streams hold only waiting or in-flight work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from pipeline.queue import schema as K
from pipeline.queue.schema import RunKeys, Stat

# Shared Lua prologue: is entry ARGV-sid pending for this consumer?
_OWNED = """
local function owned(stream, group, consumer, sid)
  local p = redis.call('XPENDING', stream, group, sid, sid, 1, consumer)
  return #p == 1
end
"""

# KEYS: src, dst, stats. ARGV: group, consumer, bytes_out_field, bytes_in_field, then per-entry
# counter names (one per extra counter), n_counters, then 5-tuples (sid, rid, payload, src_bytes, ...).
_HANDOFF = (
    _OWNED
    + f"""
local group, consumer, f_out, f_in, f_moved, f_pos = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local res, moved, b_in, b_out, pos = {{}}, 0, 0, 0, 0
local i = 7
while i <= #ARGV do
  local sid, rid, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if owned(KEYS[1], group, consumer, sid) then
    redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', rid, '{K.FIELD_DATA}', payload)
    redis.call('XACK', KEYS[1], group, sid)
    redis.call('XDEL', KEYS[1], sid)
    moved = moved + 1
    b_in = b_in + #payload
    b_out = b_out + tonumber(ARGV[i + 3])
    pos = pos + tonumber(ARGV[i + 4])
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
  i = i + 5
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[3], f_moved, moved)
  redis.call('HINCRBY', KEYS[3], f_pos, pos)
  redis.call('HINCRBY', KEYS[3], f_in, b_in)
  redis.call('HINCRBY', KEYS[3], f_out, b_out)
end
return res
"""
)

# KEYS: src, stats. ARGV: group, consumer, bytes_out_field, then pairs (sid, src_bytes).
_ACK = (
    _OWNED
    + """
local group, consumer, f_out = ARGV[1], ARGV[2], ARGV[3]
local res, b_out = {}, 0
for i = 4, #ARGV, 2 do
  local sid = ARGV[i]
  if owned(KEYS[1], group, consumer, sid) then
    redis.call('XACK', KEYS[1], group, sid)
    redis.call('XDEL', KEYS[1], sid)
    b_out = b_out + tonumber(ARGV[i + 1])
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
if b_out > 0 then redis.call('HINCRBY', KEYS[2], f_out, b_out) end
return res
"""
)

# KEYS: src, dead, stats. ARGV: group, consumer, sid, rid, stage, reason, deliveries, payload,
# bytes_out_field, dead_field, dead_stage_field.
_DEAD = (
    _OWNED
    + f"""
local group, consumer, sid = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, consumer, sid) then return 0 end
redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', ARGV[4], '{K.FIELD_STAGE}', ARGV[5],
  '{K.FIELD_REASON}', ARGV[6], '{K.FIELD_DELIVERIES}', ARGV[7], '{K.FIELD_DATA}', ARGV[8])
redis.call('XACK', KEYS[1], group, sid)
redis.call('XDEL', KEYS[1], sid)
redis.call('HINCRBY', KEYS[3], ARGV[9], #ARGV[8])
redis.call('HINCRBY', KEYS[3], ARGV[10], 1)
redis.call('HINCRBY', KEYS[3], ARGV[11], 1)
return 1
"""
)

# KEYS: src. ARGV: group, consumer, sids... Resets the idle time of entries this consumer still owns.
_RENEW = (
    _OWNED
    + """
local group, consumer = ARGV[1], ARGV[2]
local res = {}
for i = 3, #ARGV do
  if owned(KEYS[1], group, consumer, ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i], 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
"""
)

# KEYS: src. ARGV: group, consumer, idle_ms, then pairs (sid, retrycount). Makes owned entries
# reclaimable at once by any consumer, without counting this hand-back as a delivery.
_RELEASE = (
    _OWNED
    + """
local group, consumer, idle = ARGV[1], ARGV[2], ARGV[3]
local res = {}
for i = 4, #ARGV, 2 do
  if owned(KEYS[1], group, consumer, ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i],
      'IDLE', idle, 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
"""
)


@dataclass
class Entry:
    """One stream entry owned by a consumer."""

    sid: bytes
    """The Redis stream entry id."""
    id: str
    """The record id (field `id`)."""
    data: bytes
    """The msgpack payload (field `data`)."""
    deliveries: int = 1
    """How many times the group has delivered this entry (1 on the first read)."""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(sid: bytes, fields: Any, deliveries: int = 1) -> Entry:
    if isinstance(fields, list):  # RESP2 may give a flat list
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    fid = fields.get(K.FIELD_ID.encode(), b"")
    data = fields.get(K.FIELD_DATA.encode(), b"")
    return Entry(sid=sid, id=_s(fid), data=bytes(data), deliveries=deliveries)


async def ensure_group(r: aioredis.Redis, stream: str, group: str) -> None:
    """Create `group` on `stream` (and the stream) if missing; a no-op when it exists."""
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_groups(r: aioredis.Redis, keys: RunKeys) -> None:
    """Create both consumer groups of a run."""
    await ensure_group(r, keys.rollouts, K.TEACHERS_GROUP)
    await ensure_group(r, keys.ready, K.TRAINERS_GROUP)


async def add_rollouts(r: aioredis.Redis, keys: RunKeys, items: Sequence[tuple[str, bytes]]) -> list[bytes]:
    """XADD (rollout id, payload) pairs to the rollouts stream in one MULTI transaction.

    Counts them in `stats` (produced, bytes in). Returns the stream entry ids. Callers wait for
    room first (`Backpressure.wait_for_room`).
    """
    async with r.pipeline(transaction=True) as pipe:
        for rid, payload in items:
            pipe.xadd(keys.rollouts, {K.FIELD_ID: rid, K.FIELD_DATA: payload})
        pipe.hincrby(keys.stats, Stat.ROLLOUTS_PRODUCED, len(items))
        pipe.hincrby(keys.stats, Stat.bytes_in("rollouts"), sum(len(p) for _, p in items))
        res = await pipe.execute()
    return [sid for sid in res[: len(items)]]


class StreamConsumer:
    """A named consumer in a group of one of the run's streams ("rollouts" or "ready")."""

    def __init__(
        self,
        r: aioredis.Redis,
        keys: RunKeys,
        stream_kind: str,
        consumer: str,
        *,
        lease_ms: int = 60_000,
        max_deliveries: int = 5,
    ) -> None:
        if stream_kind not in ("rollouts", "ready"):
            raise ValueError(f"stream_kind: expected 'rollouts' or 'ready', got {stream_kind!r}")
        self.r = r
        self.keys = keys
        self.kind = stream_kind
        self.stream: str = getattr(keys, stream_kind)
        self.group = K.TEACHERS_GROUP if stream_kind == "rollouts" else K.TRAINERS_GROUP
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.max_deliveries = max_deliveries
        self._cursor = "0-0"
        self._handoff = r.register_script(_HANDOFF)
        self._ack = r.register_script(_ACK)
        self._dead = r.register_script(_DEAD)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)

    async def ensure_group(self) -> None:
        await ensure_group(self.r, self.stream, self.group)

    async def read(self, count: int, block_ms: int = 1000) -> list[Entry]:
        """Up to `count` new entries, waiting at most `block_ms` for the first one."""
        res = await self.r.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return [_entry(sid, f) for _, msgs in _streams(res) for sid, f in msgs if f is not None]

    async def read_own_pending(self, count: int) -> list[Entry]:
        """Entries already delivered to this consumer name and not acknowledged (after a restart)."""
        res = await self.r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
        entries = [_entry(sid, f) for _, msgs in _streams(res) for sid, f in msgs if f]
        return await self._with_deliveries(entries)

    async def reclaim(self, count: int) -> tuple[list[Entry], list[Entry]]:
        """Take over up to `count` entries idle longer than the lease (their consumer died or stalled).

        Returns (entries to process, entries over `max_deliveries`). The caller dead-letters the
        second list (`dead_letter`), which it now owns.
        """
        res = await self.r.xautoclaim(
            self.stream, self.group, self.consumer, self.lease_ms, start_id=self._cursor, count=count
        )
        nxt, msgs = res[0], res[1]
        self._cursor = _s(nxt)
        entries = [_entry(sid, f) for sid, f in msgs if f]
        entries = await self._with_deliveries(entries)
        ok = [e for e in entries if e.deliveries <= self.max_deliveries]
        over = [e for e in entries if e.deliveries > self.max_deliveries]
        return ok, over

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

    async def handoff(self, dest: str, items: Sequence[tuple[Entry, bytes, int]]) -> list[bool]:
        """Atomically publish results to `dest` and ack+delete their source entries.

        `items` are (source entry, result payload, scored positions). An item whose entry this
        consumer no longer owns is neither published nor acknowledged: its flag is False.
        """
        if not items:
            return []
        args: list[Any] = [
            self.group,
            self.consumer,
            Stat.bytes_out(self.kind),
            Stat.bytes_in("ready"),
            Stat.SCORED,
            Stat.SCORED_POSITIONS,
        ]
        for entry, payload, positions in items:
            args += [entry.sid, entry.id, payload, len(entry.data), positions]
        res = await self._handoff(keys=[self.stream, dest, self.keys.stats], args=args)
        return [bool(x) for x in res]

    async def ack(self, entries: Sequence[Entry]) -> list[bool]:
        """Acknowledge and delete entries this consumer still owns; False for ones it lost."""
        if not entries:
            return []
        args: list[Any] = [self.group, self.consumer, Stat.bytes_out(self.kind)]
        for e in entries:
            args += [e.sid, len(e.data)]
        res = await self._ack(keys=[self.stream, self.keys.stats], args=args)
        return [bool(x) for x in res]

    async def renew(self, entries: Sequence[Entry]) -> list[bool]:
        """Reset the idle time of owned entries so the lease does not lapse during long work."""
        if not entries:
            return []
        res = await self._renew(
            keys=[self.stream], args=[self.group, self.consumer, *[e.sid for e in entries]]
        )
        return [bool(x) for x in res]

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

    async def dead_letter(self, entry: Entry, stage: str, reason: str) -> bool:
        """Move an owned entry to `dead` with its stage, reason, deliveries and original payload."""
        res = await self._dead(
            keys=[self.stream, self.keys.dead, self.keys.stats],
            args=[
                self.group,
                self.consumer,
                entry.sid,
                entry.id,
                stage,
                reason[:2000],
                entry.deliveries,
                entry.data,
                Stat.bytes_out(self.kind),
                Stat.DEAD,
                Stat.dead_stage(self.kind),
            ],
        )
        return bool(res)


def _streams(res: Any) -> list[tuple[Any, list[Any]]]:
    """XREADGROUP's RESP2 reply as [(stream, [(sid, fields), ...])]."""
    return [(s, msgs) for s, msgs in res or []]


def _sid_key(sid: bytes) -> tuple[int, int]:
    ms, _, seq = _s(sid).partition("-")
    return int(ms), int(seq or 0)
