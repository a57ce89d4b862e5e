"""`gkd bench loss`: forward + backward time and peak memory of the top-k GKD loss against full vocabulary,
and of the fused LM-head loss against the logits version.

Logits rows (``tail_*``, ``renorm_*``): both sides see the same student logits [N, V]; the baseline
(``full_vocab_gjsd``) also holds the teacher's full [N, V] logits, as an in-process teacher would, while
``tail`` and ``renorm`` get the teacher's top-k ids (int32) and logprobs (fp16), as they come off the wire.

Fused rows (``fused_tail_*``, ``fused_renorm_*``): from hidden states [N, H] and an LM-head weight
[V, H], ``fused_topk_gkd_loss`` against its baseline, the LM head applied as a linear layer followed by
``topk_gkd_loss`` on the [N, V] logits; both backward into the hidden states and the weight.

Defaults: on CUDA N=8192, V=151936 (Qwen), H=4096, k=64, bf16; on CPU N=4096, V=32000, H=1024, k=64,
fp32 (a few minutes on 2 cores).

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
import torch.nn.functional as F

from pipeline.train.loss import full_vocab_gjsd, fused_topk_gkd_loss, topk_gkd_loss
from workers.bench.cli import result

BETA = 0.5  # the GJSD proper: the mixture term is the most expensive case for every method
_MB = 1e6


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gkd bench loss", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--n", type=int, default=None, help="rows (tokens); default 8192 on CUDA, 4096 on CPU"
    )
    parser.add_argument(
        "--v", type=int, default=None, help="vocabulary; default 151936 on CUDA, 32000 on CPU"
    )
    parser.add_argument("--h", type=int, default=None, help="hidden size (fused rows); 4096 CUDA, 1024 CPU")
    parser.add_argument("--k", type=int, default=64, help="teacher top-k (default 64)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 CUDA, 3 CPU)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per loss chunk (default: auto)")
    parser.add_argument(
        "--fused-chunk-rows",
        type=int,
        default=None,
        help="fused loss: forward rows per chunk (default: auto)",
    )
    parser.add_argument(
        "--vocab-tile", type=int, default=None, help="fused loss: backward vocabulary tile (default: auto)"
    )
    parser.add_argument(
        "--only", choices=("logits", "fused"), default=None, help="measure only one group of rows"
    )
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


Measured = dict[str, dict[str, float]]


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    """Wall time and process CPU time (user + system, all threads) of one step, in ms."""
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


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


def _measure(
    steps: dict[str, Callable[[], None]], reps: int, device: torch.device, cleanup: Callable[[], None]
) -> Measured:
    """Per step: ``fwd_bwd_ms`` (median wall time), ``fwd_bwd_cpu_ms`` (median process CPU time, CPU
    device only) and the peak memory metric; no entry for a step that ran out of GPU memory.

    The repetitions of the steps are interleaved (A B C A B C ...), so that a change in the load of a
    shared machine falls on every method alike; the first round is a warmup. The wall time includes
    waiting for cores that other jobs hold; the CPU time is the work the step itself did.
    """
    mem_name = "peak_mem_mb" if device.type == "cuda" else "peak_rss_delta_mb"
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(reps + 1):
        for name, step in steps.items():
            if name not in times:
                continue
            try:
                times[name].append(_timed(step))
            except torch.cuda.OutOfMemoryError:  # the baselines are the ones expected to hit this
                del times[name]
                cleanup()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    measured: Measured = {}
    for name, runs in times.items():
        measured[name] = {"fwd_bwd_ms": statistics.median(wall for wall, _ in runs[1:])}
        if device.type == "cpu":
            measured[name]["fwd_bwd_cpu_ms"] = statistics.median(cpu for _, cpu in runs[1:])
        peak = _peak_mb(steps[name], device)
        if peak is not None:
            measured[name][mem_name] = peak
    return measured


def _rows(measured: Measured, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows ``<method>_<metric>`` for each (method, baseline method); ratio = baseline / value."""
    rows = []
    for method, baseline in pairs:
        base = measured.get(baseline, {})
        for metric, value in measured.get(method, {}).items():
            unit = "MB" if metric.endswith("_mb") else "ms"
            ref = base.get(metric)
            ratio = ref / value if ref is not None and value > 0 else None
            rows.append(result("loss", f"{method}_{metric}", value, unit, ref, ratio))
    return rows


def _logits_rows(
    opts: argparse.Namespace, n: int, v: int, dtype: torch.dtype, device: torch.device, reps: int
) -> list[dict[str, Any]]:
    """tail and renorm on logits against the full-vocabulary loss, and the teacher input sizes."""
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

    def cleanup() -> None:
        student.grad = None

    measured = _measure({m: step_for(m) for m in ("full", "tail", "renorm")}, reps, device, cleanup)
    rows = _rows(measured, [("tail", "full"), ("renorm", "full")])
    topk_mb = (data["ids"].numel() * 4 + data["logprobs"].numel() * 2) / _MB
    full_teacher_mb = data["teacher"].numel() * data["teacher"].element_size() / _MB
    rows.append(result("loss", "teacher_input_mb", topk_mb, "MB", full_teacher_mb, full_teacher_mb / topk_mb))
    return rows


def _fused_rows(
    opts: argparse.Namespace, n: int, v: int, h: int, dtype: torch.dtype, device: torch.device, reps: int
) -> list[dict[str, Any]]:
    """The fused LM-head loss against the LM head as a linear layer followed by the logits loss."""
    g = torch.Generator(device=device).manual_seed(1)
    hidden_NH = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_()
    # Weights scaled so that the logits have a standard deviation of about 2, as a trained LM head's do.
    weight_VH = (torch.randn(v, h, generator=g, device=device, dtype=dtype) * (2 / h**0.5)).requires_grad_()
    with torch.no_grad():
        teacher_NV = F.linear(hidden_NH, weight_VH).float()
        teacher_NV += torch.randn(n, v, generator=g, device=device) * 2
        logprobs_NK, ids_NK = torch.log_softmax(teacher_NV, -1).topk(opts.k, -1)
        ids_NK, logprobs_NK = ids_NK.int(), logprobs_NK.half()
        del teacher_NV

    def step_for(method: str) -> Callable[[], None]:
        fused, mode = method.split("_")[0] == "fused", method.split("_")[1]

        def step() -> None:
            hidden_NH.grad = weight_VH.grad = None
            if fused:
                loss, _ = fused_topk_gkd_loss(
                    hidden_NH,
                    weight_VH,
                    ids_NK,
                    logprobs_NK,
                    beta=BETA,
                    mode=mode,
                    chunk_rows=opts.fused_chunk_rows,
                    vocab_tile=opts.vocab_tile,
                )
            else:
                logits_NV = F.linear(hidden_NH, weight_VH)
                loss, _ = topk_gkd_loss(
                    logits_NV, ids_NK, logprobs_NK, beta=BETA, mode=mode, chunk_rows=opts.chunk_rows
                )
                del logits_NV
            loss.backward()
            _sync(device)
            hidden_NH.grad = weight_VH.grad = None

        return step

    def cleanup() -> None:
        hidden_NH.grad = weight_VH.grad = None

    methods = ("logits_tail", "fused_tail", "logits_renorm", "fused_renorm")
    measured = _measure({m: step_for(m) for m in methods}, reps, device, cleanup)
    return _rows(measured, [("fused_tail", "logits_tail"), ("fused_renorm", "logits_renorm")])


def run(args: list[str]) -> list[dict[str, Any]]:
    """Measure tail, renorm and the full-vocabulary baseline, and the fused LM-head loss against the
    logits version; one result dict per metric."""
    opts = _parse(args)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    n = opts.n or (8192 if on_cuda else 4096)
    v = opts.v or (151936 if on_cuda else 32000)
    h = opts.h or (4096 if on_cuda else 1024)
    reps = opts.reps or (5 if on_cuda else 3)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    rows = []
    if opts.only in (None, "logits"):
        rows += _logits_rows(opts, n, v, dtype, device, reps)
    gc.collect()
    if opts.only in (None, "fused"):
        rows += _fused_rows(opts, n, v, h, dtype, device, reps)
    return rows
