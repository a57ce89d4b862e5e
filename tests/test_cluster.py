"""Partitioned runs on a real Redis Cluster (3 masters + 3 replicas started by the suite), judged by the
ledger: every produced rollout id trained exactly once or dead, none anywhere else.

The processes get the cluster and the partitions from the environment (GKD_REDIS_CLUSTER=1,
GKD_PARTITIONS=6), as a deployment would. Without a redis-server that can run a cluster the tests skip,
saying why.
"""

from __future__ import annotations

import collections
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.local.redis_cluster import RedisCluster
from pipeline.queue.connection import connect
from pipeline.queue.schema import RunKeys, Stat
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    dead_letters,
    procs,
    rollouts_cmd,
    stream_entries,
    student_path,
    trained_steps,
    trainer_cmd,
    wait_until,
    worker_cmd,
    write_prompts,
)

__all__ = ["procs"]

P = 6


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    try:
        c = RedisCluster(masters=3, replicas=1, node_timeout_ms=1500).start()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot start a Redis Cluster with the redis-server/redis-cli here: {exc}")
    yield c
    c.cleanup()


@pytest.fixture
async def rc(cluster: RedisCluster) -> aioredis.Redis:
    """A cluster client; every master flushed first."""
    for port in cluster.master_ports():
        cluster.cli("flushall", port=port)
    client = connect(cluster.url, cluster=True)
    yield client
    await client.aclose()


def cluster_env(partitions: int = P) -> dict[str, str]:
    return {"GKD_REDIS_CLUSTER": "1", "GKD_PARTITIONS": str(partitions)}


async def ledger(r: aioredis.Redis, keys: RunKeys, sample_log: Path) -> collections.Counter[str]:
    """Occurrences of each rollout id in the kept trained steps and in every partition's dead stream."""
    seen: collections.Counter[str] = collections.Counter()
    for ids in trained_steps(sample_log).values():
        seen.update(ids)
    for part in keys.parts(P):
        for rid, records in (await dead_letters(r, part)).items():
            seen[rid] += len(records)
    return seen


async def stats_total(r: aioredis.Redis, keys: RunKeys, name: str) -> int:
    return sum([int(await r.hget(key, name) or 0) for key in keys.stats_keys(P)])


async def test_whole_pipeline_with_six_partitions_on_a_cluster_trains_each_rollout_once(
    cluster: RedisCluster, rc: aioredis.Redis, procs: Procs, tmp_path: Path
) -> None:
    keys = RunKeys.for_run("part")
    url, n = cluster.url, 96
    fake = await FaultyTeacher(seed=3, delay_s=0.005).start()
    sample_log = tmp_path / "samples.jsonl"
    student = student_path()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 120)
    env = cluster_env()
    try:
        procs.spawn("producer", rollouts_cmd(url, keys.run, student, prompts, n), env=env)
        for w in ("w0", "w1"):
            procs.spawn(w, worker_cmd(url, keys.run, [fake.url], w), env=env)
        out = tmp_path / "out"
        procs.spawn("trainer", trainer_cmd(url, keys.run, student, out, sample_log, idle_exit_s=6), env=env)
        everyone = ["w0", "w1", "trainer"]

        async def settled() -> bool:
            return sum((await ledger(rc, keys, sample_log)).values()) >= n and not procs.alive("producer")

        await wait_until(settled, 300, f"all {n} rollouts trained", procs=procs, alive=everyone)
        codes = {"producer": await procs.wait("producer", 10), "trainer": await procs.wait("trainer", 120)}
        for w in ("w0", "w1"):
            procs.signal(w, signal.SIGTERM)
        codes |= {w: await procs.wait(w, 60) for w in ("w0", "w1")}
        assert codes == dict.fromkeys(codes, 0), {k: procs.tail(k) for k in codes}
        seen = await ledger(rc, keys, sample_log)
        assert len(seen) == n and set(seen.values()) == {1}, seen
        journaled = [e["id"] for p in keys.parts(P) for e in await stream_entries(rc, p.journal.key)]
        assert not journaled, "the final checkpoint trims every partition's journal"
        # The producer spread the rollouts over every partition (least filled first), each partition's
        # handoff stayed in its slot (rollouts of p -> ready of p), and everything left both streams.
        per_part = [int(await rc.hget(p.stats, Stat.ROLLOUTS_PRODUCED) or 0) for p in keys.parts(P)]
        assert sum(per_part) == n and min(per_part) > 0, per_part
        for p in keys.parts(P):
            scored, produced = await rc.hmget(p.stats, [Stat.SCORED, Stat.ROLLOUTS_PRODUCED])
            assert int(scored or 0) == int(produced or 0)
            assert await rc.xlen(p.rollouts.key) == 0 and await rc.xlen(p.ready.key) == 0
        assert await stats_total(rc, keys, Stat.TRAINED_SAMPLES) == n
        slots = {int(await rc.cluster_keyslot(p.ready.key)) for p in keys.parts(P)}
        assert len(slots) == P
    finally:
        await fake.stop()
