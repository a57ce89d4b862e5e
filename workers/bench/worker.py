"""`gkd bench worker`: the teacher worker pool against an ms-swift-style blocking baseline.

Setup, the same for both sides: a loopback vLLM-format teacher in its own process (so its CPU is not
counted) answers every `/v1/completions` with a body prebuilt once per k (T = 2048 positions, top-k of
a real log-softmax, the actual token appended as entry k+1 where it is outside the top-k, like vLLM),
after a fixed latency. A private redis-server holds the run.

- worker:   `TeacherWorker` in this process (concurrency 64): Redis rollouts -> teacher -> ScoredSamples
            in the ready stream, the whole pipeline including the atomic handoffs.
- baseline: modeled on ms-swift's `fetch_teacher_logprobs` (PR #7918): blocking `requests` posts from a
            ThreadPoolExecutor of 8, `Response.json()`, a Python sort of each position's dict, and
            per-element writes into a [B, T-1, k] torch tensor. One call on `--baseline-rollouts` (8:
            one batch that fills its 8 threads; it is CPU-bound, so more would not raise its rate),
            with no Redis work at all.
- decode:   `orjson.loads` of the same body alone: the floor for any client of this JSON format.

Reported per k: positions/s (worker vs baseline), process CPU microseconds per position (both), CPU
us/position of the decode alone and the worker's CPU over it, and (to locate the cost) CPU us/position
of the teacher client's parse alone (decode + validation + top-k arrays, no HTTP or Redis), of vLLM
JSON and of the reference server's binary response with the same numbers.
Targets: >= 10x the baseline's positions/s; worker CPU per position below the decode alone; client
parse <= 8 us/position at k = 20 and <= 20 at k = 64 from vLLM JSON, <= 2 from the binary response.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from workers.bench.cli import result

VOCAB = 151_936  # a modern tokenizer's size: most token-id keys have 6 digits, as in real bodies
CANDIDATES = 4096  # tokens with non-negligible probability; the bench distributions live on these
MODEL = "bench-teacher"


# ---------------------------------------------------------------------------------------------- bodies


def _candidates(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(VOCAB)[:CANDIDATES]


def bench_ids(t: int, seed: int = 0) -> np.ndarray:
    """The token ids of every bench rollout (int32 [T]), drawn from the candidate tokens."""
    return _candidates()[np.random.default_rng(seed + 1).integers(0, CANDIDATES, size=t)].astype(np.int32)


def build_body(ids_T: np.ndarray, k: int, seed: int = 1) -> bytes:
    """A vLLM `/v1/completions` body for `ids_T` with top-`k` prompt logprobs, as vLLM would send it:
    row t is the top-k of a random log-softmax (normalized over the candidates, so it sums below 1
    over the vocabulary), plus the actual token t as entry k+1 when it is outside the top-k."""
    from pipeline.teacher.vllm import render_prompt_logprobs_body

    rng = np.random.default_rng(seed)
    cand = _candidates()
    slot_of = {int(tok): i for i, tok in enumerate(cand)}
    T = ids_T.shape[0]
    logits_TC = rng.standard_normal((T, CANDIDATES), dtype=np.float32) * 3.0
    logits_TC -= np.log(np.exp(logits_TC).sum(axis=1, keepdims=True))  # log-softmax
    top_TK = np.argpartition(-logits_TC, k, axis=1)[:, :k]
    order_TK = np.argsort(-np.take_along_axis(logits_TC, top_TK, axis=1), axis=1)
    top_TK = np.take_along_axis(top_TK, order_TK, axis=1)
    lp_TK = np.take_along_axis(logits_TC, top_TK, axis=1)
    actual_T = logits_TC[np.arange(T), [slot_of[int(t)] for t in ids_T]]
    return render_prompt_logprobs_body(cand[top_TK], lp_TK, ids_T, actual_logprobs_T=actual_T, model=MODEL)


# ---------------------------------------------------------------------------------------------- teacher


def serve(argv: list[str]) -> None:
    """The fake teacher process: `python -m workers.bench.worker --serve PORT DIR LATENCY_MS T`."""
    from aiohttp import web

    port, body_dir, latency_s, t = int(argv[0]), Path(argv[1]), float(argv[2]) / 1000, int(argv[3])
    bodies = {int(p.stem.split("_k")[1]): p.read_bytes() for p in body_dir.glob("body_k*.json")}

    async def completions(request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        k = int(req.get("prompt_logprobs") or 0)
        if k not in bodies or len(req["prompt"]) != t:  # the client's start-up probe, or a bad k
            return web.Response(body=_small_body(len(req["prompt"]), k), content_type="application/json")
        await asyncio.sleep(latency_s)
        return web.Response(body=bodies[k], content_type="application/json")

    run_vllm_app(port, completions, MODEL)


def run_vllm_app(port: int, completions: Any, model: str, max_body: int = 64 * 1024 * 1024) -> None:
    """Serve `completions` as POST /v1/completions, plus /v1/models (`model`) and /health, on loopback."""
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        from pipeline.teacher.vllm import models_body

        return web.json_response(models_body(model))

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application(client_max_size=max_body)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _small_body(t: int, k: int) -> bytes:
    from pipeline.teacher.vllm import render_prompt_logprobs_body

    ids_TK = np.arange(t * k, dtype=np.int64).reshape(t, k)
    lp_TK = -np.tile(np.arange(1, k + 1, dtype=np.float32), (t, 1))
    return render_prompt_logprobs_body(ids_TK, lp_TK, ids_TK[:, 0], model=MODEL)


def start_teacher(body_dir: Path, latency_ms: float, t: int) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_teacher("workers.bench.worker", [str(body_dir), str(latency_ms), str(t)])


def spawn_teacher(module: str, args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m MODULE --serve PORT ARGS...` on a free port; return it once /health answers."""
    import requests

    from pipeline.local.redis_server import env_without_proxy, free_port

    port = free_port()
    cmd = [sys.executable, "-m", module, "--serve", str(port), *args]
    proc = subprocess.Popen(cmd, env=env_without_proxy(), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=1, proxies={"http": "", "https": ""}).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"bench teacher on {url} did not answer /health within 60 s")


# ---------------------------------------------------------------------------------------------- sides


def cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_worker(
    redis_url: str, url: str, ids_T: np.ndarray | list[np.ndarray], n: int, k: int, concurrency: int
) -> tuple[float, float]:
    """(wall s, CPU s) for the worker to move `n` rollouts from Redis through the teacher to ready.
    `ids_T`: the tokens of every rollout, or a list of them (rollout i gets entry i modulo its length)."""
    from pipeline.queue.connection import connect
    from pipeline.queue.streams import add_rollouts, ensure_groups
    from pipeline.score.loop import TeacherWorker
    from pipeline.score.options import WorkerOptions
    from pipeline.sections import FlowSettings, RunSettings
    from pipeline.teacher.config import TeacherConfig
    from pipeline.wire.codec import Rollout, encode_rollout

    run = RunSettings(name=f"bench-k{k}", redis_url=redis_url, k=k)
    keys = run.keys
    r = connect(redis_url)
    await ensure_groups(r, keys)
    tokens = ids_T if isinstance(ids_T, list) else [ids_T]
    payloads = [
        (f"b{i}", encode_rollout(Rollout(f"b{i}", tokens[i % len(tokens)], prompt_len=1))) for i in range(n)
    ]
    config = TeacherConfig(endpoints=[url], backend="vllm", k=k, per_endpoint_concurrency=concurrency)
    flow = FlowSettings(high_water=n + 1, low_water=n, high_water_bytes=1 << 40, low_water_bytes=1 << 39)
    worker = TeacherWorker(run, config, "bench", flow, WorkerOptions(concurrency=concurrency))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait({task, asyncio.create_task(worker.started.wait())}, return_when="FIRST_COMPLETED")
    if task.done():
        task.result()
    t0, c0 = time.perf_counter(), cpu_s()
    await add_rollouts(r, keys, payloads)
    while worker.report.scored + worker.report.dead < n:
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    stop.set()
    await task
    if worker.report.dead:
        raise RuntimeError(f"bench worker dead-lettered {worker.report.dead} rollouts: expected none")
    await r.delete(keys.ready.key, keys.rollouts.key, keys.stats, keys.config)
    await r.aclose()
    return wall, cpu


def baseline_fetch(url: str, input_ids: list[list[int]], topk: int, threads: int = 8) -> tuple[Any, Any]:
    """ms-swift-style: [B, L-1, topk] logprobs and indices, via blocking requests from a thread pool."""
    import requests
    import torch

    session = requests.Session()
    session.trust_env = False  # loopback: no proxies
    batch, max_len = len(input_ids), max(len(ids) for ids in input_ids)
    logprobs_out = torch.full((batch, max_len - 1, topk), float("-inf"), dtype=torch.float32)
    indices_out = torch.zeros((batch, max_len - 1, topk), dtype=torch.long)

    def fetch_one(b: int) -> None:
        body: dict[str, Any] = {"model": MODEL, "prompt": input_ids[b], "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": topk}  # fmt: skip
        resp = session.post(url + "/v1/completions", json=body, timeout=300)
        resp.raise_for_status()
        rows = resp.json()["choices"][0]["prompt_logprobs"]
        for pos in range(1, len(rows)):
            row = rows[pos]
            if row is None:
                continue
            best = sorted(row.items(), key=lambda item: -item[1]["logprob"])[:topk]
            for j, (tid, info) in enumerate(best):
                indices_out[b, pos - 1, j] = int(tid)
                logprobs_out[b, pos - 1, j] = info["logprob"]

    with ThreadPoolExecutor(max_workers=min(batch, threads)) as pool:
        list(pool.map(fetch_one, range(batch)))
    return logprobs_out, indices_out


def run_baseline(url: str, ids_T: np.ndarray, n: int, k: int, threads: int) -> tuple[float, float]:
    """(wall s, CPU s) of the baseline fetching `n` rollouts."""
    input_ids = [ids_T.tolist() for _ in range(n)]
    t0, c0 = time.perf_counter(), cpu_s()
    baseline_fetch(url, input_ids, k, threads)
    return time.perf_counter() - t0, cpu_s() - c0


def decode_cpu_s(body: bytes, reps: int) -> float:
    """CPU seconds of one `orjson.loads(body)` (mean of `reps`)."""
    c0 = cpu_s()
    for _ in range(reps):
        orjson.loads(body)
    return (cpu_s() - c0) / reps


def parse_cpu_s(body: bytes, t: int, k: int, reps: int) -> float:
    """CPU seconds of the teacher client's whole parse of `body` (decode + validation + top-k arrays)."""
    from pipeline.teacher.vllm import parse_response

    c0 = cpu_s()
    for _ in range(reps):
        parse_response(body, t, 1, k)
    return (cpu_s() - c0) / reps


def binary_parse_cpu_s(body: bytes, t: int, k: int, reps: int) -> float:
    """CPU seconds of the client's parse of the binary response carrying the top-k of the JSON `body`."""
    from pipeline.teacher.binary import BINARY
    from pipeline.teacher.vllm import parse_response

    ids_RK, lp_RK = parse_response(body, t, 1, k)
    raw = BINARY.render(ids_RK, lp_RK, MODEL)
    c0 = cpu_s()
    for _ in range(reps):
        BINARY.parse(raw, t, 1, k)
    return (cpu_s() - c0) / reps


#: Client parse targets, CPU us per position: vLLM JSON by k, and the binary response.
JSON_PARSE_TARGET_US = {20: 8.0, 64: 20.0}
BINARY_PARSE_TARGET_US = 2.0


# ---------------------------------------------------------------------------------------------- run


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench worker")
    p.add_argument("--t", type=int, default=2048, help="tokens per rollout")
    p.add_argument("--k", type=int, nargs="+", default=[20, 64], help="top-k values to measure")
    p.add_argument("--rollouts", type=int, default=64, help="rollouts the worker scores per k")
    p.add_argument(
        "--baseline-rollouts",
        type=int,
        default=8,
        help="rollouts the baseline scores per k (the same ones; it is CPU-bound, so its rate holds)",
    )
    p.add_argument("--latency-ms", type=float, default=50.0, help="fixed teacher latency")
    p.add_argument("--concurrency", type=int, default=64, help="worker rollouts in flight")
    p.add_argument("--baseline-threads", type=int, default=8, help="threads of the blocking baseline")
    a = p.parse_args(args)
    from pipeline.local.redis_server import RedisServer

    ids_T = bench_ids(a.t)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gkd-bench-worker-") as tmp, RedisServer() as redis_server:
        bodies = {k: build_body(ids_T, k) for k in a.k}
        for k, body in bodies.items():
            Path(tmp, f"body_k{k}.json").write_bytes(body)
        teacher, url = start_teacher(Path(tmp), a.latency_ms, a.t)
        try:
            for k, body in bodies.items():
                # The decode floor is measured around the worker run and its median taken: on a shared
                # machine, one measurement alone drifts with whatever else runs.
                d_cpu = [decode_cpu_s(body, 4)]
                w_wall, w_cpu = asyncio.run(
                    run_worker(redis_server.url, url, ids_T, a.rollouts, k, a.concurrency)
                )
                d_cpu.append(decode_cpu_s(body, 4))
                b_wall, b_cpu = run_baseline(url, ids_T, a.baseline_rollouts, k, a.baseline_threads)
                d_cpu.append(decode_cpu_s(body, 4))
                p_cpu = parse_cpu_s(body, a.t, k, 4)
                bin_cpu = binary_parse_cpu_s(body, a.t, k, 20)
                parse = (p_cpu, bin_cpu)
                rows += _rows(k, a.t - 1, a.rollouts, a.baseline_rollouts, len(body),
                              (w_wall, w_cpu), (b_wall, b_cpu), sorted(d_cpu)[1], parse)  # fmt: skip
        finally:
            teacher.terminate()
            teacher.wait(timeout=10)
    # Wall-clock rates depend on what else runs on the machine; the CPU-per-position rows much less.
    load = max(load_before, os.getloadavg()[0])
    rows.append(result("worker", "loadavg_1m_max", load, f"procs on {os.cpu_count()} cpus"))
    return rows


def _rows(
    k: int, per_body: int, n_worker: int, n_baseline: int, body_bytes: int,
    worker: tuple[float, float], baseline: tuple[float, float], d_cpu: float, parse: tuple[float, float],
) -> list[dict[str, Any]]:  # fmt: skip
    """Result rows of one k; `worker`/`baseline` are (wall s, CPU s); `d_cpu` CPU s of one decode of a
    body; `parse` CPU s of one client parse of it (vLLM JSON) and of the same rows as a binary body."""
    w_pos, b_pos = n_worker * per_body, n_baseline * per_body
    w_pps, b_pps = w_pos / worker[0], b_pos / baseline[0]
    w_us, b_us, d_us = worker[1] / w_pos * 1e6, baseline[1] / b_pos * 1e6, d_cpu / per_body * 1e6
    p_us, bin_us = parse[0] / per_body * 1e6, parse[1] / per_body * 1e6
    over = w_us / d_us
    target = JSON_PARSE_TARGET_US.get(k)
    return [
        result("worker", f"positions_per_s_k{k}", w_pps, "pos/s", baseline=b_pps, ratio=w_pps / b_pps),
        result("worker", f"cpu_us_per_position_k{k}", w_us, "us", baseline=b_us, ratio=b_us / w_us),
        result("worker", f"decode_only_cpu_us_per_position_k{k}", d_us, "us"),
        result(
            "worker",
            f"client_parse_cpu_us_per_position_k{k}",
            p_us,
            "us",
            baseline=target,
            ratio=target / p_us if target else None,
        ),
        result("worker", f"client_parse_over_decode_k{k}", p_us / d_us, "x", baseline=1.0, ratio=d_us / p_us),
        result(
            "worker",
            f"binary_parse_cpu_us_per_position_k{k}",
            bin_us,
            "us",
            baseline=BINARY_PARSE_TARGET_US,
            ratio=BINARY_PARSE_TARGET_US / bin_us,
        ),
        result("worker", f"cpu_over_decode_k{k}", over, "x", baseline=1.0, ratio=1.0 / over),
        result("worker", f"body_bytes_k{k}", float(body_bytes), "B"),
    ]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        serve(sys.argv[2:])
