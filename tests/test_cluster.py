"""Partitioned runs on a real Redis Cluster (3 masters + 3 replicas started by the suite), judged by the
ledger: every produced rollout id trained exactly once or dead, none anywhere else.

The processes get the cluster and the partitions from the environment (GKD_REDIS_CLUSTER=1,
GKD_PARTITIONS=6), as a deployment would. Without a redis-server that can run a cluster the tests skip,
saying why.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
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
    gkd,
    procs,
    rollouts_cmd,
    sample_log_count,
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


Fault = Callable[[], Awaitable[None]]


async def run_pipeline(
    url: str,
    rc: aioredis.Redis,
    procs: Procs,
    tmp_path: Path,
    keys: RunKeys,
    n: int,
    fault: Fault | None = None,
) -> collections.Counter[str]:
    """Producer, two workers and a trainer on the cluster with P partitions until all `n` rollouts are
    trained or dead; `fault` runs once a third is trained. Every process must exit 0. The ledger."""
    fake = await FaultyTeacher(seed=3, delay_s=0.005).start()
    sample_log = tmp_path / "samples.jsonl"
    student = student_path()
    prompts = write_prompts(tmp_path / "prompts.jsonl", n + 20)
    env = cluster_env()
    pace = ["--high-water", "24", "--low-water", "12"] if fault else []
    try:
        procs.spawn("producer", rollouts_cmd(url, keys.run, student, prompts, n, extra=pace), env=env)
        for w in ("w0", "w1"):
            procs.spawn(w, worker_cmd(url, keys.run, [fake.url], w, max_deliveries=50, extra=pace), env=env)
        out = tmp_path / "out"
        idle = 6 if fault is None else 15
        procs.spawn(
            "trainer", trainer_cmd(url, keys.run, student, out, sample_log, idle_exit_s=idle), env=env
        )
        everyone = ["w0", "w1", "trainer"]
        if fault is not None:
            third = n // 3
            await wait_until(lambda: sample_log_count(sample_log) >= third, 240, f"{third} samples trained",
                             procs=procs, alive=everyone)  # fmt: skip
            await fault()

        async def settled() -> bool:
            return sum((await ledger(rc, keys, sample_log)).values()) >= n and not procs.alive("producer")

        await wait_until(settled, 300, f"all {n} rollouts trained", procs=procs, alive=everyone)
        codes = {"producer": await procs.wait("producer", 10), "trainer": await procs.wait("trainer", 120)}
        for w in ("w0", "w1"):
            procs.signal(w, signal.SIGTERM)
        codes |= {w: await procs.wait(w, 60) for w in ("w0", "w1")}
        assert codes == dict.fromkeys(codes, 0), {k: procs.tail(k) for k in codes}
        return await ledger(rc, keys, sample_log)
    finally:
        await fake.stop()


async def test_whole_pipeline_with_six_partitions_on_a_cluster_trains_each_rollout_once(
    cluster: RedisCluster, rc: aioredis.Redis, procs: Procs, tmp_path: Path
) -> None:
    keys, n = RunKeys.for_run("part"), 96
    seen = await run_pipeline(cluster.url, rc, procs, tmp_path, keys, n)
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
    # gkd status through the cluster: one row per partition, counters summed over the partitions
    status = subprocess.run(
        [*gkd("status", "--run", keys.run, "--redis", cluster.url, "--interval-s", "0", "--json")],
        env={**os.environ, **cluster_env()}, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rep = json.loads(status.stdout)
    assert [row["partition"] for row in rep["partitions"]] == list(range(P))
    assert rep["stats"][Stat.ROLLOUTS_PRODUCED] == rep["stats"][Stat.TRAINED_SAMPLES] == n


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A cluster of its own for a test that kills or reshapes it."""
    try:
        c = RedisCluster(masters=3, replicas=1, node_timeout_ms=1000).start()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot start a Redis Cluster with the redis-server/redis-cli here: {exc}")
    yield c
    c.cleanup()


async def _kill_master_mid_run(c: RedisCluster, procs: Procs, tmp_path: Path, n: int) -> None:
    keys = RunKeys.for_run("failover")
    rc = connect(c.url, cluster=True)
    await rc.ping()  # the client learns the slot map
    killed: list[int] = []

    async def kill_master() -> None:
        # the master serving partition 0 dies (kill -9); its replica is promoted after the node timeout;
        # then the dead node is started again and rejoins as a replica (as an operator would do)
        port = rc.get_node_from_key(keys.parts(P)[0].ready.key).port
        c.node(port).stop(kill=True)
        killed.append(port)
        await asyncio.to_thread(c.wait_ok, 60)
        assert port not in c.master_ports()
        c.node(port).start()
        await asyncio.to_thread(c.wait_ok, 60)

    try:
        seen = await run_pipeline(c.url, rc, procs, tmp_path, keys, n, fault=kill_master)
    finally:
        await rc.aclose()
    assert killed
    dup = {rid: k for rid, k in seen.items() if k > 1}
    assert not dup, f"duplicated: {dup}"
    # the producer counted n rollouts as written (after their WAIT): all n are trained or dead
    assert len(seen) == n, f"{len(seen)} of {n} rollouts trained or dead"
    # every process rode the failover out: it saw the outage, and the run went on
    assert any("retrying" in procs.tail(name, 10**7) for name in ("w0", "w1", "trainer", "producer"))


async def test_kill_9_of_a_master_mid_run_loses_and_duplicates_nothing(
    own_cluster: RedisCluster, procs: Procs, tmp_path: Path
) -> None:
    await _kill_master_mid_run(own_cluster, procs, tmp_path, 120)


@pytest.mark.long
async def test_long_kill_9_of_a_master_mid_run(
    own_cluster: RedisCluster, procs: Procs, tmp_path: Path
) -> None:
    await _kill_master_mid_run(own_cluster, procs, tmp_path, 600)


def _node_ids(c: RedisCluster) -> dict[int, str]:
    """Port -> node id of every live master."""
    out = {}
    for line in c.cli("cluster", "nodes").splitlines():
        parts = line.split()
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        if "master" in parts[2] and "fail" not in parts[2]:
            out[port] = parts[0]
    return out


async def _migrate_mid_run(c: RedisCluster, procs: Procs, tmp_path: Path, n: int) -> None:
    keys = RunKeys.for_run("moving")
    rc = connect(c.url, cluster=True)
    await rc.ping()
    moved: list[int] = []

    async def reshard() -> None:
        # every slot of the master serving partition 0 moves to another master (redis-cli --cluster
        # reshard: MIGRATE key by key, ASK redirections meanwhile) while the run goes on
        port = rc.get_node_from_key(keys.parts(P)[0].ready.key).port
        ids = _node_ids(c)
        dest = next(p for p in ids if p != port)
        args = ["--cluster", "reshard", f"127.0.0.1:{port}", "--cluster-from", ids[port], "--cluster-to",
                ids[dest], "--cluster-slots", "16384", "--cluster-yes"]  # fmt: skip
        await asyncio.to_thread(c.cli, *args, timeout_s=300)
        assert port not in [p for p, _ in _masters_with_slots(c)], "the source serves no slot any more"
        moved.append(port)

    try:
        seen = await run_pipeline(c.url, rc, procs, tmp_path, keys, n, fault=reshard)
    finally:
        await rc.aclose()
    assert moved
    dup = {rid: k for rid, k in seen.items() if k > 1}
    assert not dup, f"duplicated: {dup}"
    assert len(seen) == n, f"{len(seen)} of {n} rollouts trained or dead"


def _masters_with_slots(c: RedisCluster) -> list[tuple[int, str]]:
    """(port, slot ranges) of the masters that serve slots now."""
    out = []
    for line in c.cli("cluster", "nodes").splitlines():
        parts = line.split()
        if "master" in parts[2] and len(parts) > 8:
            out.append((int(parts[1].split("@")[0].rsplit(":", 1)[1]), " ".join(parts[8:])))
    return out


@pytest.mark.long
async def test_slot_migration_mid_run_loses_and_duplicates_nothing(
    own_cluster: RedisCluster, procs: Procs, tmp_path: Path
) -> None:
    await _migrate_mid_run(own_cluster, procs, tmp_path, 240)


def test_bench_redis_reports_every_layout() -> None:
    """A tiny `gkd bench redis`: one node, the cluster with P = 3 and 6, every metric, positive rates."""
    from workers.bench.redis import run as bench_redis

    try:
        rows = bench_redis(
            ["--samples", "60", "--rows", "16", "--k", "4", "--workers", "2", "--trainers", "1"]
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot start a Redis Cluster with the redis-server/redis-cli here: {exc}")
    by = {row["metric"]: row for row in rows}
    for layout in ("node_p1", "cluster3_p3", "cluster3_p6"):
        for metric in ("handoff_samples_per_s", "consume_samples_per_s", "handoff_mb_per_s"):
            assert by[f"{layout}.{metric}"]["value"] > 0, (layout, metric)
        for metric in ("cpu_s_per_gb_masters", "cpu_s_per_gb_per_master", "cpu_s_per_gb_replicas"):
            assert by[f"{layout}.{metric}"]["value"] >= 0, (layout, metric)
    assert by["cluster3_p6.handoff_samples_per_s"]["baseline"] == by["node_p1.handoff_samples_per_s"]["value"]
    assert by["node_p1.cpu_s_per_gb_replicas"]["value"] == 0  # one node has no replica
