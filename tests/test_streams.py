"""Stream mechanics against a real Redis: groups, handoff, lease takeover, reclaim, dead letters, acks."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from pipeline.queue import schema as K
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.schema import RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from tests.redis_helpers import read_stats


async def produce(r: aioredis.Redis, keys: RunKeys, n: int, prefix: str = "r") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    await add_rollouts(r, keys, [(rid, f"payload-{rid}".encode()) for rid in ids])
    return ids


async def test_groups_are_created_idempotently(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await ensure_groups(r, keys)
    groups = {g["name"] for g in await r.xinfo_groups(keys.rollouts.key)}
    assert groups == {K.TEACHERS_GROUP.encode()}
    assert {g["name"] for g in await r.xinfo_groups(keys.ready.key)} == {K.TRAINERS_GROUP.encode()}


async def test_read_handoff_moves_and_deletes(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 5)
    c = StreamConsumer(r, keys.rollouts, "w1")
    got = await c.read(count=10, block_ms=100)
    assert [e.id for e in got] == [f"r{i}" for i in range(5)]
    assert got[0].data == b"payload-r0" and got[0].deliveries == 1
    flags = await c.handoff(keys.ready, [(e, b"scored-" + e.id.encode(), 7) for e in got])
    assert flags == [True] * 5
    assert await r.xlen(keys.rollouts.key) == 0  # acknowledged entries are deleted
    assert (await r.xpending(keys.rollouts.key, K.TEACHERS_GROUP))["pending"] == 0
    ready = await r.xrange(keys.ready.key)
    assert [f[b"id"] for _, f in ready] == [f"r{i}".encode() for i in range(5)]
    assert ready[0][1][b"data"] == b"scored-r0"
    stats = await read_stats(r, keys)
    assert stats[Stat.SCORED] == 5 and stats[Stat.SCORED_POSITIONS] == 35
    assert stats[Stat.ROLLOUTS_PRODUCED] == 5
    assert stats[keys.rollouts.bytes_in] == stats[keys.rollouts.bytes_out]
    assert stats[keys.ready.bytes_in] == sum(len(b"scored-r0") for _ in range(5))


async def test_consumer_whose_lease_was_taken_cannot_publish(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 3)
    slow = StreamConsumer(r, keys.rollouts, "slow", lease_ms=50)
    fast = StreamConsumer(r, keys.rollouts, "fast", lease_ms=50)
    mine = await slow.read(count=3, block_ms=100)
    await asyncio.sleep(0.1)
    taken, over = await fast.reclaim(count=10)
    assert [e.id for e in taken] == ["r0", "r1", "r2"] and over == []
    assert all(e.deliveries == 2 for e in taken)
    # the slow consumer finishes late: refused, nothing published, nothing acknowledged
    assert await slow.handoff(keys.ready, [(e, b"late", 1) for e in mine]) == [False] * 3
    assert await slow.ack(mine) == [False] * 3
    assert await slow.renew(mine) == [False] * 3
    assert await slow.dead_letter(mine[0], "teacher", "x") is False
    assert await r.xlen(keys.ready.key) == 0 and await r.xlen(keys.dead.key) == 0
    assert await fast.handoff(keys.ready, [(e, b"ok", 1) for e in taken]) == [True] * 3
    assert await r.xlen(keys.ready.key) == 3  # exactly once
    assert await r.xlen(keys.rollouts.key) == 0


async def test_crashed_consumers_entries_are_reclaimed(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 4)
    crashed = StreamConsumer(r, keys.rollouts, "crashed", lease_ms=100)
    other = StreamConsumer(r, keys.rollouts, "other", lease_ms=100)
    assert len(await crashed.read(count=4, block_ms=100)) == 4
    early, _ = await other.reclaim(count=10)
    assert early == []  # still within the lease
    await asyncio.sleep(0.15)
    got, over = await other.reclaim(count=10)
    assert sorted(e.id for e in got) == ["r0", "r1", "r2", "r3"] and over == []
    assert got[0].data == b"payload-r0"


async def test_renew_keeps_a_lease_alive(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 1)
    a = StreamConsumer(r, keys.rollouts, "a", lease_ms=150)
    b = StreamConsumer(r, keys.rollouts, "b", lease_ms=150)
    mine = await a.read(count=1, block_ms=100)
    for _ in range(4):
        await asyncio.sleep(0.08)
        assert await a.renew(mine) == [True]
    assert (await b.reclaim(count=10))[0] == []
    assert await a.handoff(keys.ready, [(mine[0], b"x", 1)]) == [True]


async def test_entry_over_delivery_limit_goes_to_dead(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 1)
    c = StreamConsumer(r, keys.rollouts, "c", lease_ms=10, max_deliveries=2)
    await c.read(count=1, block_ms=100)  # delivery 1, then "crash"
    await asyncio.sleep(0.03)
    ok, over = await c.reclaim(count=10)  # delivery 2: still allowed
    assert [e.deliveries for e in ok] == [2] and over == []
    await asyncio.sleep(0.03)
    ok, over = await c.reclaim(count=10)
    assert ok == [] and [e.deliveries for e in over] == [3]
    assert await c.dead_letter(over[0], "teacher", "delivered 3 times (max_deliveries=2)") is True
    dead = await r.xrange(keys.dead.key)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"id"] == b"r0" and fields[b"stage"] == b"teacher"
    assert fields[b"reason"].startswith(b"delivered 3 times") and fields[b"deliveries"] == b"3"
    assert fields[b"data"] == b"payload-r0"
    assert await r.xlen(keys.rollouts.key) == 0
    stats = await read_stats(r, keys)
    assert stats[Stat.DEAD] == 1 and stats[keys.rollouts.dead_counter] == 1


async def test_trainer_ack_deletes_only_owned(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 2)
    w = StreamConsumer(r, keys.rollouts, "w")
    got = await w.read(count=2, block_ms=100)
    await w.handoff(keys.ready, [(e, b"s" * 10, 1) for e in got])
    t = StreamConsumer(r, keys.ready, "trainer-0")
    samples = await t.read(count=5, block_ms=100)
    assert len(samples) == 2 and samples[0].data == b"s" * 10
    assert await t.ack(samples) == [True, True]
    assert await r.xlen(keys.ready.key) == 0
    stats = await read_stats(r, keys)
    assert stats[keys.ready.bytes_out] == 20


async def test_restarted_consumer_sees_its_own_pending(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 3)
    first = StreamConsumer(r, keys.rollouts, "trainer-0")
    await first.read(count=3, block_ms=100)
    again = StreamConsumer(r, keys.rollouts, "trainer-0")
    pending, cursor = await again.read_own_pending(count=2)
    assert [e.id for e in pending] == ["r0", "r1"]
    assert cursor is not None
    rest, cursor = await again.read_own_pending(count=2, after=cursor)
    assert [e.id for e in rest] == ["r2"]
    assert await again.read_own_pending(count=2, after=cursor) == ([], None)
    assert await again.read(count=10, block_ms=50) == []


def test_keys_carry_the_hash_tag() -> None:
    k = RunKeys.for_run("demo")
    assert k.rollouts.key == "gkd:{demo}:rollouts" and k.ready.key == "gkd:{demo}:ready"
    assert k.dead.key == "gkd:{demo}:dead" and k.stats == "gkd:{demo}:stats"
    assert k.worker("w1") == "gkd:{demo}:worker:w1" and k.policy == "gkd:{demo}:policy"
    assert k.config == "gkd:{demo}:config"
    assert k.worker_name(k.worker("a:b")) == "a:b"


@pytest.mark.parametrize("bad", ["", "has space", "a{b}", "x" * 65])
def test_bad_run_names_are_rejected(bad: str) -> None:
    from pipeline.errors import SettingsError

    with pytest.raises(SettingsError, match="run name"):
        RunKeys.for_run(bad)


async def test_released_entries_are_reclaimable_at_once_without_a_new_delivery(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    await ensure_groups(r, keys)
    await produce(r, keys, 2)
    leaving = StreamConsumer(r, keys.rollouts, "leaving", lease_ms=60_000)
    staying = StreamConsumer(r, keys.rollouts, "staying", lease_ms=60_000)
    mine = await leaving.read(count=2, block_ms=100)
    assert await leaving.release(mine) == [True, True]
    got, over = await staying.reclaim(count=10)
    assert sorted(e.id for e in got) == ["r0", "r1"] and over == []
    assert [e.deliveries for e in got] == [1, 1]
    assert await leaving.release(mine) == [False, False]
