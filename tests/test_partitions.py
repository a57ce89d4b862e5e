"""Partitioned runs on one Redis node (no cluster needed): partition keys, fair reads over partitions,
handoff and journal inside each partition, per-partition settling, backpressure shares, the run setting."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.errors import ConfigMismatch, RedisUnavailable, SettingsError, StreamGroupMissing
from pipeline.monitor.report import build_report, take_sample
from pipeline.monitor.text import render_text
from pipeline.queue.backpressure import Backpressure, WaterMarks
from pipeline.queue.connection import connect_sync
from pipeline.queue.journal import Journals
from pipeline.queue.lease import Held
from pipeline.queue.partitions import Partitioned
from pipeline.queue.runstate import check_run_config
from pipeline.queue.schema import Config, RunKeys, Stat, fold_partitions, run_of_key
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.sections import RunSettings
from pipeline.train.ready import retrain
from pipeline.wire.codec import Rollout, decode_rollout, encode_rollout

P = 3


def test_partition_keys_carry_their_own_hash_tag_and_one_partition_keeps_the_run_names() -> None:
    keys = RunKeys.for_run("demo")
    parts = keys.parts(4)
    assert parts[3].ready.key == "gkd:{demo.3}:ready" and parts[0].journal.key == "gkd:{demo.0}:trained"
    assert parts[2].stats == "gkd:{demo.2}:stats" and parts[2].batch_marker("b") == "gkd:{demo.2}:batch:b"
    # run-wide keys stay under the run's own tag, whichever partition's keys name them
    assert parts[3].config == keys.config == "gkd:{demo}:config" and parts[1].policy == keys.policy
    assert parts[1].worker("w") == "gkd:{demo}:worker:w"
    assert keys.parts(1) == [keys] and keys.parts(1)[0].ready.key == "gkd:{demo}:ready"
    assert keys.stats_keys(1) == ["gkd:{demo}:stats"]
    assert keys.stats_keys(2) == ["gkd:{demo}:stats", "gkd:{demo.0}:stats", "gkd:{demo.1}:stats"]
    assert fold_partitions({run_of_key(k) for k in (parts[1].ready.key, keys.config, "gkd:{x.1}:ready")}) == {
        "demo",
        "x.1",
    }
    with pytest.raises(SettingsError, match=r"partitions: expected 1\.\.1024, got 0"):
        RunSettings(partitions=0)


async def _spread(r: aioredis.Redis, keys: RunKeys, per_part: int) -> list[RunKeys]:
    parts = keys.parts(P)
    await ensure_groups(r, keys, P)
    for p in parts:
        await add_rollouts(r, p, [(f"p{p.index}-{i}", b"r" * (10 + p.index)) for i in range(per_part)])
    return parts


async def test_reads_take_from_every_partition_and_handoff_stays_in_the_entrys_partition(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    parts = await _spread(r, keys, 4)
    worker = Partitioned(r, keys.rollouts, parts, "w0", lease_ms=60_000)
    first = await worker.read(6, block_ms=50)
    assert len(first) == 6 and {e.part for e in first} == {0, 1, 2}  # fair: no partition starves
    # streams of different partitions give the same ids: entries are told apart by partition
    assert len({e.ref for e in first}) == 6
    held = Held(worker)
    held.add(first)
    assert all(e.ref in held for e in first)
    rest = await worker.read(100, block_ms=50)
    assert len(rest) == 6 and await worker.read(5, block_ms=20, skip={0, 1, 2}) == []
    everything = first + rest
    flags = await worker.handoff(keys.ready, [(e, b"scored-" + e.id.encode(), 1) for e in everything])
    assert flags == [True] * 12
    for p in parts:
        ids = sorted(f[b"id"].decode() for _, f in await r.xrange(p.ready.key))
        assert ids == [f"p{p.index}-{i}" for i in range(4)]  # rollouts of p went to ready of p
        assert await r.xlen(p.rollouts.key) == 0
        stats = await r.hgetall(p.stats)
        assert int(stats[Stat.SCORED.encode()]) == 4 and int(stats[Stat.ROLLOUTS_PRODUCED.encode()]) == 4
    assert await r.hgetall(keys.stats) == {}  # scripts count in their partition's hash only


async def test_trained_samples_are_journaled_settled_and_requeued_per_partition(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    parts = await _spread(r, keys, 2)
    worker = Partitioned(r, keys.rollouts, parts, "w0")
    got = await worker.read(100, block_ms=50)
    await worker.handoff(keys.ready, [(e, b"s" * 20, 1) for e in got])
    trainer = Partitioned(r, keys.ready, parts, "trainer-0")
    ready = await trainer.read(100, block_ms=50)
    assert len(ready) == 6
    by_part = {p: [e for e in ready if e.part == p] for p in range(P)}
    # step 1 trains one sample of each partition; the checkpoint lists the other sample of partition 2
    # as unjournaled (its ref names the partition), partitions 0 and 1 journal theirs in step 2
    step1 = [by_part[p][0] for p in range(P)]
    step2 = [by_part[0][1], by_part[1][1]]
    journaled = lambda es: [replace(e, data=_rollout(e.id)) for e in es]  # noqa: E731
    assert await trainer.journal(journaled(step1), 1) == [True] * 3
    journals = Journals(r, parts)
    mark = await journals.mark()
    assert await journals.trim(mark) == 3
    assert await trainer.journal(journaled(step2), 2) == [True] * 2
    listed = {"trainer-0": [(by_part[2][1].ref.decode(), by_part[2][1].size)]}
    assert listed["trainer-0"][0][0].startswith("2/")
    assert await journals.settle(listed) == 1
    assert await journals.requeue(1, retrain) == (2, 0)  # step 2 goes back, into its own partition
    for p in parts:
        assert await r.xlen(p.ready.key) == 0 and await r.xlen(p.journal.key) == 0
    back = {
        p.index: [decode_rollout(f[b"data"]).id for _, f in await r.xrange(p.rollouts.key)] for p in parts
    }
    assert back == {0: [by_part[0][1].id], 1: [by_part[1][1].id], 2: []}


def _rollout(rid: str) -> bytes:
    return encode_rollout(Rollout(rid, np.arange(5, dtype=np.int32), prompt_len=2))


async def test_backpressure_sums_partitions_and_gives_each_its_share(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    parts = keys.parts(P)
    await ensure_groups(r, keys, P)
    bp = Backpressure(r, keys.rollouts, WaterMarks(6, 3, 10**9, 10**8), parts=parts)
    await add_rollouts(r, parts[0], [(f"a{i}", b"x") for i in range(2)])
    await add_rollouts(r, parts[2], [(f"b{i}", b"x") for i in range(1)])
    assert await bp.level() == (3, 3) and await bp.full() == {0}  # share: ceil(6 / 3) = 2 entries
    assert await bp.least_filled() == 1
    await add_rollouts(r, parts[1], [(f"c{i}", b"x") for i in range(3)])
    assert await bp.least_filled() == 2 and await bp.full() == {0, 1}
    assert await bp.level() == (6, 6)  # at the total high-water mark: a producer waits


async def test_the_partition_count_is_fixed_for_the_run(r: aioredis.Redis, keys: RunKeys) -> None:
    await check_run_config(r, keys, RunSettings(partitions=3).fixed(Config.PARTITIONS))
    with pytest.raises(ConfigMismatch, match="partitions: run has '3', this process has '1'"):
        await check_run_config(r, keys, RunSettings().fixed(Config.PARTITIONS))


async def test_status_shows_each_partition_and_their_sum(
    r: aioredis.Redis, keys: RunKeys, redis_url: str
) -> None:
    parts = await _spread(r, keys, 2)
    await check_run_config(r, keys, RunSettings(partitions=P).fixed(Config.PARTITIONS))
    worker = Partitioned(r, keys.rollouts, parts, "w0")
    got = [e for e in await worker.read(100, block_ms=50) if e.part == 1]
    await worker.handoff(keys.ready, [(e, b"s" * 30, 1) for e in got])
    client = connect_sync(redis_url)
    try:
        rep = build_report(None, take_sample(client, keys), run=keys.run, redis_url=redis_url)
    finally:
        client.close()
    assert rep["streams"]["rollouts"]["length"] == 4 and rep["streams"]["ready"]["length"] == 2
    assert rep["streams"]["rollouts"]["pending"] == 4  # read by w0 in partitions 0 and 2
    assert rep["stats"][Stat.ROLLOUTS_PRODUCED] == 6 and rep["stats"][Stat.SCORED] == 2
    rows = {p["partition"]: p for p in rep["partitions"]}
    assert [rows[p]["lengths"]["rollouts"] for p in range(P)] == [2, 0, 2]
    assert [rows[p]["lengths"]["ready"] for p in range(P)] == [0, 2, 0]
    assert rows[1]["waiting_bytes"]["ready"] == 60
    text = render_text(rep)
    assert "3 partitions" in text and "{test.1}" in text


async def test_errors_of_a_command_inside_a_pipeline_keep_their_class(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    """Reads that wait for replicas run in a pipeline; redis-py prefixes such errors with the command: the
    code after that prefix still decides the class (NOGROUP: the group is gone)."""
    pipe = r.pipeline(transaction=False)
    pipe.xreadgroup("nogroup", "c", {keys.ready.key: ">"}, count=1)
    with pytest.raises(StreamGroupMissing):
        await pipe.execute()


def test_a_cluster_seed_that_does_not_answer_is_an_outage() -> None:
    """`gkd status --redis-cluster` against a seed that is down says so (RedisUnavailable naming it)."""
    from pipeline.local.redis_server import free_port

    port = free_port()
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        connect_sync(f"redis://127.0.0.1:{port}/0", cluster=True)
