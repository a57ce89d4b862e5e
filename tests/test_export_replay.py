"""`gkd export` and `gkd replay` as real processes against a real Redis: kill -9 mid-shard loses and
duplicates nothing, a dataset of another teacher or k is refused with the reason, --serve-rollouts scores
rollouts from the dataset, and `gkd rollouts --skip-scored` leaves out sequences already scored."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.dataset import manifest as mf
from pipeline.dataset.exporter import Exporter, ExportSettings
from pipeline.dataset.reader import DatasetReader
from pipeline.errors import DatasetError
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import Heartbeat, check_run_config
from pipeline.queue.schema import Config, RunKeys, Stat, Stream
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.sections import RunSettings
from pipeline.wire.codec import Rollout, ScoredSample, decode_scored, encode_rollout, encode_scored
from tests.faults_harness import Procs, gkd, procs, wait_until
from tests.redis_helpers import read_stats
from tests.test_dataset import make_samples, write

__all__ = ["procs"]  # a fixture

pytestmark = pytest.mark.timeout(240)


async def fill_ready(r: aioredis.Redis, keys: RunKeys, samples: Sequence[ScoredSample]) -> None:
    """Put samples into ready the way the worker pool does (rollouts, then an owned handoff)."""
    s0 = samples[0]
    dtype = "float16" if s0.topk_logprobs.dtype == np.float16 else "float32"
    await check_run_config(
        r, keys, {Config.K: s0.k, Config.TEACHER_MODEL: s0.teacher, Config.LOGPROB_DTYPE: dtype}
    )
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [(s.rollout.id, encode_rollout(s.rollout)) for s in samples])
    c = StreamConsumer(r, keys.rollouts, "filler")
    by_id = {s.rollout.id: s for s in samples}
    left = len(samples)
    while left:
        got = await c.read(left, block_ms=100)
        await c.handoff(keys.ready, [(e, encode_scored(by_id[e.id]), 1) for e in got])
        left -= len(got)


async def pending(r: aioredis.Redis, stream: Stream) -> int:
    info: Any = await r.xpending(stream.key, stream.group)
    return int(info["pending"])


def dataset_samples(folder: Path) -> list[ScoredSample]:
    return [s for _, s in DatasetReader(folder).epoch(shuffle=False, seed=0, epoch=0)]


def dataset_ids(folder: Path) -> collections.Counter[str]:
    return collections.Counter(s.rollout.id for s in dataset_samples(folder))


def export_cmd(url: str, run: str, out: Path, *extra: str) -> list[str]:
    return gkd(
        "export", "--run", run, "--redis", url, "--out", str(out), "--shard-samples", "100",
        "--row-group-samples", "25", "--read-count", "5", "--lease-ms", "2000", "--commit-idle-s", "0.5",
        *extra,
    )  # fmt: skip


async def test_export_killed_9_mid_shard_again_and_again_loses_and_duplicates_nothing(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs
) -> None:
    keys = RunKeys.for_run("src")
    samples = make_samples(1000)
    out = tmp_path / "ds"
    rng = random.Random(7)
    fed = committed = 0
    for _ in range(3):
        # The scoring run goes on: 130 more samples, so each life commits a shard and dies holding part
        # of the next one (a long --commit-idle-s keeps it from committing that part early).
        await fill_ready(r, keys, samples[fed : fed + 130])
        fed += 130
        procs.spawn("export", export_cmd(redis_url, "src", out, "--commit-idle-s", "60"))
        await wait_until(
            lambda c=committed: _committed(out) > c and _holding(r, keys), 60, "a shard in progress",
            procs=procs, alive=["export"],
        )  # fmt: skip
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        assert procs.kill9("export") == -9
        committed = mf.load(out).samples
        assert await pending(r, keys.ready) > 0  # it died holding samples it had not committed
    assert 0 < committed < fed
    await fill_ready(r, keys, samples[fed:])
    procs.spawn("export", export_cmd(redis_url, "src", out, "--idle-exit-s", "1.5"))
    assert await procs.wait("export", 120) == 0, procs.tail("export")
    ids = dataset_ids(out)
    assert sum(ids.values()) == 1000 and set(ids) == {s.rollout.id for s in samples}
    assert max(ids.values()) == 1
    got = {s.rollout.id: encode_scored(s) for s in dataset_samples(out)}
    assert all(got[s.rollout.id] == encode_scored(s) for s in samples)
    assert await r.xlen(keys.ready.key) == 0 and await pending(r, keys.ready) == 0
    stats = await read_stats(r, keys)
    assert stats[keys.ready.bytes_in] == stats[keys.ready.bytes_out]  # backpressure's byte count
    assert not list(out.glob("*.tmp"))


async def _holding(r: aioredis.Redis, keys: RunKeys) -> bool:
    """Whether an exporter holds read samples (pending in the trainers group)."""
    return await pending(r, keys.ready) > 0


def _committed(out: Path) -> int:
    return mf.load(out).samples if out.joinpath(mf.MANIFEST).exists() else 0


class _DiesAfterCommit(Exporter):
    """An exporter that dies right after its first shard is committed, before acknowledging it."""

    async def _acknowledge(self, consumer: StreamConsumer, entries: list[Any]) -> list[bool]:
        if self.writer is not None and self.writer.manifest.export.unacked:
            raise SystemExit("died between commit and acknowledgement")
        return await super()._acknowledge(consumer, entries)


async def test_a_shard_committed_but_not_acknowledged_is_acknowledged_on_restart_not_rewritten(
    redis_url: str, r: aioredis.Redis, tmp_path: Path
) -> None:
    keys = RunKeys.for_run("src")
    samples = make_samples(150)
    await fill_ready(r, keys, samples)
    s = ExportSettings(
        run=RunSettings(name="src", redis_url=redis_url),
        out=str(tmp_path),
        shard_samples=100,
        idle_exit_s=1.0,
    )
    with pytest.raises(SystemExit):
        await _DiesAfterCommit(s).run(asyncio.Event())
    assert mf.load(tmp_path).samples == 100 and await pending(r, keys.ready) >= 100
    summary = await Exporter(s).run(asyncio.Event())
    assert summary.settled == 100 and summary.samples == 50
    ids = dataset_ids(tmp_path)
    assert sum(ids.values()) == 150 and max(ids.values()) == 1
    assert await r.xlen(keys.ready.key) == 0 and mf.load(tmp_path).export.unacked == []


async def test_replay_killed_9_mid_shard_writes_every_sample_once_per_epoch_under_backpressure(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs
) -> None:
    samples = make_samples(300)
    write(tmp_path, samples, shard=50)
    keys = RunKeys.for_run("dst")
    await ensure_groups(r, keys)
    seen: list[str] = []
    peak = 0
    done = asyncio.Event()

    async def drain() -> None:  # a slow trainer: reads, then acknowledges and deletes
        nonlocal peak
        c = StreamConsumer(r, keys.ready, "drain")
        while not done.is_set():
            peak = max(peak, await r.xlen(keys.ready.key))
            got = await c.read(4, block_ms=50)
            seen.extend(e.id for e in got)
            await c.ack(got)
            await asyncio.sleep(0.01)

    drainer = asyncio.create_task(drain())
    cmd = gkd(
        "replay", "--run", "dst", "--redis", redis_url, "--from", str(tmp_path), "--epochs", "2",
        "--shuffle", "--seed", "5", "--batch-size", "8", "--high-water", "40", "--low-water", "20",
    )  # fmt: skip
    rng = random.Random(3)
    try:
        for i in range(3):  # each life writes at most ~150 of the 600 (the drain paces it)
            before = len(seen)
            procs.spawn("replay", cmd)
            await wait_until(
                lambda b=before: len(seen) > b + 10, 60, "replay writing", procs=procs, alive=["replay"]
            )
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            assert procs.kill9("replay") == -9, f"replay ended before kill {i}"
        procs.spawn("replay", cmd)
        assert await procs.wait("replay", 120) == 0, procs.tail("replay")
        await wait_until(lambda: len(seen) >= 600 and peak >= 0, 60, "all replayed samples drained")
        await asyncio.sleep(0.3)  # anything extra would arrive now
    finally:
        done.set()
        await drainer
    counts = collections.Counter(seen)
    want = {s.rollout.id for s in samples} | {f"{s.rollout.id}#e1" for s in samples}
    assert set(counts) == want and max(counts.values()) == 1, counts.most_common(3)
    assert peak <= 40 + 8  # the high-water mark plus at most one batch
    stats = await read_stats(r, keys)
    assert stats[Stat.REPLAYED] == 600
    # The epoch order is the shuffled one (not the file order), the same order on every restart.
    first = [i for i in seen if "#" not in i]
    assert first != [s.rollout.id for s in samples]


async def test_a_dataset_of_another_teacher_or_k_is_refused_with_the_reason(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs
) -> None:
    write(tmp_path / "ds", make_samples(20), shard=10)
    for run, config, reason in (
        ("t", {"k": 8, "teacher_model": "bigger", "logprob_dtype": "float16"},
         "teacher: dataset has 'tch', run 't' has 'bigger'"),
        ("k", {"k": 20, "teacher_model": "tch", "logprob_dtype": "float16"},
         "k: dataset has 8, run 'k' has 20"),
        ("d", {"k": 8, "teacher_model": "tch", "logprob_dtype": "float32"},
         "logprob dtype: dataset has 'float16', run 'd' has 'float32'"),
    ):  # fmt: skip
        keys = RunKeys.for_run(run)
        await check_run_config(r, keys, config)
        replay = gkd("replay", "--run", run, "--redis", redis_url, "--from", str(tmp_path / "ds"))
        procs.spawn(f"replay-{run}", replay)
        assert await procs.wait(f"replay-{run}", 60) == 2
        assert reason in procs.tail(f"replay-{run}"), procs.tail(f"replay-{run}")
        assert await r.xlen(keys.ready.key) == 0
        # Exporting that run into the folder is refused for the same reason.
        procs.spawn(f"export-{run}", export_cmd(redis_url, run, tmp_path / "ds", "--idle-exit-s", "1"))
        assert await procs.wait(f"export-{run}", 60) == 2
        assert reason in procs.tail(f"export-{run}"), procs.tail(f"export-{run}")


async def test_export_refuses_to_start_while_trainers_of_the_run_are_alive(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs
) -> None:
    keys = RunKeys.for_run("busy")
    await fill_ready(r, keys, make_samples(5))
    await Heartbeat(r, keys, "trainer-0", "trainer", ttl_ms=60_000).beat()
    procs.spawn("export", export_cmd(redis_url, "busy", tmp_path / "ds"))
    assert await procs.wait("export", 60) == 2
    assert "has live trainers (trainer-0)" in procs.tail("export")
    assert await r.xlen(keys.ready.key) == 5 and await pending(r, keys.ready) == 0


async def test_serve_rollouts_scores_rollouts_from_the_dataset_and_hands_back_the_rest(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs
) -> None:
    samples = make_samples(30)
    write(tmp_path, samples, shard=10)
    keys = RunKeys.for_run("cache")
    await ensure_groups(r, keys)
    known = [
        Rollout(id=f"q-{i}", input_ids=s.rollout.input_ids.copy(), prompt_len=s.rollout.prompt_len,
                policy_version=9, source="student")
        for i, s in enumerate(samples[:20])
    ]  # fmt: skip
    unknown = [
        Rollout(id=f"u-{i}", input_ids=np.arange(i + 3, dtype=np.int32), prompt_len=1) for i in range(3)
    ]
    await add_rollouts(r, keys, [(ro.id, encode_rollout(ro)) for ro in known + unknown])
    procs.spawn("replay", gkd(
        "replay", "--run", "cache", "--redis", redis_url, "--from", str(tmp_path), "--epochs", "0",
        "--serve-rollouts", "--idle-exit-s", "1",
    ))  # fmt: skip
    assert await procs.wait("replay", 60) == 0, procs.tail("replay")
    ready = {f[b"id"].decode(): decode_scored(f[b"data"]) for _, f in await r.xrange(keys.ready.key)}
    assert set(ready) == {ro.id for ro in known}
    for i, s in enumerate(samples[:20]):
        got = ready[f"q-{i}"]
        assert got.rollout.policy_version == 9 and got.teacher == "tch"
        np.testing.assert_array_equal(got.topk_ids, s.topk_ids)
        np.testing.assert_array_equal(got.topk_logprobs, s.topk_logprobs)
    # The three the dataset does not hold wait, released, for a teacher worker.
    assert await r.xlen(keys.rollouts.key) == 3 and await pending(r, keys.rollouts) == 3
    assert (await read_stats(r, keys))[Stat.CACHE_SCORED] == 20


async def test_rollouts_skip_scored_leaves_out_sequences_the_dataset_holds(
    redis_url: str, r: aioredis.Redis, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from pipeline.produce.producer import RolloutSettings, produce
    from pipeline.produce.prompts import load_prompts
    from tests.faults_harness import student_path, write_prompts

    student = student_path()
    prompts = write_prompts(tmp_path / "p.jsonl", 12, seed=4)
    items = load_prompts(prompts, AutoTokenizer.from_pretrained(student))
    scored = []
    for it in items[:8]:
        assert it.completion_ids is not None
        ids = np.array(it.prompt_ids + it.completion_ids, dtype=np.int32)
        rows = len(ids) - len(it.prompt_ids)
        ro = Rollout(id=f"old-{it.index}", input_ids=ids, prompt_len=len(it.prompt_ids))
        lp = np.full((rows, 4), -1.5, dtype=np.float16)
        scored.append(ScoredSample(ro, np.zeros((rows, 4), np.int32), lp, "fake-teacher", 4))
    write(tmp_path / "ds", scored, shard=4)
    keys = RunKeys.for_run("skip")
    await check_run_config(r, keys, {"k": 4, "teacher_model": "fake-teacher"})
    s = RolloutSettings(
        run=RunSettings(name="skip", redis_url=redis_url), prompts=str(prompts), student=student,
        lmbda=0.0, epochs=1, shuffle=False, skip_scored=[str(tmp_path / "ds")],
    )  # fmt: skip
    summary = await produce(s)
    assert summary.produced == 4 and summary.skipped_scored == 8
    got = [decode_rollout_meta(f[b"data"]) for _, f in await r.xrange(keys.rollouts.key)]
    assert got == [8, 9, 10, 11]
    # A run of another teacher must not skip what this teacher scored: refused, naming it.
    other = RunKeys.for_run("other")
    await check_run_config(r, other, {"k": 4, "teacher_model": "bigger"})
    with pytest.raises(DatasetError, match="teacher: dataset has 'fake-teacher', run 'other' has 'bigger'"):
        await produce(dataclasses.replace(s, run=RunSettings(name="other", redis_url=redis_url)))
    assert await r.xlen(other.rollouts.key) == 0


def decode_rollout_meta(data: bytes) -> int:
    from pipeline.wire.codec import decode_rollout

    return int(decode_rollout(data).meta["prompt_index"])
