"""The teacher worker pool against a real Redis and real loopback HTTP teachers.

In-process tests run `TeacherWorker` against a small fake vLLM server (deterministic top-k that the
test can recompute); process tests run `gkd workers` itself. The end-to-end test runs `gkd teacher`
(the reference server on the tiny teacher) and compares the ready stream with torch directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from pipeline.errors import ConfigMismatch
from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.queue.connection import connect
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import check_run_config
from pipeline.queue.schema import RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.score.loop import TeacherWorker
from pipeline.score.options import WorkerOptions
from pipeline.sections import FlowSettings, RunSettings
from pipeline.teacher.config import TeacherConfig
from pipeline.teacher.vllm import render_prompt_logprobs_body
from pipeline.wire.codec import Rollout, decode_scored, encode_rollout
from tests.redis_helpers import read_stats

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1000
K = 4
MODEL = "fake-teacher"
POISON = 999  # a rollout containing this token gets HTTP 400 from the fake teacher


# ------------------------------------------------------------------------------------------ fake teacher


def fake_topk(ids_T: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The fake teacher's distribution: row t (over token t) depends on token t-1 and t; valid logprobs."""
    T = len(ids_T)
    prev_T = np.concatenate([[0], ids_T[:-1]]).astype(np.int64)
    ids_TK = (prev_T[:, None] * 31 + np.arange(T)[:, None] + 7 * np.arange(k)[None, :]) % VOCAB
    logprobs_TK = -(np.arange(k)[None, :] + 1.0) - 0.01 * (np.arange(T)[:, None] % 5)
    return ids_TK.astype(np.int32), logprobs_TK.astype(np.float32)


class FakeTeacher:
    """A vLLM-speaking loopback server. `mode`: "ok" or "down" (HTTP 503); `latency_s` per request."""

    def __init__(self, latency_s: float = 0.0, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.mode = "ok"
        self.latency_s = latency_s
        self.requests = 0
        self.failed = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeTeacher:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.mode == "ok" else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        if self.mode != "ok":
            self.failed += 1
            return web.json_response({"error": {"message": "engine restarting", "code": 503}}, status=503)
        ids_T = np.asarray(body["prompt"], dtype=np.int64)
        if POISON in body["prompt"]:
            msg = f"Token id {POISON} is out of vocabulary"
            err = {"error": {"message": msg, "type": "BadRequestError", "code": 400}}
            return web.json_response(err, status=400)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        ids_TK, lp_TK = fake_topk(ids_T, int(body["prompt_logprobs"]))
        raw = render_prompt_logprobs_body(ids_TK, lp_TK, ids_T, model=MODEL, shuffle_seed=len(ids_T))
        return web.Response(body=raw, content_type="application/json")


@pytest.fixture
async def teacher() -> AsyncIterator[FakeTeacher]:
    t = await FakeTeacher().start()
    yield t
    await t.stop()


# ------------------------------------------------------------------------------------------ helpers


def make_rollout(i: int, T: int = 12, prompt_len: int = 4, poison: bool = False) -> Rollout:
    rng = np.random.default_rng(i)
    ids_T = rng.integers(0, VOCAB - 1, size=T).astype(np.int32)
    if poison:
        ids_T[-1] = POISON
    return Rollout(id=f"r{i}", input_ids=ids_T, prompt_len=prompt_len, policy_version=0, source="dataset")


async def produce(r: aioredis.Redis, keys: RunKeys, rollouts: list[Rollout]) -> None:
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [(ro.id, encode_rollout(ro)) for ro in rollouts])


async def wait_until(pred: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `pred` (sync or async) until truthy; fail naming `what` after `timeout_s` (a bound only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError(f"expected {what} within {timeout_s}s, it did not happen")
        await asyncio.sleep(0.02)


def tconfig(url: str, k: int = K) -> TeacherConfig:
    return TeacherConfig(
        endpoints=[url],
        backend="vllm",
        k=k,
        max_retries=1,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        breaker_reset_s=0.1,
        request_timeout_s=10,
    )


@contextlib.asynccontextmanager
async def running(
    redis_url: str,
    keys: RunKeys,
    url: str,
    name: str = "w0",
    k: int = K,
    *,
    logprob_dtype: str = "float16",
    flow: FlowSettings | None = None,
    **opts: Any,
) -> AsyncIterator[TeacherWorker]:
    """A TeacherWorker running in this event loop; stopped (and awaited) on exit."""
    run = RunSettings(name=keys.run, redis_url=redis_url, k=k, logprob_dtype=logprob_dtype)
    options = WorkerOptions(**{"outage_backoff_s": 0.02, "outage_backoff_max_s": 0.1, **opts})
    worker = TeacherWorker(run, tconfig(url, k), name, flow, options)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def ready_ids(r: aioredis.Redis, keys: RunKeys) -> list[str]:
    return [f[b"id"].decode() for f in await fields(r, keys.ready.key)]


async def dead_entries(r: aioredis.Redis, keys: RunKeys) -> list[dict[bytes, bytes]]:
    return await fields(r, keys.dead.key)


async def fields(r: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    """The field maps of every entry of `stream`, oldest first."""
    rows: Any = await r.xrange(stream)
    return [f for _, f in rows]


def check_sample(data: bytes, rollout: Rollout, dtype: type = np.float16) -> None:
    s = decode_scored(data)
    P = rollout.prompt_len
    ids_TK, lp_TK = fake_topk(rollout.input_ids, K)
    assert s.rollout.id == rollout.id and s.k == K and s.teacher == MODEL
    assert np.array_equal(s.rollout.input_ids, rollout.input_ids) and s.rollout.prompt_len == P
    assert s.topk_ids.shape == (rollout.num_tokens - P, K)
    assert np.array_equal(s.topk_ids, ids_TK[P:])
    assert s.topk_logprobs.dtype == dtype
    np.testing.assert_allclose(s.topk_logprobs.astype(np.float32), lp_TK[P:], atol=2e-3)


# ------------------------------------------------------------------------------------------ in-process


async def test_scores_flow_and_malformed_rollout_goes_to_dead(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    rollouts = [make_rollout(i) for i in range(8)]
    await produce(r, keys, rollouts[:4])
    await add_rollouts(r, keys, [("bad", b"\x93not a rollout")])
    await produce(r, keys, rollouts[4:])
    async with running(redis_url, keys, teacher.url, concurrency=3):
        await wait_until(lambda: _count(r.xlen(keys.ready.key), 8), what="8 ready samples")
    by_id = {ro.id: ro for ro in rollouts}
    ready = await fields(r, keys.ready.key)
    assert sorted(f[b"id"].decode() for f in ready) == sorted(by_id)
    for f in ready:
        check_sample(f[b"data"], by_id[f[b"id"].decode()])
    (dead,) = await dead_entries(r, keys)
    assert dead[b"id"] == b"bad" and dead[b"stage"] == b"decode"
    assert b"msgpack" in dead[b"reason"] and dead[b"data"] == b"\x93not a rollout"
    assert await r.xlen(keys.rollouts.key) == 0
    stats = await read_stats(r, keys)
    assert stats[Stat.SCORED] == 8 and stats[Stat.SCORED_POSITIONS] == 8 * 8
    assert stats[Stat.TEACHER_REQUESTS] >= 8 and stats[Stat.DEAD] == 1


async def _count(n: Any, want: int) -> bool:
    return int(await n) >= want


async def test_rollout_that_cannot_be_re_encoded_is_never_held_forever(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    good = make_rollout(0)
    obj = msgpack.unpackb(encode_rollout(make_rollout(1)), raw=False)
    obj["meta"] = {str(i): 0 for i in range(70_000)}  # decodes; a map this big may not re-encode
    await produce(r, keys, [good])
    await add_rollouts(r, keys, [("r1", msgpack.packb(obj, use_bin_type=True))])
    async with running(redis_url, keys, teacher.url):
        await wait_until(lambda: _count(r.xlen(keys.ready.key), 1), what="the good sample")
        await wait_until(
            lambda: _count(_sum(r.xlen(keys.ready.key), r.xlen(keys.dead.key)), 2), what="the big one settled"
        )
    dead = await dead_entries(r, keys)
    assert sorted(await ready_ids(r, keys) + [d[b"id"].decode() for d in dead]) == ["r0", "r1"]
    assert all(d[b"stage"] == b"encode" and b"cannot encode" in d[b"reason"] for d in dead)
    assert await r.xlen(keys.rollouts.key) == 0


async def _sum(*counts: Any) -> int:
    return sum([int(await c) for c in counts])


async def test_permanent_teacher_error_goes_to_dead_with_reason(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    good = [make_rollout(i) for i in range(3)]
    bad = make_rollout(50, poison=True)
    await produce(r, keys, [*good, bad])
    async with running(redis_url, keys, teacher.url, logprob_dtype="float32"):
        await wait_until(lambda: _count(r.xlen(keys.dead.key), 1), what="a dead letter")
        await wait_until(lambda: _count(r.xlen(keys.ready.key), 3), what="3 ready samples")
    (dead,) = await dead_entries(r, keys)
    assert dead[b"id"] == bad.id.encode() and dead[b"stage"] == b"teacher"
    assert b"TeacherBadRequest" in dead[b"reason"] and b"out of vocabulary" in dead[b"reason"]
    for f in await fields(r, keys.ready.key):
        check_sample(f[b"data"], good[int(f[b"id"][1:])], dtype=np.float32)
    assert teacher.requests == 1 + 4  # the start-up probe, then one request per rollout: no retries


async def test_teacher_outage_keeps_rollouts_and_completes_when_back(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    rollouts = [make_rollout(i) for i in range(6)]
    # Two workers with a short lease: if renewal failed during the outage, one would reclaim the
    # other's rollouts (counted in `reclaimed`) or push them past max_deliveries into `dead`.
    async with (
        running(
            redis_url,
            keys,
            teacher.url,
            "w0",
            flow=FlowSettings(lease_ms=300, max_deliveries=1),
            concurrency=3,
        ),
        running(
            redis_url,
            keys,
            teacher.url,
            "w1",
            flow=FlowSettings(lease_ms=300, max_deliveries=1),
            concurrency=3,
        ),
    ):
        teacher.mode = "down"
        await produce(r, keys, rollouts)
        await wait_until(lambda: teacher.failed >= 30, what="30 failed teacher requests")
        await asyncio.sleep(1.0)  # > 3 leases
        assert await r.xlen(keys.dead.key) == 0 and await r.xlen(keys.ready.key) == 0
        teacher.mode = "ok"
        await wait_until(lambda: _count(r.xlen(keys.ready.key), 6), what="6 ready samples after the outage")
    assert sorted(await ready_ids(r, keys)) == sorted(ro.id for ro in rollouts)
    assert await r.xlen(keys.dead.key) == 0 and await r.xlen(keys.rollouts.key) == 0
    stats = await read_stats(r, keys)
    assert stats.get(Stat.RECLAIMED, 0) == 0 and stats[Stat.TEACHER_ERRORS] > 0


async def test_backpressure_bounds_the_ready_stream(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    high, concurrency, n = 3, 2, 24
    await produce(r, keys, [make_rollout(i) for i in range(n)])
    trainer = StreamConsumer(r, keys.ready, "trainer")
    flow = FlowSettings(high_water=high, low_water=1)
    levels: list[int] = []
    consumed: list[str] = []
    async with running(redis_url, keys, teacher.url, concurrency=concurrency, flow=flow):
        while len(consumed) < n:  # a slow trainer: one sample at a time
            levels.append(await r.xlen(keys.ready.key))
            got = await trainer.read(1, block_ms=50)
            await asyncio.sleep(0.02)
            levels.append(await r.xlen(keys.ready.key))
            assert await trainer.ack(got) == [True] * len(got)
            consumed += [e.id for e in got]
    assert sorted(consumed) == sorted(f"r{i}" for i in range(n))
    assert max(levels) >= high  # the worker did fill up to the mark ...
    assert max(levels) <= high + concurrency  # ... and never beyond it by more than one read batch


async def test_config_mismatch_refuses_to_start_naming_k(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    await check_run_config(r, keys, {"k": K, "teacher_model": MODEL, "logprob_dtype": "float16"})
    with pytest.raises(ConfigMismatch, match=r"k: run has '4', this process has '5'"):
        async with running(redis_url, keys, teacher.url, k=5):
            pass
    assert await r.xlen(keys.rollouts.key) == 0  # nothing was read


async def test_heartbeat_and_metrics_while_running(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    port = free_port()
    await produce(r, keys, [make_rollout(i) for i in range(3)])
    async with running(redis_url, keys, teacher.url, "hb", metrics_port=port, heartbeat_ttl_ms=3000):
        await wait_until(lambda: _count(r.xlen(keys.ready.key), 3), what="3 ready samples")
        beat = await r.hgetall(keys.worker("hb"))
        assert beat[b"role"] == b"worker" and b"in_flight" in beat and b"pid" in beat
        assert 0 < await r.pttl(keys.worker("hb")) <= 3000

        async def has_latency() -> bool:
            return await r.hexists(keys.worker("hb"), "latency_p95_ms")

        await wait_until(has_latency, what="latency percentiles in the heartbeat")
        beat = await r.hgetall(keys.worker("hb"))
        assert 0 < float(beat[b"latency_p50_ms"]) <= float(beat[b"latency_p95_ms"])
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    for name in (
        "gkd_worker_positions_total 24.0",
        "gkd_teacher_request_seconds_bucket",
        "gkd_worker_in_flight",
        "gkd_teacher_retries_total",
        "gkd_worker_dead_lettered_total",
        "gkd_worker_errors_total",
    ):
        assert name in text
    assert f'endpoint="{teacher.url}"' in text
    assert not await r.exists(keys.worker("hb"))  # removed at a clean stop (else it expires by TTL)


# ------------------------------------------------------------------------------------------ processes


def worker_cmd(redis_url: str, teacher_url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workers.cli",
        "workers",
        "--run",
        "test",
        "--redis",
        redis_url,
        "--teacher",
        teacher_url,
        "--backend",
        "vllm",
        "--k",
        str(K),
        *extra,
    ]


@contextlib.asynccontextmanager
async def process(cmd: list[str]) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        env=env_without_proxy(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def test_cli_refuses_a_run_with_another_k(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    await check_run_config(r, keys, {"k": 8, "teacher_model": MODEL, "logprob_dtype": "float16"})
    async with process(worker_cmd(redis_url, teacher.url)) as proc:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, out.decode()
    assert b"k: run has '8', this process has '4'" in out


async def test_sigterm_mid_run_loses_and_duplicates_nothing(
    r: aioredis.Redis, keys: RunKeys, redis_url: str
) -> None:
    secret = "sk-do-not-log-me"
    slow = await FakeTeacher(latency_s=0.2, api_key=secret).start()
    try:
        rollouts = [make_rollout(i) for i in range(60)]
        await produce(r, keys, rollouts)
        cmd = worker_cmd(redis_url, slow.url, "--procs", "2", "--concurrency", "4", "--grace-s", "0.1")
        async with process([*cmd, "--api-key", secret, "--log-level", "debug"]) as proc:
            await wait_until(lambda: _count(r.xlen(keys.ready.key), 6), 60, what="6 ready samples")
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()[-3000:]
        assert secret.encode() not in out and b"released" in out
        done = await ready_ids(r, keys)
        left = [f[b"id"].decode() for f in await fields(r, keys.rollouts.key)]
        assert len(done) == len(set(done)) and not set(done) & set(left)
        assert sorted(done + left) == sorted(ro.id for ro in rollouts) and left  # stopped mid-run
        assert await r.xlen(keys.dead.key) == 0 and not await r.keys(keys.worker("*"))
        # What the stopped pool held was released: a new worker (same 60 s lease) takes it over at
        # once, not after the lease.
        slow.api_key = None
        async with running(redis_url, keys, slow.url, "after", concurrency=16):
            await wait_until(lambda: _count(r.xlen(keys.ready.key), 60), 30, what="all 60 samples")
        done = await ready_ids(r, keys)
        assert sorted(done) == sorted(ro.id for ro in rollouts)
        assert await r.xlen(keys.rollouts.key) == 0
    finally:
        await slow.stop()


# ------------------------------------------------------------------------------------------ end to end


async def wait_http(url: str, proc: asyncio.subprocess.Process, timeout_s: float = 120) -> None:
    async def up() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"teacher server exited with {proc.returncode} before answering")
        try:
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(up, timeout_s, what=f"{url} to answer")


def tiny_rollouts(tokenizer: Any, n: int) -> list[Rollout]:
    """Sentences of the tiny teacher's corpus: prompt = the first words, completion = the rest."""
    from pipeline.local.tiny_models import corpus

    out = []
    for i, line in enumerate(corpus(n, seed=7)):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        prompt_len = len(tokenizer(" ".join(line.split()[:2]), add_special_tokens=False)["input_ids"])
        ids_T = np.asarray(ids, dtype=np.int32)
        out.append(Rollout(id=f"e{i}", input_ids=ids_T, prompt_len=min(prompt_len, len(ids) - 1)))
    return out


async def test_end_to_end_gkd_workers_against_reference_teacher(
    r: aioredis.Redis, keys: RunKeys, redis_url: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.local.tiny_models import tiny_models

    path = str(tiny_models().teacher)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rollouts = tiny_rollouts(tokenizer, 12)
    await produce(r, keys, rollouts)
    k, port = 8, free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = [sys.executable, "-m", "workers.cli", "teacher", "--model", path, "--port", str(port)]
    cmd = worker_cmd(redis_url, url, "--k", str(k), "--logprob-dtype", "float32", "--concurrency", "4")
    # Both start at once: the pool waits for a teacher that is still loading, as in a deployment.
    async with process(server_cmd) as server, process(cmd) as pool:
        await wait_http(url + "/health", server)
        await wait_until(lambda: _count(r.xlen(keys.ready.key), len(rollouts)), 120, what="all samples")
        pool.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(pool.communicate(), 60)
        assert pool.returncode == 0, out.decode()[-3000:]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    by_id = {ro.id: ro for ro in rollouts}
    for f in await fields(r, keys.ready.key):
        s = decode_scored(f[b"data"])
        ro = by_id[s.rollout.id]
        P, T = ro.prompt_len, ro.num_tokens
        with torch.no_grad():
            logits_TV = model(torch.as_tensor(ro.input_ids, dtype=torch.long)[None]).logits[0].float()
        # Row r is the distribution over token P + r, predicted from the logits at position P - 1 + r.
        logprobs_RV = torch.log_softmax(logits_TV[P - 1 : T - 1], dim=-1)
        top_RK = torch.topk(logprobs_RV, k, dim=-1)
        assert s.k == k and s.topk_ids.shape == (T - P, k) and s.topk_logprobs.dtype == np.float32
        got_ids = torch.from_numpy(s.topk_ids.astype(np.int64))  # a copy: decoded arrays are read-only
        # Values at the returned ids are the teacher's (alignment), and they are its top-k (ranking);
        # compared this way, near-ties that swap two ids cannot make the test flaky.
        at_ids_RK = torch.gather(logprobs_RV, 1, got_ids).numpy()
        np.testing.assert_allclose(s.topk_logprobs, at_ids_RK, atol=1e-4)
        np.testing.assert_allclose(s.topk_logprobs, top_RK.values.numpy(), atol=1e-4)
        assert (got_ids == top_RK.indices).float().mean() > 0.95
    assert await r.xlen(keys.dead.key) == 0 and await r.xlen(keys.rollouts.key) == 0


async def test_stale_rollouts_of_a_dead_worker_are_reclaimed_or_dead_lettered(
    r: aioredis.Redis, keys: RunKeys, redis_url: str, teacher: FakeTeacher
) -> None:
    await produce(r, keys, [make_rollout(i) for i in range(4)])
    ghost = StreamConsumer(r, keys.rollouts, "ghost", lease_ms=100)
    taken = await ghost.read(4, block_ms=100)  # a worker that reads, then dies
    assert len(taken) == 4
    await asyncio.sleep(0.15)
    again, _ = await ghost.reclaim(2)  # ... and again for two of them: those are at 2 deliveries now
    assert [e.deliveries for e in again] == [2, 2]
    await asyncio.sleep(0.15)
    async with running(redis_url, keys, teacher.url, flow=FlowSettings(lease_ms=100, max_deliveries=2)):
        await wait_until(lambda: _count(r.xlen(keys.ready.key), 2), what="2 reclaimed samples")
        await wait_until(lambda: _count(r.xlen(keys.dead.key), 2), what="2 dead letters")
    dead = await dead_entries(r, keys)
    assert {d[b"stage"] for d in dead} == {b"teacher"}
    assert all(b"delivered 3 times (max_deliveries=2)" in d[b"reason"] for d in dead)
    assert sorted(await ready_ids(r, keys) + [d[b"id"].decode() for d in dead]) == [f"r{i}" for i in range(4)]
    assert (await read_stats(r, keys))[Stat.RECLAIMED] == 2


async def test_worker_waits_for_redis_and_survives_its_restart(
    keys: RunKeys, redis_url: str, redis_server: Any, teacher: FakeTeacher
) -> None:
    redis_server.stop()  # not up yet when the worker starts
    run = RunSettings(name=keys.run, redis_url=redis_url, k=K)
    worker = TeacherWorker(run, tconfig(teacher.url), "w0", options=WorkerOptions(redis_backoff_max_s=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(0.5)
        assert not worker.started.is_set() and not task.done()
        redis_server.start()
        await asyncio.wait_for(worker.started.wait(), 30)
        client = connect(redis_url)
        await produce(client, keys, [make_rollout(i) for i in range(3)])
        await wait_until(lambda: worker.report.scored == 3, what="3 scored before the restart")
        await client.aclose()
        redis_server.restart(kill=True)  # no persistence: streams and groups are gone
        await asyncio.sleep(0.5)  # the worker meets the dead and then the empty server
        client = connect(redis_url)
        await produce(client, keys, [make_rollout(i) for i in range(3, 6)])
        await wait_until(lambda: _count(client.xlen(keys.ready.key), 3), what="3 samples after the restart")
        assert sorted(await ready_ids(client, keys)) == ["r3", "r4", "r5"]
        await client.aclose()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_bench_worker_runs_and_reports_every_metric() -> None:
    from workers.bench import worker as bench

    args = ["--t", "64", "--k", "4", "--rollouts", "6", "--baseline-rollouts", "2", "--latency-ms", "1"]
    rows = bench.run(args)
    metrics = {row["metric"]: row for row in rows}
    for name in (
        "positions_per_s_k4",
        "cpu_us_per_position_k4",
        "decode_only_cpu_us_per_position_k4",
        "client_parse_cpu_us_per_position_k4",
        "cpu_over_decode_k4",
        "loadavg_1m_max",
    ):
        assert name in metrics
    assert metrics["positions_per_s_k4"]["baseline"] > 0 and metrics["cpu_over_decode_k4"]["value"] > 0
