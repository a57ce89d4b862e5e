"""`gkd bench redis`: scored samples handed off and consumed through one Redis node and through a Redis
Cluster (3 masters + 3 replicas on loopback) with P = 3 and P = 6 partitions, and what Redis's CPU
spends per GB handed off.

For each layout the suite fills `rollouts` (small rollouts, spread over the partitions), then:
1. handoff: `--workers` consumers (`queue.partitions.Partitioned`, as `gkd workers` uses them, no teacher)
   read rollouts and hand off a synthetic ScoredSample of `--rows` x `--k` (fp16) each, one script per
   partition and batch, with WAIT for 1 replica in the cluster (the cluster default) and none on one node;
2. consume: `--trainers` consumers read `ready` (waiting for the replica, as trainers do) and journal the
   samples' rollouts after each "step" (`StreamConsumer.journal`).
Redis CPU (INFO CPU, user + sys) is read from every node before and after the handoff: seconds of CPU
per GB of scored payload handed off, summed over the masters, per master, and summed over the replicas.
On a 2-core machine the processes share the cores: absolute rates mean little, the per-node cost is
what sizing needs (deploy/README.md).

Usage: `gkd bench redis [--samples N] [--rows R] [--k K] [--workers W] [--trainers T] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.local.redis_cluster import RedisCluster
from pipeline.local.redis_server import RedisServer
from pipeline.queue.connection import connect, connect_sync
from pipeline.queue.durable import Replicas
from pipeline.queue.partitions import Partitioned
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.wire.codec import Rollout, ScoredSample, encode_rollout, encode_scored
from workers.bench.cli import result

BENCH = "redis"


@dataclass
class Layout:
    name: str
    url: str
    cluster: bool
    partitions: int
    ports: list[int]
    """Every node's port (masters and replicas)."""


@dataclass
class Measured:
    handoff_s: float
    consume_s: float
    cpu_masters_s: float
    cpu_replicas_s: float
    masters: int


def _payloads(rows: int, k: int) -> tuple[bytes, bytes]:
    """(rollout, scored sample) of a 64-token prompt and `rows` scored tokens, fp16 logprobs."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, size=64 + rows).astype(np.int32)
    ro = Rollout("bench", ids, prompt_len=64, source="dataset")
    top = rng.integers(0, 32000, size=(rows, k)).astype(np.int32)
    lp = np.sort(rng.normal(-5, 2, size=(rows, k)).astype(np.float16), axis=1)[:, ::-1].copy()
    sample = ScoredSample(rollout=ro, topk_ids=top, topk_logprobs=lp, teacher="bench", k=k, scored_ms=0)
    return encode_rollout(ro), encode_scored(sample)


def _cpu(ports: list[int]) -> dict[int, tuple[float, str]]:
    """Port -> (used CPU seconds, role) from INFO of each node."""
    out = {}
    for port in ports:
        c = connect_sync(f"redis://127.0.0.1:{port}/0")
        try:
            cpu, repl = c.info("cpu"), c.info("replication")
            out[port] = (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), str(repl["role"]))
        finally:
            c.close()
    return out


async def _drain(c: Partitioned, act: Any) -> None:
    while got := await c.read(32, block_ms=200):
        await act(got)


async def _measure(lay: Layout, a: argparse.Namespace, rollout: bytes, scored: bytes) -> Measured:
    r = connect(lay.url, cluster=lay.cluster)
    keys = RunKeys.for_run(f"bench-{lay.name}")
    parts = keys.parts(lay.partitions)
    replicas = Replicas(r, 1 if lay.cluster else 0, 2000)
    try:
        await ensure_groups(r, keys, lay.partitions)
        for i in range(0, a.samples, 50):
            batch = [(f"r{j}", rollout) for j in range(i, min(i + 50, a.samples))]
            await add_rollouts(r, parts[(i // 50) % len(parts)], batch)
        before = _cpu(lay.ports)
        t0 = time.perf_counter()

        async def handoff(c: Partitioned, got: list[Any]) -> None:
            await c.handoff(keys.ready, [(e, scored, a.rows) for e in got])

        workers = [Partitioned(r, keys.rollouts, parts, f"w{i}", replicas=replicas) for i in range(a.workers)]
        await asyncio.gather(*(_drain(c, lambda got, c=c: handoff(c, got)) for c in workers))
        handoff_s = time.perf_counter() - t0
        after = _cpu(lay.ports)
        t0 = time.perf_counter()
        trainers = [
            Partitioned(r, keys.ready, parts, f"t{i}", replicas=replicas, wait_reads=True)
            for i in range(a.trainers)
        ]

        async def journal(c: Partitioned, got: list[Any]) -> None:
            await c.journal([e.hollow() for e in got], step=1)

        await asyncio.gather(*(_drain(c, lambda got, c=c: journal(c, got)) for c in trainers))
        consume_s = time.perf_counter() - t0
    finally:
        await r.aclose()
    used = {p: after[p][0] - before[p][0] for p in lay.ports}
    masters = [p for p in lay.ports if after[p][1] == "master"]
    return Measured(
        handoff_s=handoff_s,
        consume_s=consume_s,
        cpu_masters_s=sum(used[p] for p in masters),
        cpu_replicas_s=sum(used[p] for p in lay.ports if p not in masters),
        masters=len(masters),
    )


def _rows(
    lay: Layout, m: Measured, a: argparse.Namespace, scored: int, base: Measured | None
) -> list[dict[str, Any]]:
    gb = a.samples * scored / 1e9
    name = lay.name
    handoff = a.samples / m.handoff_s
    consume = a.samples / m.consume_s
    ratio_h = handoff / (a.samples / base.handoff_s) if base else None
    ratio_c = consume / (a.samples / base.consume_s) if base else None
    b_h = a.samples / base.handoff_s if base else None
    b_c = a.samples / base.consume_s if base else None
    return [
        result(BENCH, f"{name}.handoff_samples_per_s", handoff, "samples/s", b_h, ratio_h),
        result(BENCH, f"{name}.handoff_mb_per_s", gb * 1000 / m.handoff_s, "MB/s"),
        result(BENCH, f"{name}.consume_samples_per_s", consume, "samples/s", b_c, ratio_c),
        result(BENCH, f"{name}.cpu_s_per_gb_masters", m.cpu_masters_s / gb, "CPU s/GB"),
        result(
            BENCH, f"{name}.cpu_s_per_gb_per_master", m.cpu_masters_s / gb / max(m.masters, 1), "CPU s/GB"
        ),
        result(BENCH, f"{name}.cpu_s_per_gb_replicas", m.cpu_replicas_s / gb, "CPU s/GB"),
    ]


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench redis")
    p.add_argument("--samples", type=int, default=2000, help="scored samples per layout")
    p.add_argument("--rows", type=int, default=256, help="scored tokens per sample")
    p.add_argument("--k", type=int, default=32, help="teacher top-k per token")
    p.add_argument("--workers", type=int, default=4, help="concurrent handoff consumers (workers)")
    p.add_argument("--trainers", type=int, default=2, help="concurrent journaling consumers (trainer ranks)")
    a = p.parse_args(args)
    rollout, scored = _payloads(a.rows, a.k)
    rows = [
        result(BENCH, "scored_sample_bytes", len(scored), "bytes"),
        result(BENCH, "bytes_per_scored_token", len(scored) / a.rows, "bytes"),
    ]
    with RedisServer() as node:
        lay = Layout("node_p1", node.url, False, 1, [node.port])
        base = asyncio.run(_measure(lay, a, rollout, scored))
        rows += _rows(lay, base, a, len(scored), None)
    with RedisCluster(masters=3, replicas=1) as c:
        ports = [n.port for n in c.nodes]
        for parts in (3, 6):
            lay = Layout(f"cluster3_p{parts}", c.url, True, parts, ports)
            m = asyncio.run(_measure(lay, a, rollout, scored))
            rows += _rows(lay, m, a, len(scored), base)
    return rows


if __name__ == "__main__":
    import json
    import sys

    for row in run(sys.argv[1:]):
        print(json.dumps(row))
