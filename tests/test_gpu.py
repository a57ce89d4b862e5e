"""The CUDA paths: the loss in bf16 and fp32, the trainer's pinned-memory side-stream prefetch, one-process
nccl DDP and FSDP runs, and the reference teacher server in bf16.

Marked `gpu`: they need a CUDA device and are skipped without one, except in the GPU check's CPU dry run
(`python -m workers.gpu_check --dry-run`, part of `make test`), which sets GKD_GPU_TESTS_ON_CPU=1 and
runs the same tests on the CPU at small sizes, so that they cannot rot between GPU windows.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis
import torch
import torch.nn.functional as F

from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.local.tiny_models import tiny_models
from pipeline.queue.connection import connect
from pipeline.queue.schema import POLICY_CHECKPOINT, RunKeys, Stat
from pipeline.sections import FlowSettings, RunSettings
from pipeline.serve.server import TeacherServerSettings, load, start_server
from pipeline.train import checkpoint as ckpt
from pipeline.train.batching import BatchPacker, pack
from pipeline.train.distributed import backend_for
from pipeline.train.ioloop import IOLoop
from pipeline.train.loss import MODES, draw_teacher_samples, fused_topk_gkd_loss, topk_gkd_loss
from pipeline.train.prefetch import Prefetcher
from pipeline.train.ready import ReadyLeases
from pipeline.train.settings import TrainSettings
from pipeline.train.trainer import train
from workers.bench.trainer import fill as afill
from workers.bench.trainer import synthetic

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
ON_CPU = os.environ.get("GKD_GPU_TESTS_ON_CPU") == "1"
K = 8
T = 64


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (GKD_GPU_TESTS_ON_CPU=1 runs it on the CPU: the GPU check's dry run)")


@pytest.fixture(scope="module")
def student() -> str:
    return str(tiny_models().student.resolve())


def fill(url: str, keys: RunKeys, samples: list[Any]) -> None:
    """Into `ready` the way the worker pool puts them (rollouts added, then handed off scored)."""
    asyncio.run(afill(url, keys, samples))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64 on the CPU."""
    x64, ref64 = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x64 - ref64).norm() / ref64.norm())


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_loss_forward_and_backward_match_the_cpu_float64_reference(
    device: torch.device, dtype: torch.dtype, mode: str
) -> None:
    # A real vocabulary on CUDA; the dry run keeps the CPU work small.
    n, v, k = (512, 151_936, 64) if device.type == "cuda" else (48, 1000, 16)
    g = torch.Generator().manual_seed(10 * MODES.index(mode) + (dtype == torch.bfloat16))  # per case
    logits_NV = (torch.randn(n, v, generator=g) * 3).to(dtype)
    teacher_NV = logits_NV.double() * 1.5 + torch.randn(n, v, generator=g, dtype=torch.float64)
    lp_NK, ids_NK = torch.log_softmax(teacher_NV, -1).topk(k, -1)
    perm_K = torch.randperm(k, generator=g)  # ids in any order, as the loss allows
    ids_NK, lp_NK = ids_NK[:, perm_K].int(), lp_NK[:, perm_K].half()  # as they come off the wire
    mask_N = torch.rand(n, generator=g) > 0.2
    kw: dict[str, Any] = {"beta": 0.5, "mode": mode, "temperature": 1.5 if mode == "renorm" else 1.0}

    # The reference: the same (already rounded) inputs in float64 on the CPU.
    ref_NV = logits_NV.double().requires_grad_()
    ref_loss, ref_stats = topk_gkd_loss(ref_NV, ids_NK, lp_NK, mask=mask_N, **kw)
    ref_loss.backward()

    dev_NV = logits_NV.to(device).requires_grad_()
    loss, stats = topk_gkd_loss(dev_NV, ids_NK.to(device), lp_NK.to(device), mask=mask_N.to(device), **kw)
    loss.backward()
    assert dev_NV.grad is not None and ref_NV.grad is not None
    grad_NV = dev_NV.grad.double().cpu()
    assert grad_NV.dtype == torch.float64 and bool(torch.isfinite(grad_NV).all())
    # The loss is computed in fp32 whatever the logits' dtype; the gradient has the logits' dtype.
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel_err(grad_NV, ref_NV.grad) <= (5e-3 if dtype == torch.bfloat16 else 1e-5)
    assert grad_NV[~mask_N].abs().max() == 0  # rows outside the mask get exactly 0
    for name in ("teacher_mass", "student_mass", "top1_in_topk", "rows"):
        assert math.isclose(stats[name], ref_stats[name], rel_tol=1e-5, abs_tol=1e-6), name


@pytest.mark.parametrize("mode", MODES)
def test_fused_loss_in_bf16_equals_the_logits_loss_and_the_cpu_float64_reference(
    device: torch.device, mode: str
) -> None:
    # The trainer's LM head on CUDA (Qwen2.5-0.5B: H=896, V=151936); the dry run keeps the CPU work small.
    n, v, h, k = (512, 151_936, 896, 64) if device.type == "cuda" else (48, 1000, 32, 16)
    g = torch.Generator().manual_seed(20 + MODES.index(mode))
    hidden_NH = torch.randn(n, h, generator=g).bfloat16()
    weight_VH = (torch.randn(v, h, generator=g) * (3 / h**0.5)).bfloat16()
    teacher_NV = (
        F.linear(hidden_NH.to(device, torch.float64), weight_VH.to(device, torch.float64)).cpu() * 1.5
    )
    teacher_NV += torch.randn(n, v, generator=g, dtype=torch.float64)
    kw: dict[str, Any] = {"beta": 0.5, "mode": mode, "temperature": 1.5 if mode == "renorm" else 1.0}
    if mode == "sampled":
        ids_NK, counts_NK, lp_NK = draw_teacher_samples(teacher_NV, k, generator=g)
        kw.update(beta=0.0, teacher_counts=counts_NK)
    else:
        lp_NK, ids_NK = torch.log_softmax(teacher_NV, -1).topk(k, -1)
    ids_NK, lp_NK = ids_NK.int(), lp_NK.half()  # as they come off the wire
    mask_N = torch.rand(n, generator=g) > 0.2

    def on(dev: torch.device) -> dict[str, Any]:
        return {key: val.to(dev) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}

    # The reference: the logits loss in float64 (on the device: fast there) from the same bf16-rounded
    # hidden states and weight.
    ref_h = hidden_NH.to(device, torch.float64).requires_grad_()
    ref_w = weight_VH.to(device, torch.float64).requires_grad_()
    args = (ids_NK.to(device), lp_NK.to(device))
    ref_loss, _ = topk_gkd_loss(F.linear(ref_h, ref_w), *args, mask=mask_N.to(device), **on(device))
    ref_loss.backward()
    # The logits loss on the device in bf16 (an lm_head's logits), and the fused loss, which builds none.
    runs = {}
    for name in ("logits", "fused"):
        dev_h = hidden_NH.to(device, copy=True).requires_grad_()
        dev_w = weight_VH.to(device, copy=True).requires_grad_()
        if name == "logits":
            loss, _ = topk_gkd_loss(F.linear(dev_h, dev_w), *args, mask=mask_N.to(device), **on(device))
        else:
            loss, _ = fused_topk_gkd_loss(dev_h, dev_w, *args, mask=mask_N.to(device), **on(device))
        loss.backward()
        assert dev_h.grad is not None and dev_w.grad is not None
        assert dev_h.grad.dtype == dev_w.grad.dtype == torch.bfloat16
        runs[name] = (loss.item(), dev_h.grad, dev_w.grad)
    (loss_f, gh_f, gw_f), (loss_l, gh_l, gw_l) = runs["fused"], runs["logits"]
    assert ref_h.grad is not None and ref_w.grad is not None
    # Both round the logits to bf16 once: the fused loss is the logits loss up to the matmul's blocking
    # (its hidden-state gradient sums the vocabulary tiles in fp32, so it is if anything closer).
    assert abs(loss_f - loss_l) <= 2e-3 * abs(loss_l)
    assert rel_err(gh_f, gh_l) <= 1e-2 and rel_err(gw_f, gw_l) <= 1e-2
    for grad, ref in ((gh_f, ref_h.grad), (gw_f, ref_w.grad)):
        assert rel_err(grad, ref) <= 4e-2
    assert rel_err(gh_f, ref_h.grad) <= 1.1 * rel_err(gh_l, ref_h.grad) + 1e-3
    assert abs(loss_f - ref_loss.item()) <= 1e-2 * abs(ref_loss.item())
    assert gh_f[~mask_N.to(device)].abs().max() == 0  # rows outside the mask get exactly 0


# ---------------------------------------------------------------------------------------------- trainer


def test_prefetch_delivers_pinned_batches_copied_on_a_side_stream(
    redis_url: str, device: torch.device
) -> None:
    keys = RunKeys.for_run("gpu-prefetch")
    samples = synthetic(24, T, K, vocab=320, seed=3)
    fill(redis_url, keys, samples)
    expected = pack(samples, 256)
    io = IOLoop()
    try:
        r = io.run(_aconnect(redis_url))
        leases = ReadyLeases(io, r, keys, "gpu-test", flow=FlowSettings(), stop=threading.Event())
        packer = BatchPacker(256, pin=device.type == "cuda")
        pf = Prefetcher(io, leases, packer, device=device, depth=2)
        pf.start()
        got = []
        while (batch := pf.get(timeout_s=10)) is not None:
            got.append(batch)
        pf.stop()
        io.run(r.aclose())
    finally:
        io.close()
    assert [b.sample_ids for b in got] == [b.sample_ids for b in expected]
    for b, want in zip(got, expected, strict=True):
        if device.type == "cuda":
            host = b._host  # type: ignore[attr-defined]
            assert all(t.is_pinned() for t in host.tensors().values())
            assert isinstance(b._copied, torch.cuda.Event)  # type: ignore[attr-defined]
        for name, t in b.tensors().items():
            assert t.device.type == device.type, name
            # Read on the compute stream, which waited for the copy's event: the data must be complete.
            assert torch.equal(t.cpu(), want.tensors()[name]), name


async def _aconnect(url: str) -> Any:
    return connect(url)


def _train(
    url: str, student: str, out: Path, run: str, samples: list[Any], **kw: Any
) -> list[dict[str, float]]:
    fill(url, RunKeys.for_run(run), samples)
    s = TrainSettings(
        run=RunSettings(name=run, redis_url=url, k=K),
        student=student,
        output_dir=str(out / run),
        batch_tokens=256,
        max_steps=4,
        lr=1e-3,
        warmup_steps=0,
        log_every=1,
        checkpoint_every=1000,
        log_level="warning",
        **kw,
    )
    summary = train(s)
    assert summary.steps == 4 and summary.samples == 16
    assert summary.checkpoint is not None and ckpt.read_state(Path(summary.checkpoint)).step == 4
    return summary.history


def test_trainer_steps_with_prefetch_match_synchronous_copies_and_the_cpu(
    redis_url: str, device: torch.device, student: str, tmp_path: Path
) -> None:
    samples = synthetic(16, T, K, vocab=320, seed=5)  # 4 steps of 4 samples (256 tokens)
    dev = device.type
    side = _train(redis_url, student, tmp_path, "gpu-side", samples, device=dev, prefetch=True)
    sync = _train(redis_url, student, tmp_path, "gpu-sync", samples, device=dev, prefetch=False)
    # On the CPU (the dry run) the side-stream run is the CPU reference itself.
    cpu = _train(redis_url, student, tmp_path, "gpu-cpu", samples, device="cpu") if dev == "cuda" else side
    bf16 = _train(redis_url, student, tmp_path, "gpu-bf16", samples, device=dev, precision="bf16")
    losses = {name: [h["loss"] for h in hist] for name, hist in
              {"side": side, "sync": sync, "cpu": cpu, "bf16": bf16}.items()}  # fmt: skip
    assert all(math.isfinite(x) for v in losses.values() for x in v), losses
    # Batches copied on the side stream train exactly what synchronous copies train, and the device
    # follows the CPU over four optimizer steps; bf16 autocast stays near fp32.
    np.testing.assert_allclose(losses["side"], losses["sync"], rtol=1e-4)
    np.testing.assert_allclose(losses["side"], losses["cpu"], rtol=1e-3)
    np.testing.assert_allclose(losses["bf16"], losses["side"], rtol=5e-2)
    r = redis.Redis.from_url(redis_url)
    for run in ("gpu-side", "gpu-sync", "gpu-bf16", *(["gpu-cpu"] if dev == "cuda" else [])):
        assert int(r.hget(RunKeys.for_run(run).stats, Stat.TRAINED_SAMPLES) or 0) == 16


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_one_process_run_under_torchrun(
    redis_url: str, device: torch.device, student: str, tmp_path: Path, sharding: str
) -> None:
    """DDP, or FSDP2 with activation checkpointing, CPU offload and a sharded checkpoint, over one nccl
    rank (with gloo for the offloaded host tensors)."""
    run = f"gpu-{sharding}"
    extra = ["--activation-checkpointing", "--cpu-offload"] if sharding == "fsdp" else []
    fill(redis_url, RunKeys.for_run(run), synthetic(16, T, K, vocab=320, seed=7))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(free_port()), "-m", "workers.cli", "train", "--run-name", run,
           "--redis-url", redis_url, "--student", student, "--output-dir", str(tmp_path), "--k", str(K),
           "--device", device.type, "--batch-tokens", "256", "--max-steps", "3", "--warmup-steps", "0",
           "--log-every", "1", "--checkpoint-every", "1000", "--sharding", sharding, *extra]  # fmt: skip
    log = tmp_path / "torchrun.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env_without_proxy(), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=240, check=False)  # fmt: skip
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    backend = backend_for(device, host_collectives=sharding == "fsdp")
    assert f"process group: backend={backend} rank=0 world_size=1" in text, text[-4000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and ckpt.read_state(latest).step == 3
    assert (latest / ckpt.SHARDS / ".metadata").exists() and (latest / "model.safetensors").exists()
    r = redis.Redis.from_url(redis_url)
    assert int(r.hget(RunKeys.for_run(run).stats, Stat.TRAINED_SAMPLES) or 0) == 12
    assert r.hget(RunKeys.for_run(run).policy, POLICY_CHECKPOINT) == str(latest).encode()


# ---------------------------------------------------------------------------------------------- server


async def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as s, s.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        out: dict[str, Any] = await resp.json()
        return out


def _direct(model: Any, ids: list[int], k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (logprobs, ids) [T, k] of the model run directly, as one (1, T) batch like a lone request."""
    with torch.inference_mode():
        ids_1T = torch.tensor([ids], device=device)
        logits_TV = model(input_ids=ids_1T, attention_mask=torch.ones_like(ids_1T)).logits[0].float()
        lp_TK, top_TK = torch.log_softmax(logits_TV, -1).topk(k, -1)
    return lp_TK.cpu(), top_TK.cpu()


def _ranked(row: dict[str, Any], k: int) -> tuple[list[int], list[float]]:
    entries = sorted((e["rank"], int(t), e["logprob"]) for t, e in row.items() if e["rank"] <= k)
    return [t for _, t, _ in entries], [v for _, _, v in entries]


async def test_reference_server_in_bf16_answers_like_a_torch_forward(device: torch.device) -> None:
    k = 16
    settings = TeacherServerSettings(
        model=str(tiny_models().teacher), port=0, device=str(device), dtype="bfloat16", max_logprobs=k,
        max_wait_ms=200.0,
    )  # fmt: skip
    model, tok = load(settings)
    running = await start_server(settings, model, tok)
    try:
        url = running.url + "/v1/completions"
        texts = [
            "The cat sees the ball today.",
            "A dog",
            "My student reads a new book before dinner. The robot",
        ]
        prompts = [tok(t)["input_ids"] for t in texts]
        # Alone, a request is the same (1, T) forward as the direct call: bit-equal answers.
        lone = await _post(url, {"prompt": prompts[0], "max_tokens": 1, "prompt_logprobs": k})
        lp_TK, top_TK = _direct(model, prompts[0], k, device)
        rows = lone["choices"][0]["prompt_logprobs"]
        for i in range(1, len(prompts[0])):
            ids, values = _ranked(rows[i], k)
            assert ids == top_TK[i - 1].tolist()
            assert np.array_equal(np.float32(values), lp_TK[i - 1].numpy())
        # Together, they share one padded bf16 forward: other kernels, so equal up to bf16 rounding.
        answers = await asyncio.gather(
            *(_post(url, {"prompt": p, "max_tokens": 1, "prompt_logprobs": k}) for p in prompts)
        )
        assert running.server.batcher.batches < 1 + len(prompts)  # at least two shared a forward
        for p, body in zip(prompts, answers, strict=True):
            with torch.inference_mode():
                ids_1T = torch.tensor([p], device=device)
                full_TV = torch.log_softmax(model(input_ids=ids_1T).logits[0].float(), -1).cpu()
            rows = body["choices"][0]["prompt_logprobs"]
            for i in range(1, len(p)):
                ids, values = _ranked(rows[i], k)
                np.testing.assert_allclose(values, full_TV[i - 1, ids].numpy(), atol=0.1)
    finally:
        await running.stop()
