"""Several named teachers in one run: per-rollout routing, per-teacher outages, run config and figures.

Two loopback teachers (real HTTP servers, tests/teacher_fakes.py) serve different models: each has its
own fixed random distribution table, so a sample scored by the wrong teacher cannot pass the exact
comparison with the teacher it names, which the test computes independently (`FakeTeacher.expected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.errors import SettingsError
from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.local.tiny_models import tiny_models
from pipeline.produce.producer import RolloutSettings, produce
from pipeline.produce.prompts import PromptFileError
from pipeline.queue.runstate import read_config
from pipeline.queue.schema import HB, Config, RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.score.loop import TeacherWorker
from pipeline.score.options import WorkerOptions
from pipeline.score.pool import WorkerSettings, teacher_configs
from pipeline.score.teachers import parse_teachers
from pipeline.sections import FlowSettings, RunSettings
from pipeline.settings import parse
from pipeline.teacher.config import TeacherConfig
from pipeline.wire.codec import Rollout, ScoredSample, decode_scored, encode_rollout
from tests.redis_helpers import read_stats
from tests.teacher_fakes import FakeTeacher
from tests.test_trainer import fill, models, scored, settings  # noqa: F401 -- fixtures and helpers

K = 4
VOCAB = 320  # the tiny student's tokenizer: every token id has its own row in the fake teachers
MODELS = {"math": "math-model", "code": "code-model"}


@pytest.fixture
async def teachers() -> AsyncIterator[dict[str, FakeTeacher]]:
    fakes = {
        name: await FakeTeacher(model=model, seed=i + 1, vocab=VOCAB).start()
        for i, (name, model) in enumerate(MODELS.items())
    }
    yield fakes
    for fake in fakes.values():
        await fake.stop()


def config(url: str, timeout_s: float = 10.0) -> TeacherConfig:
    return TeacherConfig(
        endpoints=[url], backend="vllm", k=K, max_retries=1, backoff_base_s=0.01, backoff_max_s=0.05,
        breaker_failures=2, breaker_reset_s=0.1, request_timeout_s=timeout_s,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running(
    redis_url: str,
    keys: RunKeys,
    fakes: dict[str, FakeTeacher],
    flow: FlowSettings | None = None,
    timeout_s: float = 10.0,
    dtype: str = "float16",
    **opts: Any,
) -> AsyncIterator[TeacherWorker]:
    run = RunSettings(name=keys.run, redis_url=redis_url, k=K, logprob_dtype=dtype)
    options = WorkerOptions(**{"outage_backoff_s": 0.02, "outage_backoff_max_s": 0.2, **opts})
    configs = {n: config(f.url, timeout_s) for n, f in fakes.items()}
    worker = TeacherWorker(run, configs, "w0", flow, options)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_for(pred: Any, what: str, timeout_s: float = 60.0) -> None:
    """Poll the async predicate until true; fail naming `what` after `timeout_s` (a bound only)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"expected {what} within {timeout_s}s, it did not happen")
        await asyncio.sleep(0.02)


async def ready_samples(r: aioredis.Redis, keys: RunKeys) -> list[ScoredSample]:
    rows: Any = await r.xrange(keys.ready.key)
    return [decode_scored(f[b"data"]) for _, f in rows]


def check_scored_by_its_teacher(s: ScoredSample, fakes: dict[str, FakeTeacher]) -> None:
    """The sample's top-k is exactly its named teacher's, and not the other teacher's."""
    name = s.rollout.teacher_name
    assert name in fakes, f"{s.rollout.id}: teacher_name {name!r}"
    own, other = fakes[name], next(f for n, f in fakes.items() if n != name)
    P = s.rollout.prompt_len
    ids_RK, lp_RK = own.expected(s.rollout.input_ids, P, K)
    assert s.teacher == own.model and s.k == K
    assert np.array_equal(s.topk_ids, ids_RK), f"{s.rollout.id}: not {name}'s top-k"
    if s.topk_logprobs.dtype == np.float32:  # bit for bit what the teacher sent
        assert np.array_equal(s.topk_logprobs, lp_RK), f"{s.rollout.id}: not {name}'s logprobs"
    else:  # float16 on the wire
        np.testing.assert_array_equal(s.topk_logprobs, lp_RK.astype(np.float16))
    other_ids, _ = other.expected(s.rollout.input_ids, P, K)
    assert not np.array_equal(other_ids, ids_RK)  # the two teachers differ on every sample here


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def make_rollout(i: int, teacher: str | None, T: int = 10, P: int = 3) -> Rollout:
    ids_T = np.random.default_rng(i).integers(0, VOCAB, size=T).astype(np.int32)
    return Rollout(id=f"r{i}", input_ids=ids_T, prompt_len=P, source="dataset", teacher_name=teacher)


async def add(r: aioredis.Redis, keys: RunKeys, rollouts: list[Rollout]) -> None:
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [(ro.id, encode_rollout(ro)) for ro in rollouts])


# ------------------------------------------------------------------------------------------------ tests


def test_teacher_flags_name_teachers_and_an_unnamed_one_stays_the_default() -> None:
    assert parse_teachers(["http://a:8000", "http://b:8000"]) == {
        "default": ["http://a:8000", "http://b:8000"]
    }
    # --teacher math=http://a:8000,http://b:8000 --teacher code=http://c:8000 (commas and repeats flattened)
    argv = ["--teacher", "math=http://a:8000,http://b:8000", "--teacher", "code=http://c:8000"]
    s = parse(WorkerSettings, argv, prog="gkd workers")
    got = teacher_configs(s)
    assert {n: c.endpoints for n, c in got.items()} == {
        "math": ["http://a:8000", "http://b:8000"], "code": ["http://c:8000"],
    }  # fmt: skip
    assert parse_teachers(["http://d:1", "math=http://a:1"]) == {
        "default": ["http://d:1"],
        "math": ["http://a:1"],
    }
    for bad in (["math=http://a", "math=http://b"], ["bad name=http://a"], ["math="], []):
        with pytest.raises(SettingsError):
            parse_teachers(bad)


async def test_mixed_prompt_file_every_sample_scored_by_the_teacher_it_names(
    redis_url: str, r: aioredis.Redis, keys: RunKeys, tmp_path: Path, teachers: dict[str, FakeTeacher]
) -> None:
    lines = [
        {"prompt": f"Task {i}: add {i} and {i + 1}", "completion": f" It is {2 * i + 1}.", "teacher": name}
        for i, name in enumerate(["math", "code"] * 6)
    ]
    lines += [{"prompt": "Write a loop", "completion": " for x in y: pass"}]  # no key: --teacher code
    prompts = write_jsonl(tmp_path / "mixed.jsonl", lines)
    student = str(tiny_models().student.resolve())
    settings = RolloutSettings(
        run=RunSettings(name=keys.run, redis_url=redis_url, k=K), prompts=prompts, student=student,
        lmbda=0.0, shuffle=False, device="cpu", policy_poll_s=0.0, teacher="code",
    )  # fmt: skip
    async with running(redis_url, keys, teachers, dtype="float32", concurrency=3):
        summary = await produce(settings)
        assert summary.produced == len(lines)
        # Another producer's rollout naming a teacher the run does not have: dead, naming the known ones.
        await add(r, keys, [make_rollout(99, "poetry")])
        # gkd rollouts refuses such lines at start once the workers recorded the run's teachers.
        poetry = write_jsonl(
            tmp_path / "poetry.jsonl", [{"prompt": "A sonnet", "completion": " Shall", "teacher": "poetry"}]
        )
        with pytest.raises(PromptFileError, match=r"teachers \(code,math\), got 'poetry' on lines 1;"):
            await produce(dc_replace(settings, prompts=poetry))

        async def settled() -> bool:
            return await r.xlen(keys.ready.key) == len(lines) and await r.xlen(keys.dead.key) == 1

        await wait_for(settled, "13 samples in ready and 1 in dead")

        async def beating() -> bool:  # the heartbeat has caught up (every third of its TTL)
            got = await r.hget(keys.worker("w0"), HB.per_teacher("code", HB.T_SCORED))
            return got == b"7"

        await wait_for(beating, "the worker's heartbeat with the code teacher's 7 samples")
        beat = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.worker("w0"))).items()}
    samples = await ready_samples(r, keys)
    names = [s.rollout.teacher_name for s in samples]
    assert sorted(names) == ["code"] * 7 + ["math"] * 6
    assert summary.produced == len(lines)  # the refused file added nothing
    for s in samples:
        check_scored_by_its_teacher(s, teachers)
    ((_, dead),) = await r.xrange(keys.dead.key)
    reason = dead[b"reason"].decode()
    assert dead[b"stage"] == b"teacher" and "'poetry'" in reason and "code, math" in reason
    config = await read_config(r, keys)
    assert config[Config.TEACHERS] == "code,math" and config[Config.K] == str(K)
    assert config[Config.teacher_model("math")] == "math-model"
    assert config[Config.teacher_model("code")] == "code-model"
    stats = await read_stats(r, keys)
    per = {n: stats[Stat.per_teacher(n, Stat.SCORED_POSITIONS)] for n in MODELS}
    rows = {n: sum(s.topk_ids.shape[0] for s in samples if s.rollout.teacher_name == n) for n in MODELS}
    assert per == rows and stats[Stat.SCORED_POSITIONS] == sum(rows.values())
    assert beat[HB.TEACHERS] == "code,math"
    assert beat[HB.per_teacher("math", HB.T_MODEL)] == "math-model"
    assert int(beat[HB.per_teacher("math", HB.T_SCORED)]) == 6
    assert beat[HB.per_teacher("math", HB.T_BREAKER)] == "closed"


async def test_run_refuses_a_worker_with_other_teachers(
    redis_url: str, r: aioredis.Redis, keys: RunKeys, teachers: dict[str, FakeTeacher]
) -> None:
    from pipeline.errors import ConfigMismatch

    async with running(redis_url, keys, teachers):
        pass
    with pytest.raises(ConfigMismatch, match="teachers: run has 'code,math'"):
        async with running(redis_url, keys, {"math": teachers["math"]}):
            pass
    swapped = {"math": teachers["code"], "code": teachers["math"]}  # names bound to the other models
    with pytest.raises(ConfigMismatch, match=r"teacher_model\.code: run has 'code-model'"):
        async with running(redis_url, keys, swapped):
            pass


async def status_json(redis_url: str, keys: RunKeys) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.cli", "status", "--run", keys.run, "--redis", redis_url, "--json",
        "--interval-s", "0.3", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env_without_proxy(),
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    rep: dict[str, Any] = json.loads(out)
    return rep


def port_of(url: str) -> int:
    port = urlparse(url).port
    assert port is not None
    return port


async def test_a_killed_teacher_holds_back_only_its_own_rollouts_and_nothing_is_lost(
    redis_url: str, r: aioredis.Redis, keys: RunKeys, teachers: dict[str, FakeTeacher]
) -> None:
    first = [make_rollout(i, ["math", "code"][i % 2]) for i in range(10)]
    later = [make_rollout(i, ["math", "code"][i % 2]) for i in range(10, 50)]
    math = teachers["math"]
    # A short lease and max_deliveries=1: were the waiting rollouts' leases not renewed, they would be
    # taken over (counted in `reclaimed`) or dead-lettered while math is down.
    flow = FlowSettings(lease_ms=300, max_deliveries=1)

    async def ready_n(n: int) -> bool:
        return int(await r.xlen(keys.ready.key)) >= n

    port = free_port()
    async with running(
        redis_url, keys, teachers, flow, concurrency=2, max_held=40, metrics_port=port
    ) as worker:
        await add(r, keys, first)
        await wait_for(lambda: ready_n(10), "the first 10 samples")
        await math.stop()  # killed mid-run
        await add(r, keys, later)

        async def code_done() -> bool:
            got = {s.rollout.id for s in await ready_samples(r, keys)}
            return {ro.id for ro in later if ro.teacher_name == "code"} <= got

        await wait_for(code_done, "every code rollout scored while math is down")
        lane = worker.router.lanes["math"]
        assert lane.down and lane.waiting > 0

        async def code_counted() -> bool:  # counters reach Redis with the worker's heartbeats
            return (await read_stats(r, keys)).get(Stat.per_teacher("code", Stat.SCORED), 0) == 25

        await wait_for(code_counted, "the code teacher's 25 samples counted")
        rep = await status_json(redis_url, keys)  # gkd status --json, in its own process
        math_st, code_st = rep["teachers"]["math"], rep["teachers"]["code"]
        assert math_st["breaker"].startswith("open 1/1 on w0") and math_st["waiting"] > 0
        assert math_st["down_s"] is not None and math_st["errors"] > 0 and math_st["model"] == "math-model"
        assert code_st["breaker"] == "closed" and code_st["waiting"] == 0 and code_st["down_s"] is None
        assert code_st["scored"] == 25 and code_st["scored_positions"] == 7 * 25
        assert code_st["positions_per_s"] == 0  # nothing scored between gkd status's two samples
        assert code_st["latency_p95_ms"] >= code_st["latency_p50_ms"] > 0
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = await resp.text()
        assert 'gkd_teacher_breakers_open{teacher="math"} 1.0' in metrics
        assert 'gkd_teacher_breakers_open{teacher="code"} 0.0' in metrics
        assert 'gkd_teacher_positions_total{teacher="code"} 175.0' in metrics
        assert 'gkd_teacher_waiting{teacher="math"} 0.0' not in metrics
        assert (
            f'gkd_teacher_request_seconds_count{{endpoint="{teachers["code"].url}",teacher="code"}}'
            in metrics
        )
        await asyncio.sleep(1.0)  # > 3 leases with math down
        ready = {s.rollout.id for s in await ready_samples(r, keys)}
        assert not ready & {ro.id for ro in later if ro.teacher_name == "math"}
        assert await r.xlen(keys.dead.key) == 0
        await math.start(port_of(math.url))  # back on its old address
        await wait_for(lambda: ready_n(50), "all 50 samples once math is back")
    samples = await ready_samples(r, keys)
    ledger = sorted(s.rollout.id for s in samples)
    assert ledger == sorted(ro.id for ro in first + later)  # each exactly once
    for s in samples:
        check_scored_by_its_teacher(s, teachers)
    assert await r.xlen(keys.dead.key) == 0 and await r.xlen(keys.rollouts.key) == 0
    stats = await read_stats(r, keys)
    assert stats.get(Stat.RECLAIMED, 0) == 0 and stats[Stat.per_teacher("math", Stat.TEACHER_ERRORS)] > 0
    assert stats.get(Stat.per_teacher("code", Stat.TEACHER_ERRORS), 0) == 0


# ------------------------------------------------------------------------------------------------ trainer


def test_trainer_logs_kl_and_teacher_mass_per_teacher(
    redis_url: str,
    models: tuple[str, str],  # noqa: F811 -- the fixture of tests/test_trainer.py
    scored: list[ScoredSample],  # noqa: F811 -- likewise
    tmp_path: Path,
) -> None:
    from pipeline.train.trainer import train

    # Two teachers: "sharp" sends the tiny teacher's own top-k, "soft" the same rows with a third of the
    # mass (logprobs - ln 3), so both the KL and the teacher mass differ between them.
    samples = []
    for i, s in enumerate(scored[:60]):
        name = ("sharp", "soft")[i % 2]
        lp = s.topk_logprobs if name == "sharp" else (s.topk_logprobs.astype(np.float32) - np.log(3.0))
        ro = dc_replace(s.rollout, teacher_name=name)
        samples.append(dc_replace(s, rollout=ro, topk_logprobs=lp.astype(np.float16)))
    keys = RunKeys.for_run("per-teacher")
    fill(redis_url, keys, samples)
    log_path = tmp_path / "samples.jsonl"
    summary = train(settings(redis_url, keys.run, models[1], tmp_path, max_steps=5, sample_log=str(log_path)))
    assert summary.steps == 5
    by_id = {s.rollout.id: s for s in samples}
    steps = {json.loads(x)["step"]: json.loads(x)["ids"] for x in log_path.read_text().splitlines()}
    for m in summary.history:
        ids = steps[int(m["step"])]
        rows = {"sharp": 0.0, "soft": 0.0}
        mass = {"sharp": 0.0, "soft": 0.0}
        for sid in ids:  # the teacher mass of each teacher's rows in this step, computed from the samples
            s = by_id[sid]
            name = s.rollout.teacher_name
            assert name is not None
            rows[name] += s.topk_ids.shape[0]
            mass[name] += float(np.exp(s.topk_logprobs.astype(np.float64)).sum())
        for name in rows:
            if rows[name]:
                assert m[f"teacher_mass/{name}"] == pytest.approx(mass[name] / rows[name], rel=1e-3)
        # Every row of a step is a KL row here (fewer than kl_rows), so the per-teacher KLs weighted by
        # their rows make the step's KL.
        total = sum(m[f"kl/{n}"] * rows[n] for n in rows if rows[n]) / sum(rows.values())
        assert m["kl"] == pytest.approx(total, rel=1e-4)
    assert any(
        m["kl/soft"] != pytest.approx(m["kl/sharp"], rel=1e-2) for m in summary.history if "kl/soft" in m
    )
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("kl/sharp" in x and "teacher_mass/soft" in x for x in logged)


async def test_export_of_a_run_of_several_teachers_is_refused(
    redis_url: str, r: aioredis.Redis, keys: RunKeys, tmp_path: Path
) -> None:
    from pipeline.queue.runstate import check_run_config
    from tests.test_export_replay import export_cmd

    await check_run_config(r, keys, {Config.K: K, Config.TEACHERS: "code,math"})
    proc = await asyncio.create_subprocess_exec(
        *export_cmd(redis_url, keys.run, tmp_path / "ds", "--idle-exit-s", "1"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env_without_proxy(),
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, out.decode()
    assert "expected a run of one teacher, run 'test' has teachers code,math" in out.decode()
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


async def test_gkd_workers_with_named_teachers_from_toml(
    redis_url: str, r: aioredis.Redis, keys: RunKeys, tmp_path: Path, teachers: dict[str, FakeTeacher]
) -> None:
    import signal

    urls = [f'"{name}={fake.url}"' for name, fake in teachers.items()]
    toml = tmp_path / "gkd.toml"
    toml.write_text(f'[workers]\nteacher = [{", ".join(urls)}]\nbackend = "vllm"\nk = {K}\n')
    rollouts = [make_rollout(i, ["math", "code"][i % 2]) for i in range(8)]
    await add(r, keys, rollouts)
    cmd = [sys.executable, "-m", "workers.cli", "workers", "--run", keys.run, "--redis", redis_url,
           "--config", str(toml), "--name", "cli"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env_without_proxy()
    )
    try:

        async def all_ready() -> bool:
            return int(await r.xlen(keys.ready.key)) == 8

        await wait_for(all_ready, "8 samples scored by the gkd workers process")
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode()[-2000:]
    assert "teachers code=code-model, math=math-model" in out.decode()
    for s in await ready_samples(r, keys):
        check_scored_by_its_teacher(s, teachers)
    assert (await read_config(r, keys))[Config.TEACHERS] == "code,math"


async def test_a_slow_teacher_holds_back_only_its_own_rollouts(
    redis_url: str, r: aioredis.Redis, keys: RunKeys, teachers: dict[str, FakeTeacher]
) -> None:
    math = teachers["math"]
    rollouts = [make_rollout(i, ["math", "code"][i % 2]) for i in range(40)]
    code_ids = {ro.id for ro in rollouts if ro.teacher_name == "code"}
    # A request timeout far above the test: math stays slow, not down (its breaker stays closed).
    async with running(
        redis_url, keys, teachers, None, 300.0, concurrency=2, max_held=40, grace_s=0.5
    ) as worker:
        math.slow_s, math.mode = 600.0, "slow"  # after its start-up probe: math's requests now hang
        await add(r, keys, rollouts)

        async def code_done() -> bool:
            return {s.rollout.id for s in await ready_samples(r, keys)} == code_ids

        await wait_for(code_done, "every code rollout scored while math's requests hang")
        lane = worker.router.lanes["math"]
        # math has its 2 requests in flight; its other rollouts wait for a slot, not the read loop.
        assert lane.client.in_flight() == 2 and lane.waiting == 18 and not lane.down
    # Stopped: the hanging math rollouts were handed back, none dead, none lost.
    assert await r.xlen(keys.ready.key) == 20 and await r.xlen(keys.dead.key) == 0
    assert await r.xlen(keys.rollouts.key) == 20
    assert (await r.xpending(keys.rollouts.key, "teachers"))["pending"] == 20  # released, reclaimable now
