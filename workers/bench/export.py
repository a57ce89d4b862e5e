"""`gkd bench export`: scored datasets on disk: size per token, export and replay throughput.

Size: on-disk bytes per scored token of a Parquet shard (the default encoding: BYTE_STREAM_SPLIT for
top-k ids and logprobs, zstd level 3) at k = 20 and k = 64 with fp16 logprobs, against the wire's 6k + 4
bytes (baseline; ratio = wire / disk), and at k = 64 the alternatives (PLAIN + zstd, DELTA_BINARY_PACKED
ids). The data is synthetic but shaped like a teacher's: ids drawn from a Zipf-like prior over a 151,936
token vocabulary mixed with a per-sequence pool (top-k sets of nearby positions overlap), logprobs from a
softmax whose temperature and tail mass vary per position, sorted, cast to fp16. Random ids and
logprobs would compress less; a real teacher's top-k is, if anything, more repetitive.

Throughput: `gkd export` (in process) drains a private Redis's ready stream filled with scored samples
(T = 2048, prompt 256, k = 64) into shards, and `gkd replay` feeds the dataset into another run:
samples/s and MB/s of wire payload. Both include the Redis round trips, the codec and the fsyncs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset.exporter import Exporter, ExportSettings
from pipeline.dataset.format import ParquetOptions
from pipeline.dataset.replayer import Replayer, ReplaySettings
from pipeline.dataset.writer import DatasetWriter
from pipeline.local.redis_server import RedisServer
from pipeline.queue.connection import connect
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import check_run_config
from pipeline.queue.schema import Config, RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.sections import FlowSettings, RunSettings
from pipeline.wire.codec import Rollout, ScoredSample, encode_rollout, encode_scored
from workers.bench.cli import result

VOCAB = 151_936


def teacher_like(n: int, t: int, prompt: int, k: int, seed: int = 0) -> list[ScoredSample]:
    """`n` samples of `t` tokens whose top-k rows look like a teacher's (see the module docstring)."""
    rng = np.random.default_rng(seed)
    rank_to_id = rng.permutation(VOCAB).astype(np.int32)
    prior = 1.0 / (np.arange(VOCAB) + 2.7) ** 1.1
    prior /= prior.sum()
    out = []
    for i in range(n):
        rows = t - prompt
        pool = rank_to_id[rng.choice(VOCAB, size=512, p=prior)]
        local = rng.random((rows, k)) < 0.5
        ids = np.where(
            local, pool[rng.integers(0, 512, (rows, k))], rank_to_id[rng.choice(VOCAB, (rows, k), p=prior)]
        )
        temp = rng.uniform(0.3, 2.0, (rows, 1))
        logits = -np.cumsum(rng.exponential(1.0, (rows, k)), axis=1) / temp
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p *= 1.0 - rng.uniform(0.0, 0.3, (rows, 1))  # mass outside the top-k
        lp = np.log(p).astype(np.float16)
        input_ids = rank_to_id[rng.choice(VOCAB, size=t, p=prior)]
        ro = Rollout(id=f"bench-{i}", input_ids=input_ids, prompt_len=prompt, source="student")
        out.append(ScoredSample(ro, ids.astype(np.int32), lp, "bench-teacher", k, scored_ms=1))
    return out


def disk_bytes_per_token(samples: list[ScoredSample], opts: ParquetOptions) -> float:
    with tempfile.TemporaryDirectory() as d:
        s0 = samples[0]
        with DatasetWriter(d, teacher=s0.teacher, k=s0.k, logprob_dtype="float16", options=opts) as w:
            for s in samples:
                w.add(s)
            shard = w.commit([])
        assert shard is not None
        return shard.bytes / shard.scored_tokens


async def _fill(url: str, keys: RunKeys, samples: list[ScoredSample]) -> int:
    r = connect(url)
    total = 0
    try:
        fixed = {
            Config.K: samples[0].k,
            Config.TEACHER_MODEL: samples[0].teacher,
            Config.LOGPROB_DTYPE: "float16",
        }
        await check_run_config(r, keys, fixed)
        await ensure_groups(r, keys)
        c = StreamConsumer(r, keys.rollouts, "bench")
        by_id = {s.rollout.id: encode_scored(s) for s in samples}
        for i in range(0, len(samples), 16):
            chunk = samples[i : i + 16]
            await add_rollouts(r, keys, [(s.rollout.id, encode_rollout(s.rollout)) for s in chunk])
            got = await c.read(len(chunk), block_ms=100)
            await c.handoff(keys.ready, [(e, by_id[e.id], 1) for e in got])
            total += sum(len(by_id[e.id]) for e in got)
    finally:
        await r.aclose()
    return total


def throughput(n: int) -> list[dict[str, Any]]:
    samples = teacher_like(n, 2048, 256, 64, seed=1)
    server = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory() as d:
            wire = asyncio.run(_fill(server.url, RunKeys.for_run("src"), samples))
            mb = wire / 1e6
            src = RunSettings(name="src", redis_url=server.url)
            out = str(Path(d) / "ds")
            es = ExportSettings(run=src, out=out, idle_exit_s=0.3, commit_idle_s=0.3, shard_samples=64)
            t0 = time.perf_counter()
            summary = asyncio.run(Exporter(es).run(asyncio.Event()))
            # The idle wait that ends the run is not export work.
            t_exp = time.perf_counter() - t0 - es.idle_exit_s
            assert summary.samples == n, summary
            rs = ReplaySettings(
                run=RunSettings(name="dst", redis_url=server.url), dataset=str(Path(d) / "ds"),
                flow=FlowSettings(high_water=10 * n, low_water=5 * n, high_water_bytes=4 * wire,
                                  low_water_bytes=2 * wire),
            )  # fmt: skip
            t0 = time.perf_counter()
            rsum = asyncio.run(Replayer(rs).run(asyncio.Event()))
            t_rep = time.perf_counter() - t0
            assert rsum.written == n, rsum
    finally:
        server.cleanup()
    return [
        result("export", "export_samples_per_s", n / t_exp, "samples/s"),
        result("export", "export_MBps", mb / t_exp, "MB/s"),
        result("export", "replay_samples_per_s", n / t_rep, "samples/s"),
        result("export", "replay_MBps", mb / t_rep, "MB/s"),
    ]


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench export")
    p.add_argument("--samples", type=int, default=96, help="samples exported and replayed (T=2048, k=64)")
    p.add_argument("--size-samples", type=int, default=64, help="samples per size measurement (T=1024)")
    a = p.parse_args(args)
    rows: list[dict[str, Any]] = []
    for k in (20, 64):
        samples = teacher_like(a.size_samples, 1024, 128, k)
        wire = 6 * k + 4
        disk = disk_bytes_per_token(samples, ParquetOptions())
        rows.append(
            result("export", f"disk_bytes_per_token_k{k}", disk, "B", baseline=wire, ratio=wire / disk)
        )
        if k == 64:
            for name, opts in (
                ("plain_zstd", ParquetOptions(topk_ids_encoding="PLAIN", logprob_encoding="PLAIN")),
                ("delta_ids", ParquetOptions(topk_ids_encoding="DELTA_BINARY_PACKED")),
                ("zstd9", ParquetOptions(compression_level=9)),
            ):
                b = disk_bytes_per_token(samples, opts)
                rows.append(
                    result(
                        "export", f"disk_bytes_per_token_k64_{name}", b, "B", baseline=wire, ratio=wire / b
                    )
                )
    rows += throughput(a.samples)
    return rows
