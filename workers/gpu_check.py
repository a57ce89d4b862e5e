"""`make gpu-check` (`python -m workers.gpu_check`): every CUDA path in one run that fits a short GPU window.

A GPU host for this project is lent for minutes at a time, so the check is one prepared script. Its
parts run one after another, each in its own process group with its own time budget and all under one
deadline, so a hang or a crash costs one part, not the window:

    env      torch, CUDA, the device, the versions of what runs
    tests    the tests marked `gpu` (tests/test_gpu.py), one JSON row per test
    loss     `gkd bench loss` at N=8192, V=151936, k=64 in bf16: tail, renorm vs full vocabulary; fused
    model    a ~0.5B-parameter student built offline (random init, vocabulary 151936)
    trainer  `gkd bench trainer` on that student: tokens/s, data-wait fraction with prefetch, peak memory
    serve    `gkd bench serve`: `gkd teacher` serving that student to the worker pool, positions/s at k=20, 64

Every result is one JSON line appended to `--out` the moment it exists (bench rows as `gkd bench --json`
prints them, plus "part"); each part ends with a status row ({"part", "status": ok | failed | timeout |
skipped, "elapsed_s", "rc", "error" of a part that did not succeed, "detail" of a skipped one}), and the
processes' output goes to `<out>.log`. A new CUDA path is one more entry in `parts()`.

`--dry-run` runs the same parts on the CPU at tiny sizes (the `gpu` tests with GKD_GPU_TESTS_ON_CPU=1);
`make test` runs it, so the script cannot rot between GPU windows. `--only trainer,serve` reruns parts
(with the parts they need). The rows, the summary, the environment probe and the pytest plugin that writes
the test rows (`-p workers.gpu_report`) are in workers/gpu_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.gpu_report import OUT_ENV, PART_ENV, append_row, probe, summary

ROOT = Path(__file__).resolve().parents[1]
CPU_TESTS_ENV = "GKD_GPU_TESTS_ON_CPU"
MIN_PART_S = 10.0
"""A part is not started with less time than this left before the deadline."""


@dataclass(frozen=True)
class Plan:
    """What this run does: the device, the sizes (dry run or real) and where things go."""

    dry_run: bool
    out: Path
    work: Path
    """Scratch folder (the bench student lives here)."""
    budget_scale: float = 1.0
    """Each part's budget is multiplied by this: a deadline above the default stretches the parts with it
    (a dry run on a loaded machine), so a slow part is not cut while the whole check has time left."""

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def model_dir(self) -> Path:
        return self.work / ("bench-tiny" if self.dry_run else "bench-0.5b")


@dataclass(frozen=True)
class Part:
    """One step of the check: a command, its own time budget, and the parts whose output it needs."""

    name: str
    budget_s: float
    argv: list[str]
    needs: tuple[str, ...] = ()


def parts(p: Plan) -> list[Part]:
    """The check, in order. Sizes: the GPU numbers of the issue, or tiny ones for the CPU dry run."""
    py, dry, dev, model = sys.executable, p.dry_run, p.device, str(p.model_dir)
    preset = "tiny" if dry else "0.5b"

    def bench(suite: str, sizes_gpu: str, sizes_dry: str) -> list[str]:
        sizes = (sizes_dry if dry else sizes_gpu).split()
        return [py, "-m", "workers.cli", "bench", suite, "--json", "--device", dev, *sizes]

    pytest_args = "tests/test_gpu.py -m gpu -q -W default -p pytest_asyncio.plugin -p pytest_timeout"
    per_test_s = 60 if dry else 100
    return [
        # Everything needs "env": without CUDA (outside the dry run) it fails and the rest is skipped.
        Part("env", 60, [py, "-m", "workers.gpu_check", "--probe", *([] if dry else ["--require-cuda"])]),
        Part(
            "tests",
            180,
            [
                py,
                "-m",
                "pytest",
                *pytest_args.split(),
                "-p",
                "workers.gpu_report",
                "-o",
                f"timeout={per_test_s}",
            ],
            needs=("env",),
        ),
        Part(
            "loss",
            120,
            bench("loss", "--n 8192 --v 151936 --k 64 --reps 5", "--n 64 --v 2000 --k 16 --reps 1"),
            needs=("env",),
        ),
        Part(
            "model",
            120,
            [py, "-m", "pipeline.local.bench_models", "--preset", preset, "--out", model, "--device", dev],
            needs=("env",),
        ),
        Part(
            "trainer",
            240,
            bench(
                "trainer",
                f"--student {model} --precision bf16 --t 1024 --batch-tokens 16384 --steps 20 --k 64",
                f"--student {model} --precision bf16 --t 64 --batch-tokens 256 --steps 3 --k 16",
            ),
            needs=("env", "model"),
        ),
        Part(
            "serve",
            180,
            bench(
                "serve",
                f"--model {model} --t 1024 --rollouts 256 --concurrency 64 --k 20 64",
                f"--model {model} --t 32 --rollouts 8 --concurrency 8 --k 8 16",
            ),
            needs=("env", "model"),
        ),
    ]


# ---------------------------------------------------------------------------------------------- output


def _log(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(text)


def _pump(stream: Any, part: str, out: Path, log_path: Path) -> None:
    """A part's stdout: JSON objects become result rows (with "part"), everything else goes to the log."""
    for raw in stream:
        line = raw.decode("utf-8", errors="replace")
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            append_row(out, {"part": part, **row})
        else:
            _log(log_path, line)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the part's process group, SIGKILL what is left after 10 s (a hung CUDA call ignores TERM)."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, plan: Plan, budget_s: float, log_path: Path) -> dict[str, Any]:
    """Run one part within `budget_s`; its rows go to plan.out as they come. Returns its status row."""
    env = {**os.environ, OUT_ENV: str(plan.out), PART_ENV: part.name, "PYTHONUNBUFFERED": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if plan.dry_run:
        env[CPU_TESTS_ENV] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path even where a GPU is present
    if part.name == "tests":
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the host's other pytest plugins stay out
    _log(log_path, f"\n===== {part.name}: {' '.join(part.argv)} (budget {budget_s:.0f} s)\n")
    start_offset = log_path.stat().st_size
    t0 = time.monotonic()
    with open(log_path, "ab") as err:
        proc = subprocess.Popen(part.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)  # fmt: skip
        pump = threading.Thread(target=_pump, args=(proc.stdout, part.name, plan.out, log_path), daemon=True)
        pump.start()
        try:
            rc: int | None = proc.wait(timeout=budget_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            rc, status = proc.returncode, "timeout"
        try:  # what the part left running (a server, a redis-server) must not outlive it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pump.join(timeout=10)
    elapsed_s = round(time.monotonic() - t0, 1)
    row: dict[str, Any] = {"part": part.name, "status": status, "rc": rc, "elapsed_s": elapsed_s}
    if status != "ok":
        with open(log_path, "rb") as fh:
            fh.seek(start_offset)
            row["error"] = fh.read().decode("utf-8", errors="replace")[-2000:]
    return row


# ---------------------------------------------------------------------------------------------- run


def select(all_parts: list[Part], only: list[str] | None) -> list[Part]:
    """The parts named in `only` and, transitively, the parts they need, in check order."""
    if not only:
        return all_parts
    by_name = {p.name: p for p in all_parts}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise SystemExit(f"gpu_check: unknown part {unknown[0]!r}; expected some of {', '.join(by_name)}")
    wanted: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs
    return [p for p in all_parts if p.name in wanted]


def run_check(
    plan: Plan, deadline_s: float, only: list[str] | None = None, all_parts: list[Part] | None = None
) -> list[dict[str, Any]]:
    """Every selected part (of `parts(plan)` unless given) under one deadline; returns the status rows
    (also written to plan.out)."""
    todo = select(parts(plan) if all_parts is None else all_parts, only)
    log_path = plan.out.with_name(plan.out.name + ".log")
    plan.work.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + deadline_s
    append_row(plan.out, {"part": "check", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "dry_run": plan.dry_run, "deadline_s": deadline_s,
                          "parts": [p.name for p in todo]})  # fmt: skip
    statuses: dict[str, dict[str, Any]] = {}
    for part in todo:
        left = end - time.monotonic()
        missing = [n for n in part.needs if statuses.get(n, {}).get("status") != "ok"]
        if missing or left < MIN_PART_S:
            why = f"needs {', '.join(missing)}, which did not succeed" if missing else \
                f"{left:.0f} s left before the deadline"  # fmt: skip
            row: dict[str, Any] = {"part": part.name, "status": "skipped", "detail": why}
        else:
            budget_s = min(part.budget_s * plan.budget_scale, left)
            print(f"gpu-check: {part.name} (budget {budget_s:.0f} s) ...", flush=True)
            row = run_part(part, plan, budget_s, log_path)
        statuses[part.name] = row
        append_row(plan.out, row)
        print(f"gpu-check: {part.name}: {row['status']} {row.get('elapsed_s', '')}", flush=True)
    return list(statuses.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", default="gpu-check.jsonl", help="results file (JSON lines, appended)")
    ap.add_argument("--work", default=".gkd/gpu-check", help="scratch folder (the bench student)")
    ap.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny sizes")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="whole check (default 450 GPU, 240 dry; a longer one stretches each part's budget)",
    )
    ap.add_argument("--only", default=None, help="comma-separated parts (plus what they need)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--require-cuda", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe:
        info = probe()
        print(json.dumps(info), flush=True)
        if a.require_cuda and not info["cuda_available"]:
            print("gpu_check: expected a CUDA device (torch.cuda.is_available()), found none; "
                  "--dry-run is the CPU rehearsal", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    out = Path(a.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    default_s = 240.0 if a.dry_run else 450.0
    deadline = a.deadline_s or default_s
    scale = max(1.0, deadline / default_s)
    plan = Plan(dry_run=a.dry_run, out=out, work=Path(a.work).resolve(), budget_scale=scale)
    rows = run_check(plan, deadline, a.only.split(",") if a.only else None)
    print(summary(out), flush=True)
    print(f"gpu-check: results in {out}, logs in {out}.log", flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
