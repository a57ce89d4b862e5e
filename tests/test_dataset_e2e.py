"""Score once, train from disk: export -> replay -> train equals training from live scoring.

Real processes throughout (`gkd workers` against a loopback vLLM-protocol teacher, `gkd export`,
`gkd replay`, `gkd train`) and a real Redis. The same rollouts are scored live twice (the teacher is a
deterministic function of the tokens): once straight into a training run, once into a score-only run that
`gkd export` writes to disk. `gkd replay` then feeds the dataset into a third run, trained with the same
settings: the same optimizer steps hold the same sample ids, and every step has the same loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.dataset import manifest as mf
from pipeline.queue.schema import RunKeys
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    gkd,
    procs,
    produce,
    rollouts,
    student_path,
    trained_steps,
    trainer_cmd,
    wait_until,
    worker_cmd,
)

__all__ = ["procs"]
N = 48
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def teacher():  # type: ignore[no-untyped-def]
    fake = await FaultyTeacher(seed=11).start()
    yield fake
    await fake.stop()


async def score_live(
    procs: Procs,
    r: aioredis.Redis,
    url: str,
    run: str,
    teacher: FaultyTeacher,
    items: list[tuple[str, bytes]],
) -> None:
    """The rollouts scored by a real worker into `run`'s ready stream, in produce order (concurrency 1)."""
    keys = RunKeys.for_run(run)
    await produce(r, keys, items)
    procs.spawn(f"worker-{run}", worker_cmd(url, run, [teacher.url], f"w-{run}", concurrency=1))
    await wait_until(
        lambda: _len(r, keys.ready.key, N), 90, f"{run} scored", procs=procs, alive=[f"worker-{run}"]
    )
    # Everything is published (nothing in flight): its graceful stop is tested elsewhere.
    procs.kill9(f"worker-{run}")


async def _len(r: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await r.xlen(stream)) >= n


async def train(procs: Procs, url: str, run: str, out: Path) -> tuple[list[list[str]], list[float]]:
    """A deterministic training run on everything in ready: (ids per step, loss per step)."""
    log = out / "samples.jsonl"
    cmd = trainer_cmd(url, run, student_path(), out, log, checkpoint_every=1000, idle_exit_s=2.0,
                      extra=["--deterministic", "--seed", "3", "--log-every", "1"])  # fmt: skip
    procs.spawn(f"train-{run}", cmd)
    assert await procs.wait(f"train-{run}", 180) == 0, procs.tail(f"train-{run}")
    steps = trained_steps(log)
    ids = [steps[(0, s)] for s in sorted(step for _, step in steps)]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ids, [m["loss"] for m in sorted(metrics, key=lambda m: m["step"])]


async def test_export_replay_train_equals_training_from_live_scoring(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs, teacher: FaultyTeacher
) -> None:
    items = rollouts(N, prefix="e2e", seed=2)
    # Live: scored straight into the training run.
    await score_live(procs, r, redis_url, "live", teacher, items)
    live_ids, live_loss = await train(procs, redis_url, "live", tmp_path / "live")
    # Score once into a run without trainers and keep it on disk.
    await score_live(procs, r, redis_url, "src", teacher, items)
    ds = tmp_path / "ds"
    procs.spawn("export", gkd("export", "--run", "src", "--redis", redis_url, "--out", str(ds),
                              "--shard-samples", "20", "--idle-exit-s", "1"))  # fmt: skip
    assert await procs.wait("export", 60) == 0, procs.tail("export")
    m = mf.load(ds)
    assert (m.samples, m.teacher, m.k, m.logprob_dtype) == (N, teacher.model, 4, "float32")
    assert [s.samples for s in m.shards] == [20, 20, 8]
    # Train from disk: no teacher, no worker.
    procs.spawn("replay", gkd("replay", "--run", "rep", "--redis", redis_url, "--from", str(ds)))
    assert await procs.wait("replay", 60) == 0, procs.tail("replay")
    rep_ids, rep_loss = await train(procs, redis_url, "rep", tmp_path / "rep")

    assert sorted(i for step in rep_ids for i in step) == sorted(rid for rid, _ in items)
    assert rep_ids == live_ids and len(live_ids) >= 3
    assert rep_loss == pytest.approx(live_loss, rel=1e-6, abs=1e-7)
