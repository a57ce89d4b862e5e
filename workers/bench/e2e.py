"""`gkd bench e2e`: the async pipeline against a synchronous fetch-then-train loop (as ms-swift does).

Both sides train the same tiny student on the same rollouts for the same number of optimizer steps,
with the same batches (token budget), loss and learning rate. The teacher is a loopback HTTP server
in its own process that answers each `/v1/completions` after a fixed delay with the real top-k of the
tiny teacher (precomputed before timing): on 2 CPU cores a CPU teacher would fight the trainer for the
same cores, while a remote GPU teacher costs the trainer host nothing but the wait. The delay defaults
to the measured time of one training step, the case where perfect overlap gives 2x.

- sync:  per step, fetch the batch's teacher logprobs, then train. Its fetch has every request of the
         batch in flight at once (ms-swift uses 8 threads; more only favours the baseline), so it
         costs one teacher delay per step.
- async: rollouts in Redis, `gkd workers` and `gkd train` as processes; the trainer prefetches.
Reported: wall-clock seconds per step for both (steps 2..S, so start-up is not counted) and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from workers.bench.cli import result
from workers.bench.worker import run_vllm_app, spawn_teacher

MODEL = "e2e-teacher"


def _key(ids: list[int]) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def serve(argv: list[str]) -> None:
    """Teacher process: `python -m workers.bench.e2e --serve PORT DIR DELAY_MS` (bodies keyed by ids)."""
    import asyncio

    import orjson
    from aiohttp import web

    port, body_dir, delay_s = int(argv[0]), Path(argv[1]), float(argv[2]) / 1000
    bodies = {p.stem: p.read_bytes() for p in body_dir.glob("*.json")}

    async def completions(request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        body = bodies.get(_key(req["prompt"]))
        if body is None:  # the client's start-up probe
            return web.Response(body=_probe_body(len(req["prompt"]), int(req["prompt_logprobs"])),
                                content_type="application/json")  # fmt: skip
        await asyncio.sleep(delay_s)
        return web.Response(body=body, content_type="application/json")

    run_vllm_app(port, completions, MODEL)


def _rollouts(tok: Any, n: int) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) pairs from the embedded corpus: 3-word prompts, the rest as completion."""
    from pipeline.local.tiny_models import corpus

    out = []
    for line in corpus(n, seed=5):
        words = line.split()
        p = tok(tok.bos_token + " ".join(words[:3]), add_special_tokens=False)["input_ids"]
        c = tok(" " + " ".join(words[3:]) + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((p + c, len(p)))
    return out


def _bodies(teacher_path: Path, rollouts: list[tuple[list[int], int]], k: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.teacher.vllm import render_prompt_logprobs_body

    model = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    for ids, _ in rollouts:
        with torch.inference_mode():
            lp_TV = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        # vLLM row i is the distribution of token i given tokens < i: logits at position i - 1.
        lp_TV = torch.cat([torch.zeros_like(lp_TV[:1]), lp_TV[:-1]])
        top = lp_TV.topk(k, dim=-1)
        actual = lp_TV[torch.arange(len(ids)), torch.tensor(ids)]
        body = render_prompt_logprobs_body(
            top.indices.numpy(),
            top.values.numpy(),
            np.asarray(ids),
            actual_logprobs_T=actual.numpy(),
            model=MODEL,
        )
        (out / f"{_key(ids)}.json").write_bytes(body)
    probe_ids = np.arange(4 * k).reshape(4, k)
    probe = render_prompt_logprobs_body(
        probe_ids, -np.tile(np.arange(1.0, k + 1), (4, 1)), probe_ids[:, 0], model=MODEL
    )
    (out / "probe.json").write_bytes(probe)


def _probe_body(t: int, k: int) -> bytes:
    from pipeline.teacher.vllm import render_prompt_logprobs_body

    ids_TK = np.arange(t * k).reshape(t, k)
    return render_prompt_logprobs_body(
        ids_TK, -np.tile(np.arange(1.0, k + 1), (t, 1)), ids_TK[:, 0], model=MODEL
    )


def _start_teacher(body_dir: Path, delay_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_teacher("workers.bench.e2e", [str(body_dir), str(delay_ms)])


class SyncLoop:
    """Fetch the batch's teacher logprobs (8 threads), then one optimizer step: no overlap."""

    def __init__(self, student: Path, url: str, k: int, lr: float, batch_tokens: int, threads: int) -> None:
        import requests
        import torch
        from transformers import AutoModelForCausalLM

        from pipeline.train.optim import build_optimizer, build_scheduler

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(student).train()
        self.opt = build_optimizer(self.model, lr)
        self.sched = build_scheduler(self.opt, 2, 0, "constant")
        self.session = requests.Session()
        self.session.trust_env = False
        self.url, self.k, self.batch_tokens = url, k, batch_tokens
        self.pool = ThreadPoolExecutor(threads)

    def _score(self, item: tuple[list[int], int]) -> Any:
        from pipeline.teacher.vllm import parse_response
        from pipeline.wire.codec import Rollout, ScoredSample

        ids, p = item
        body: dict[str, Any] = {"model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": self.k}
        resp = self.session.post(self.url + "/v1/completions", json=body, timeout=60)
        resp.raise_for_status()
        ids_RK, lp_RK = parse_response(resp.content, len(ids), p, self.k)
        r = Rollout(id=_key(ids), input_ids=np.asarray(ids, dtype=np.int32), prompt_len=p)
        return ScoredSample(r, ids_RK, lp_RK.astype(np.float16), MODEL, self.k)

    def fetch(self, items: list[tuple[list[int], int]]) -> list[Any]:
        """Teacher scores of a whole batch, every request in flight at once (the sync loop's best case)."""
        return list(self.pool.map(self._score, items))

    def train(self, samples: list[Any]) -> None:
        import torch

        from pipeline.train.batching import pack
        from pipeline.train.distill import DistillModule
        from pipeline.train.step import LossConfig, train_step

        micro = pack(samples, self.batch_tokens)
        rows = float(sum(b.num_loss_tokens for b in micro))
        train_step(DistillModule(self.model), micro, global_rows=rows, world_size=1, cfg=LossConfig(),
                   optimizer=self.opt, scheduler=self.sched, device=torch.device("cpu"),
                   want_kl=False)  # fmt: skip


def _per_step(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_async(redis_url: str, url: str, student: Path, rollouts: list[tuple[list[int], int]], a: Any,
              workdir: Path) -> float:  # fmt: skip
    """Seconds per step of `gkd workers` + `gkd train` processes over the same rollouts."""
    import redis

    from pipeline.local.redis_server import env_without_proxy
    from pipeline.queue.schema import RunKeys
    from pipeline.queue.streams import add_rollouts, ensure_groups
    from pipeline.wire.codec import Rollout, encode_rollout

    keys = RunKeys.for_run("bench-e2e")
    client = redis.Redis.from_url(redis_url)
    client.flushall()

    async def fill() -> None:
        from pipeline.queue.connection import connect

        r = connect(redis_url)
        await ensure_groups(r, keys)
        items = [(_key(ids), encode_rollout(Rollout(_key(ids), np.asarray(ids, dtype=np.int32), p)))
                 for ids, p in rollouts]  # fmt: skip
        await add_rollouts(r, keys, items)
        await r.aclose()

    import asyncio

    asyncio.run(fill())
    env = env_without_proxy() | {"GKD_RUN": keys.run, "GKD_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"}
    out = workdir / "async-ckpt"
    metrics = out / "metrics.jsonl"
    cli = [sys.executable, "-m", "workers.cli"]
    logs = {name: (workdir / f"{name}.log").open("wb") for name in ("workers", "trainer")}
    workers = subprocess.Popen([*cli, "workers", "--teacher", url, "--k", str(a.k), "--concurrency", "32"],
                               env=env, stdout=logs["workers"], stderr=subprocess.STDOUT)  # fmt: skip
    trainer = subprocess.Popen(
        [*cli, "train", "--student", str(student), "--k", str(a.k), "--output-dir", str(out),
         "--lr", str(a.lr), "--max-steps", str(a.steps), "--batch-tokens", str(a.batch_tokens),
         "--log-every", "1", "--warmup-steps", "2", "--lr-schedule", "constant",
         "--checkpoint-every", str(a.steps * 10)],
        env=env, stdout=logs["trainer"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    stamps: list[float] = []
    deadline = time.monotonic() + a.timeout_s
    try:
        while trainer.poll() is None or len(stamps) < a.steps:
            if time.monotonic() > deadline:
                break
            n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            stamps += [time.perf_counter()] * (n - len(stamps))
            if trainer.poll() is not None and n == len(stamps):
                break
            time.sleep(0.01)
    finally:
        for p in (trainer, workers):
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=60)
    if len(stamps) < a.steps:
        raise RuntimeError(
            f"async trainer logged {len(stamps)} of {a.steps} steps (exit {trainer.returncode})"
        )
    return _per_step(stamps[1:])


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench e2e")
    p.add_argument("--steps", type=int, default=20, help="trainer steps of each side (default 20)")
    p.add_argument("--k", type=int, default=16, help="teacher top-k (default 16)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="trainer token budget per batch")
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    p.add_argument("--workdir", default=None, help="keep bodies and logs here (default: a temp folder)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up on the async side after this")
    p.add_argument("--delay-ms", type=float, default=0.0, help="teacher delay (0: one measured train step)")
    a = p.parse_args(args)

    from transformers import AutoTokenizer

    from pipeline.local.redis_server import RedisServer
    from pipeline.local.tiny_models import tiny_models

    models = tiny_models()
    tok = AutoTokenizer.from_pretrained(models.student)
    with tempfile.TemporaryDirectory(prefix="gkd-e2e-") as tmp:
        workdir = Path(a.workdir or tmp)
        (workdir / "bodies").mkdir(parents=True, exist_ok=True)
        probe_tokens = sum(len(ids) for ids, _ in _rollouts(tok, 64)) / 64
        per_step = max(1, int(a.batch_tokens // probe_tokens))
        rollouts = _rollouts(tok, per_step * (a.steps + 2))
        _bodies(models.teacher, rollouts, a.k, workdir / "bodies")
        teacher, url = _start_teacher(workdir / "bodies", 0.0)
        try:
            # Measure one training step (no teacher wait) to set the delay, unless given.
            sync = SyncLoop(models.student, url, a.k, a.lr, a.batch_tokens, per_step)
            batches = [rollouts[i * per_step : (i + 1) * per_step] for i in range(a.steps)]
            scored = [sync.fetch(b) for b in batches[:4]]
            sync.train(scored[0])  # warm-up
            t0 = time.perf_counter()
            for samples in scored[1:]:
                sync.train(samples)
            delay_ms = a.delay_ms or (time.perf_counter() - t0) / 3 * 1000
        finally:
            teacher.terminate()
            teacher.wait()
        teacher, url = _start_teacher(workdir / "bodies", delay_ms)
        try:
            sync = SyncLoop(models.student, url, a.k, a.lr, a.batch_tokens, per_step)
            stamps = []
            for b in batches:
                sync.train(sync.fetch(b))
                stamps.append(time.perf_counter())
            sync_s = _per_step(stamps[1:])
            with RedisServer() as redis_server:
                async_s = run_async(redis_server.url, url, models.student, rollouts, a, workdir)
        finally:
            teacher.terminate()
            teacher.wait()
    note = f"loopback teacher with a fixed {delay_ms:.0f} ms delay (as a remote GPU teacher)"
    return [
        result("e2e", "teacher_delay_ms", delay_ms, "ms"),
        result("e2e", "sync_s_per_step", sync_s, "s"),
        result("e2e", "async_s_per_step", async_s, "s", baseline=sync_s, ratio=sync_s / async_s),
        result("e2e", "note: " + note, float(per_step), "rollouts/step"),
    ]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2:])
    else:
        for row in run(sys.argv[1:]):
            print(json.dumps(row))
