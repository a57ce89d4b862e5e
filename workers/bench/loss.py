"""`gkd bench loss`: forward + backward time and peak memory of the top-k GKD loss against full vocabulary.

Both sides see the same student logits [N, V]; the baseline (``full_vocab_gjsd``) also holds the
teacher's full [N, V] logits, as an in-process teacher would, while ``tail`` and ``renorm`` get the
teacher's top-k ids (int32) and logprobs (fp16), as they come off the wire. Defaults: on CUDA N=8192,
V=151936 (Qwen), k=64, bf16 logits; on CPU N=512, V=32000, k=64, fp32 (under a minute).

Memory metrics say what they measure: ``*_peak_mem_mb`` (CUDA) is torch.cuda.max_memory_allocated
above what was allocated before the step; ``*_peak_rss_delta_mb`` (CPU, Linux) is the peak resident
set size (VmHWM, reset through /proc/self/clear_refs) above the RSS before the step. Both include the
gradient of the student logits, which every method produces.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.train.loss import full_vocab_gjsd, topk_gkd_loss
from workers.bench.cli import result

BETA = 0.5  # the GJSD proper: the mixture term is the most expensive case for every method
_MB = 1e6


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gkd bench loss", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--n", type=int, default=None, help="rows (tokens); default 8192 on CUDA, 512 on CPU")
    parser.add_argument(
        "--v", type=int, default=None, help="vocabulary; default 151936 on CUDA, 32000 on CPU"
    )
    parser.add_argument("--k", type=int, default=64, help="teacher top-k (default 64)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 CUDA, 3 CPU)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per loss chunk (default: auto)")
    return parser.parse_args(args)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one step above the level before it, in MB; None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - before) / _MB
    try:
        before_kb = _proc_status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        step()
        return (_proc_status_kb("VmHWM") - before_kb) * 1024 / _MB
    except OSError:  # not Linux, or clear_refs not writable: no honest CPU number
        return None


def _median_ms(step: Callable[[], None], reps: int) -> float:
    step()  # warmup: allocator, kernels, first-touch of pages
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _inputs(n: int, v: int, k: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Student and teacher logits [n, v] and the teacher's top-k (ids int32, logprobs fp16)."""
    g = torch.Generator(device=device).manual_seed(0)
    student_NV = torch.randn(n, v, generator=g, device=device, dtype=dtype).requires_grad_()
    # A peaked teacher near the student, so that the top-k hold a realistic share of the mass.
    teacher_NV = (student_NV.detach() * 2 + torch.randn(n, v, generator=g, device=device, dtype=dtype)).to(
        dtype
    )
    ids_NK = torch.empty(n, k, dtype=torch.int32, device=device)
    logprobs_NK = torch.empty(n, k, dtype=torch.float16, device=device)
    for start in range(0, n, 1024):  # chunked so setup does not need a full [N, V] fp32 copy
        rows = slice(start, min(n, start + 1024))
        top = torch.log_softmax(teacher_NV[rows].float(), -1).topk(k, -1)
        ids_NK[rows], logprobs_NK[rows] = top.indices.int(), top.values.half()
    return {"student": student_NV, "teacher": teacher_NV, "ids": ids_NK, "logprobs": logprobs_NK}


def run(args: list[str]) -> list[dict[str, Any]]:
    """Measure tail, renorm and the full-vocabulary baseline; one result dict per metric."""
    opts = _parse(args)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    n = opts.n or (8192 if on_cuda else 512)
    v = opts.v or (151936 if on_cuda else 32000)
    reps = opts.reps or (5 if on_cuda else 3)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    data = _inputs(n, v, opts.k, dtype, device)
    student = data["student"]

    def step_for(method: str) -> Callable[[], None]:
        def step() -> None:
            student.grad = None
            if method == "full":
                loss = full_vocab_gjsd(student, data["teacher"], BETA)
            else:
                loss, _ = topk_gkd_loss(
                    student, data["ids"], data["logprobs"], beta=BETA, mode=method, chunk_rows=opts.chunk_rows
                )
            loss.backward()
            _sync(device)
            student.grad = None

        return step

    measured: dict[str, tuple[float | None, float | None]] = {}
    for method in ("full", "tail", "renorm"):
        try:
            measured[method] = (_median_ms(step_for(method), reps), _peak_mb(step_for(method), device))
        except torch.cuda.OutOfMemoryError:  # the full-vocabulary baseline is the one expected to hit this
            measured[method] = (None, None)
            student.grad = None
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    mem_name = "peak_mem_mb" if on_cuda else "peak_rss_delta_mb"
    full_ms, full_mb = measured["full"]
    rows = []
    for method in ("tail", "renorm"):
        ms, mb = measured[method]
        for metric, value, base, unit in (("fwd_bwd_ms", ms, full_ms, "ms"), (mem_name, mb, full_mb, "MB")):
            if value is None:
                continue
            ratio = base / value if base is not None and value > 0 else None
            rows.append(result("loss", f"{method}_{metric}", value, unit, base, ratio))
    topk_mb = (data["ids"].numel() * 4 + data["logprobs"].numel() * 2) / _MB
    full_teacher_mb = data["teacher"].numel() * data["teacher"].element_size() / _MB
    rows.append(result("loss", "teacher_input_mb", topk_mb, "MB", full_teacher_mb, full_teacher_mb / topk_mb))
    return rows
