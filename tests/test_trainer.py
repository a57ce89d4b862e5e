"""`gkd train` on the tiny student with ready samples scored by the tiny teacher (top-k computed in torch).

Covers: the KL to the teacher falls; SIGTERM then --resume gives the batches and weights of an
uninterrupted run; samples a checkpoint lists as included but unjournaled are settled on resume; trained
samples leave ready after their step (the journal keeps their rollouts until a checkpoint); staleness
counts optimizer steps; SIGTERM checkpoints and exits 0; two torchrun ranks train on disjoint samples.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load_file

from pipeline.errors import ConfigMismatch, SettingsError
from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.local.tiny_models import corpus, tiny_models
from pipeline.queue.connection import connect
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import check_run_config
from pipeline.queue.schema import TRAINERS_GROUP, RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.sections import RunSettings
from pipeline.settings import ENV_PREFIX, changed, to_argv
from pipeline.train import checkpoint as ckpt
from pipeline.train.batching import pack
from pipeline.train.export import gather_full_state, model_shell, write_export
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.settings import TrainSettings
from pipeline.train.trainer import train
from pipeline.wire.codec import (
    META_RETRAIN_OF_STEP,
    Rollout,
    ScoredSample,
    decode_rollout,
    encode_rollout,
    encode_scored,
)

ROOT = Path(__file__).resolve().parents[1]
K = 16
PROMPT_LEN = 3


@pytest.fixture(scope="module")
def models() -> tuple[str, str]:
    tm = tiny_models()
    return str(tm.teacher.resolve()), str(tm.student.resolve())


@pytest.fixture(scope="module")
def scored(models: tuple[str, str]) -> list[ScoredSample]:
    """600 corpus sentences (BOS + text + EOS) with the tiny teacher's top-k of every completion token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    teacher = AutoModelForCausalLM.from_pretrained(models[0]).eval()
    seqs = [[tok.bos_token_id, *tok(s)["input_ids"], tok.eos_token_id] for s in corpus(600, seed=7)]
    t_max = max(map(len, seqs))
    ids_BT = torch.tensor([s + [tok.pad_token_id] * (t_max - len(s)) for s in seqs])
    attn_BT = torch.tensor([[1] * len(s) + [0] * (t_max - len(s)) for s in seqs])
    with torch.no_grad():
        logp_BTV = torch.log_softmax(teacher(input_ids=ids_BT, attention_mask=attn_BT).logits.float(), -1)
    out = []
    for i, s in enumerate(seqs):
        lp_RK, ids_RK = logp_BTV[i, PROMPT_LEN - 1 : len(s) - 1].topk(K, -1)  # row r: token PROMPT_LEN + r
        ro = Rollout(id=f"s{i:03d}", input_ids=np.array(s, dtype=np.int32), prompt_len=PROMPT_LEN)
        out.append(ScoredSample(ro, ids_RK.int().numpy(), lp_RK.numpy().astype(np.float16), "tiny", K))
    return out


async def _fill(url: str, keys: RunKeys, samples: Sequence[ScoredSample]) -> None:
    """Put samples into `ready` the way the worker pool does: add rollouts, then hand them off scored."""
    r = connect(url)
    try:
        await ensure_groups(r, keys)
        await add_rollouts(r, keys, [(s.rollout.id, encode_rollout(s.rollout)) for s in samples])
        c = StreamConsumer(r, keys.rollouts, "filler")
        by_id = {s.rollout.id: s for s in samples}
        left = len(samples)
        while left:
            got = await c.read(left, block_ms=100)
            await c.handoff(keys.ready, [(e, encode_scored(by_id[e.id]), 1) for e in got])
            left -= len(got)
    finally:
        await r.aclose()


def fill(url: str, keys: RunKeys, samples: Sequence[ScoredSample]) -> None:
    asyncio.run(_fill(url, keys, samples))


def settings(url: str, run: str, student: str, out: Path, **kw: Any) -> TrainSettings:
    base: dict[str, Any] = {
        "run": RunSettings(name=run, redis_url=url, k=K, loss_mode=kw.pop("loss_mode", "tail")),
        "student": student,
        "output_dir": str(out),
        "lr": 1e-2,
        "warmup_steps": 3,
        "batch_tokens": 160,
        "grad_accum": 1,
        "beta": 0.5,
        "device": "cpu",
        "log_every": 1,
        "checkpoint_every": 1000,
        "idle_exit_s": 1.0,
    }
    base.update(kw)
    return TrainSettings(**base)


def read_stats(r: redis.Redis, keys: RunKeys) -> dict[str, int]:
    raw: dict[Any, Any] = r.hgetall(keys.stats)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_of(samples: Sequence[ScoredSample], batch_tokens: int, grad_accum: int) -> list[list[str]]:
    """The sample ids of each optimizer step when `samples` arrive in this order (greedy packing)."""
    micro = pack(samples, batch_tokens)
    return [
        [i for b in micro[j : j + grad_accum] for i in b.sample_ids] for j in range(0, len(micro), grad_accum)
    ]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def spawn(
    procs: list[subprocess.Popen[bytes]], args: list[str], log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = env_without_proxy()
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})})
    with open(log, "ab") as fh:
        p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def gkd_train(s: TrainSettings) -> list[str]:
    return [sys.executable, "-m", "workers.cli", "train", *to_argv(s)]


def wait_for(pred, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def write_checkpoint(out: Path, student: str, step: int, entries: dict[str, list[tuple[str, int]]]) -> None:
    """A checkpoint of the untrained student at `step` (policy version `step`) listing `entries`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    opt = build_optimizer(model, 1e-2)
    state = ckpt.TrainState(step=step, policy_version=step, entries=entries)
    path = ckpt.save_checkpoint(
        out,
        model=model,
        optimizer=opt,
        scheduler=build_scheduler(opt, 3, 0),
        state=state,
        rng_states=[ckpt.capture_rng()],
    )
    write_export(model_shell(model), None, gather_full_state(model), path)


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- tests


def test_training_lowers_kl_to_the_teacher(
    redis_url: str, models: tuple[str, str], scored: list[ScoredSample], tmp_path: Path
) -> None:
    keys = RunKeys.for_run("kl")
    fill(redis_url, keys, scored[:480])
    summary = train(settings(redis_url, "kl", models[1], tmp_path, max_steps=80, checkpoint_every=40))
    kl = [h["kl"] for h in summary.history]
    assert summary.steps == 80 and len(kl) == 80
    first, last = float(np.mean(kl[:10])), float(np.mean(kl[-10:]))
    assert last < 0.5 * first, (first, last)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 81)
    )
    r = redis.Redis.from_url(redis_url)
    stats = read_stats(r, keys)
    assert stats[Stat.TRAINER_STEPS] == 80 and stats[Stat.TRAINED_SAMPLES] == summary.samples
    # Trained samples were acknowledged (deleted) at the final checkpoint; the rest still wait.
    assert r.xlen(keys.ready.key) == 480 - summary.samples
    assert r.xpending(keys.ready.key, TRAINERS_GROUP)["pending"] <= r.xlen(keys.ready.key)  # read ahead, held
    version, path = r.hget(keys.policy, "version"), r.hget(keys.policy, "checkpoint")
    assert version == b"80" and isinstance(path, bytes) and Path(path.decode()).name == "step-00000080"


def test_sigterm_then_resume_matches_an_uninterrupted_run(
    redis_url: str,
    models: tuple[str, str],
    scored: list[ScoredSample],
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Stopped (SIGTERM: checkpoint, exit 0) and resumed with the rest of the data, a run sees the same
    batches and ends with the same weights as an uninterrupted one. (A kill -9 costs the steps since the
    last checkpoint: they are scored and trained again later, in another order; see test_faults_trainer.)"""
    common = {
        "batch_tokens": 120,
        "grad_accum": 2,
        "checkpoint_every": 3,
        "deterministic": True,
        "num_threads": 1,
        "seed": 3,
        "max_steps": 12,
        "idle_exit_s": 0.0,
    }
    steps = steps_of(scored, 120, 2)[:12]
    samples = scored[: sum(map(len, steps))]
    prefix = sum(map(len, steps[:8]))  # the stopped run first sees 8 steps' worth, so it cannot finish

    # Uninterrupted, in process.
    fill(redis_url, RunKeys.for_run("a"), samples)
    try:
        full = train(settings(redis_url, "a", models[1], tmp_path / "a", **common))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(os.cpu_count() or 1)
    assert full.steps == 12 and full.checkpoint is not None

    # Stopped by SIGTERM somewhere after step 4, then resumed with the rest of the data.
    keys = RunKeys.for_run("b")
    fill(redis_url, keys, samples[:prefix])
    ledger = tmp_path / "b-samples.jsonl"
    s = settings(redis_url, "b", models[1], tmp_path / "b", sample_log=str(ledger), **common)
    first = spawn(procs, gkd_train(s), tmp_path / "b1.log")
    wait_for(lambda: any(x["step"] >= 4 for x in read_log(ledger)), 120, "step 4 of the first run", first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0, (tmp_path / "b1.log").read_text()[-3000:]
    latest = ckpt.latest_checkpoint(tmp_path / "b")
    assert latest is not None and ckpt.read_state(latest).step == read_log(ledger)[-1]["step"]
    fill(redis_url, keys, samples[prefix:])
    s.resume = True
    second = spawn(procs, gkd_train(s), tmp_path / "b2.log")
    assert second.wait(180) == 0, (tmp_path / "b2.log").read_text()[-3000:]

    final = ckpt.latest_checkpoint(tmp_path / "b")
    assert final is not None and ckpt.read_state(final).step == 12
    a, b = weights(full.checkpoint), weights(final)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    log = read_log(ledger)
    assert [x["step"] for x in log] == list(range(1, 13)) and [x["ids"] for x in log] == steps
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(keys.ready.key) == 0 and r.xpending(keys.ready.key, TRAINERS_GROUP)["pending"] == 0
    assert r.xlen(keys.journal.key) == 0  # the final checkpoint includes every step: nothing journaled


def test_resume_acknowledges_what_the_checkpoint_includes(
    redis_url: str, models: tuple[str, str], scored: list[ScoredSample], tmp_path: Path
) -> None:
    """A crash after the checkpoint was written but before its samples were acknowledged."""
    keys = RunKeys.for_run("ack")
    samples = scored[:40]
    fill(redis_url, keys, samples)

    async def read_as_trainer(n: int) -> list[tuple[str, int, str]]:
        r = connect(redis_url)
        got = await StreamConsumer(r, keys.ready, "trainer-0").read(n, block_ms=100)
        await r.aclose()
        return [(e.sid.decode(), len(e.data), e.id) for e in got]

    included = asyncio.run(read_as_trainer(15))  # trained into step 5 by the process that crashed
    write_checkpoint(tmp_path, models[1], 5, {"trainer-0": [(s, n) for s, n, _ in included]})
    ledger = tmp_path / "samples.jsonl"
    summary = train(settings(redis_url, "ack", models[1], tmp_path, resume=True, sample_log=str(ledger)))
    trained = [i for x in read_log(ledger) for i in x["ids"]]
    assert sorted(trained) == sorted(s.rollout.id for s in samples[15:])
    assert summary.steps > 5 and min(int(x["step"]) for x in read_log(ledger)) == 6
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(keys.ready.key) == 0
    stats = read_stats(r, keys)
    assert stats[keys.ready.bytes_out] == stats[keys.ready.bytes_in]


def test_stale_samples_are_skipped_and_unusable_ones_dead_lettered(
    redis_url: str, models: tuple[str, str], scored: list[ScoredSample], tmp_path: Path
) -> None:
    keys = RunKeys.for_run("stale")
    samples = []
    for i, s in enumerate(scored[:24]):
        # Versions 0-5 are more than 20 steps behind the resumed step 30 (stale), 36-41 are not; 1 and
        # 13 are stale student rollouts put back by a resume (retrain_of_step): they train anyway.
        v = i % 12 if i % 12 < 6 else 30 + i % 12
        meta = {META_RETRAIN_OF_STEP: 33} if i in (1, 13) else {}
        ro = replace(s.rollout, policy_version=v, source="student" if i < 20 else "dataset", meta=meta)
        samples.append(replace(s, rollout=ro))
    for s in scored[24:26]:  # scored with another k than the run's
        samples.append(
            replace(s, topk_ids=s.topk_ids[:, :8].copy(), topk_logprobs=s.topk_logprobs[:, :8].copy(), k=8)
        )
    fill(redis_url, keys, samples)
    write_checkpoint(tmp_path, models[1], 30, {})  # resumes at step 30
    ledger = tmp_path / "samples.jsonl"
    train(
        settings(
            redis_url, "stale", models[1], tmp_path, resume=True, max_staleness=20, sample_log=str(ledger)
        )
    )
    # Student samples of versions < 30 - 20 are stale, unless retrained; dataset samples never are.
    stale = {s.rollout.id for s in samples[:20] if s.rollout.policy_version < 6 and not s.rollout.meta}
    trained = [i for x in read_log(ledger) for i in x["ids"]]
    assert sorted(trained) == sorted(s.rollout.id for s in samples[:24] if s.rollout.id not in stale)
    r = redis.Redis.from_url(redis_url)
    assert read_stats(r, keys)[Stat.STALE_SKIPPED] == len(stale) == 10
    dead: Any = r.xrange(keys.dead.key)
    assert [f[b"id"].decode() for _, f in dead] == [s.rollout.id for s in samples[24:]]
    assert all(f[b"stage"] == b"trainer" and b"k mismatch" in f[b"reason"] for _, f in dead)
    assert r.xlen(keys.ready.key) == 0


def test_a_trainer_with_another_k_is_refused(redis_url: str, models: tuple[str, str], tmp_path: Path) -> None:
    asyncio.run(_check_config(redis_url, RunKeys.for_run("cfg"), {"k": 20, "loss_mode": "tail"}))
    with pytest.raises(ConfigMismatch, match="k: run has '20', this process has '16'"):
        train(settings(redis_url, "cfg", models[1], tmp_path))


async def _check_config(url: str, keys: RunKeys, values: dict[str, object]) -> None:
    r = connect(url)
    await check_run_config(r, keys, values)
    await r.aclose()


def test_tensorboard_without_the_package_is_a_clear_error(
    redis_url: str, models: tuple[str, str], tmp_path: Path
) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    with pytest.raises(SettingsError, match="needs the `tensorboard` package"):
        train(settings(redis_url, "tb", models[1], tmp_path, tensorboard_dir=str(tmp_path / "tb")))


def test_sigterm_checkpoints_acknowledges_and_exits_0(
    redis_url: str,
    models: tuple[str, str],
    scored: list[ScoredSample],
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    keys = RunKeys.for_run("term")
    fill(redis_url, keys, scored[:60])
    ledger = tmp_path / "samples.jsonl"
    s = settings(redis_url, "term", models[1], tmp_path, idle_exit_s=0.0, sample_log=str(ledger))
    p = spawn(procs, gkd_train(s), tmp_path / "train.log")
    wait_for(lambda: bool(read_log(ledger)), 120, "a first step", p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0, (tmp_path / "train.log").read_text()[-3000:]
    latest = ckpt.latest_checkpoint(tmp_path)
    log = read_log(ledger)
    assert latest is not None and ckpt.read_state(latest).step == log[-1]["step"]
    trained = sum(len(x["ids"]) for x in log)
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(keys.ready.key) == 60 - trained  # trained ones acknowledged (deleted), the rest wait
    assert r.hget(keys.policy, "version") == str(log[-1]["step"]).encode()


def test_trained_samples_leave_ready_after_their_step_and_the_checkpoint_trims_the_journal(
    redis_url: str, models: tuple[str, str], scored: list[ScoredSample], tmp_path: Path
) -> None:
    """Between checkpoints Redis keeps only the compact rollouts of trained samples (the journal), not
    their scored payloads; the checkpoint then drops those too."""
    keys = RunKeys.for_run("journal")
    fill(redis_url, keys, scored[:30])
    ledger = tmp_path / "samples.jsonl"
    s = settings(redis_url, "journal", models[1], tmp_path, idle_exit_s=0.0, sample_log=str(ledger))
    stop = threading.Event()
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(train(s, stop)))
    thread.start()
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: r.xlen(keys.ready.key) == 0 and r.xlen(keys.journal.key) == 30, 60, "30 journaled")
        assert thread.is_alive() and not done  # still running (waiting for data), no checkpoint yet
        assert ckpt.latest_checkpoint(tmp_path) is None
        journal: Any = r.xrange(keys.journal.key)
        by_id = {x.rollout.id: x for x in scored[:30]}
        steps = {int(x["step"]): x["ids"] for x in read_log(ledger)}
        for _, f in journal:  # the rollout as it was scored, and the step that trained it
            rid = f[b"id"].decode()
            ro = decode_rollout(f[b"data"])
            assert ro.id == rid and (ro.input_ids == by_id[rid].rollout.input_ids).all()
            assert rid in steps[int(f[b"step"])] and f[b"consumer"] == b"trainer-0"
        stats = read_stats(r, keys)
        held = stats[keys.journal.bytes_in] - stats.get(keys.journal.bytes_out, 0)
        assert held == sum(len(f[b"data"]) for _, f in journal)
        assert stats[keys.ready.bytes_out] == stats[keys.ready.bytes_in]  # every scored payload left
    finally:
        stop.set()  # while the prefetcher waits on an empty stream: the trainer must end promptly
        thread.join(20)
    assert not thread.is_alive(), "the trainer did not stop within 20 s"
    assert done and done[0].samples == 30 and done[0].checkpoint is not None
    assert r.xlen(keys.journal.key) == 0  # the final checkpoint includes every step


def test_trainer_carries_on_through_a_redis_outage(
    models: tuple[str, str], scored: list[ScoredSample], tmp_path: Path
) -> None:
    server = RedisServer(appendonly=True, appendfsync="always").start()  # the group survives a restart
    try:
        keys = RunKeys.for_run("outage")
        fill(server.url, keys, scored[:40])
        ledger = tmp_path / "samples.jsonl"
        s = settings(
            server.url,
            "outage",
            models[1],
            tmp_path,
            idle_exit_s=4.0,
            sample_log=str(ledger),
        )
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(train(s)))
        thread.start()
        try:
            trained = lambda: [i for x in read_log(ledger) for i in x["ids"]]  # noqa: E731
            wait_for(lambda: len(trained()) == 40, 60, "the first 40 samples")
            server.restart()
            fill(server.url, keys, scored[40:80])
        finally:
            thread.join(120)
        assert done and not thread.is_alive()
        assert sorted(trained()) == sorted(x.rollout.id for x in scored[:80])
        r = redis.Redis.from_url(server.url)
        assert r.xlen(keys.ready.key) == 0 and read_stats(r, keys)[Stat.TRAINED_SAMPLES] == 80
    finally:
        server.cleanup()


def test_two_torchrun_ranks_train_on_disjoint_samples(
    redis_url: str,
    models: tuple[str, str],
    scored: list[ScoredSample],
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    keys = RunKeys.for_run("ddp")
    samples = scored[:200]
    fill(redis_url, keys, samples)
    ledger = tmp_path / "samples.jsonl"
    s = settings(
        redis_url,
        "ddp",
        models[1],
        tmp_path,
        sample_log=str(ledger),
        num_threads=1,
        idle_exit_s=1.5,
        checkpoint_every=5,
    )
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "workers.cli",
        "train",
    ]
    p = spawn(
        procs,
        args,
        tmp_path / "torchrun.log",
        {ENV_PREFIX + k.upper(): str(v) for k, v in changed(s).items()},
    )
    assert p.wait(240) == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
    log = read_log(ledger)
    by_rank: dict[int, list[str]] = {0: [], 1: []}
    for x in log:
        by_rank[int(x["rank"])] += x["ids"]
    assert by_rank[0] and by_rank[1]
    assert not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == sorted(x.rollout.id for x in samples)
    # Both ranks took every optimizer step together (DDP), and rank 0 wrote the final checkpoint.
    steps = {rank: [x["step"] for x in log if x["rank"] == rank] for rank in (0, 1)}
    last = max(max(v) for v in steps.values() if v)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and ckpt.read_state(latest).step == last
    assert ckpt.read_state(latest).entries == {}  # both ranks journaled every step before it was written
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(keys.ready.key) == 0 and r.xlen(keys.journal.key) == 0
    assert int(r.hget(keys.stats, Stat.TRAINED_SAMPLES) or 0) == 200
    assert int(r.hget(keys.stats, Stat.TRAINER_STEPS) or 0) == last
