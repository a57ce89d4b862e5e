"""`gkd bench fidelity`: which sparse teacher signal distils best, on a real corpus, from scratch, offline.

A byte-level BPE and a small Llama teacher are trained on the Python standard library's own source
files (present wherever Python is, no download); then students (smaller Llamas, same initialization
per seed) are distilled from that teacher with forward KL through each loss, in lockstep on the same
batches: full-vocabulary KD, top-k ``tail``, top-k ``renorm`` and RS-KD ``sampled`` at k entries per
position (sampled: the distinct tokens of k draws, so at most k entries), plus a cross-entropy-only
student as the no-KD reference. Each is evaluated on held-out standard-library files: cross-entropy
of the real next token and full-vocabulary KL(teacher || student), both in nats per token.

Rows: ``ce_<loss>`` and ``kl_<loss>`` per loss (``full``, ``ce``, ``tail_k8``, ...), value the mean over
seeds, ``spread`` the sample standard deviation, ``seeds`` the per-seed values, baseline the full-KD
mean and ratio baseline / value (> 1: better than full KD); ``entries_<loss>`` the mean teacher entries
per position; ``ce_teacher``; ``wall_s`` and ``teacher_train_s``. Work is spread over ``--procs``
processes of one thread each (default: 2, or the number of CPUs if fewer).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.bench import fidelity_lab as lab
from workers.bench.cli import result

TINY = lab.LabSettings(
    vocab=300,
    seq_len=32,
    batch=4,
    corpus_chars=150_000,
    teacher_hidden=32,
    teacher_layers=1,
    teacher_steps=10,
    student_hidden=32,
    student_layers=1,
    student_steps=4,
    eval_seqs=4,
)
"""Smoke-test sizes: every stage runs, in seconds; the numbers mean nothing."""


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gkd bench fidelity", description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (default 3)")
    parser.add_argument("--ks", default="8,32", help="entries per position, comma-separated (default 8,32)")
    parser.add_argument("--procs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; numbers meaningless)")
    for f in fields(lab.LabSettings):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f"{f.name}"
        )
    return parser.parse_args(args)


def _log(message: str, started: float) -> None:
    print(f"[fidelity {time.perf_counter() - started:6.0f}s] {message}", file=sys.stderr, flush=True)


def _prepare(cfg: lab.LabSettings, work: Path, started: float) -> tuple[float, float]:
    """Corpus, tokenizer, teacher: writes train.npy, heldout.npy, teacher.pt. Returns (teacher's
    held-out cross-entropy, teacher training seconds)."""
    train_texts, held_texts = lab.stdlib_sources(cfg.corpus_chars)
    _log(f"corpus: {len(train_texts)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
         f"{len(held_texts)} held-out files", started)  # fmt: skip
    tokenizer = lab.train_tokenizer(train_texts, cfg.vocab)
    train = lab.encode(tokenizer, train_texts)
    held = lab.encode(tokenizer, held_texts, limit_tokens=cfg.eval_seqs * (cfg.seq_len + 1) * 4)
    np.save(work / "train.npy", train)
    np.save(work / "heldout.npy", held)
    _log(f"tokenizer: V={tokenizer.get_vocab_size()}, {train.size} train tokens", started)
    # One thread: on a shared machine several spinning intra-op threads lose more than they gain
    # (measured: 2.8 s per teacher step with 2 threads under load, 0.6 s with 1).
    torch.set_num_threads(1)
    teacher = lab.llama(cfg.vocab, cfg.teacher_hidden, cfg.teacher_layers, seed=0)
    every = max(1, cfg.teacher_steps // 10)

    def progress(step: int, loss: float) -> None:
        if (step + 1) % every == 0:
            _log(f"teacher step {step + 1}/{cfg.teacher_steps}: train CE {loss:.3f}", started)

    t0 = time.perf_counter()
    batches = lab.windows(train, cfg.seq_len, cfg.batch, torch.Generator().manual_seed(12345))
    lab.train_lm(teacher, batches, cfg.teacher_steps, cfg.teacher_lr, lab.ce_loss, progress)
    train_s = time.perf_counter() - t0
    torch.save(teacher.state_dict(), work / "teacher.pt")
    ce, _ = lab.evaluate(teacher, teacher, lab.eval_batches(held, cfg.seq_len, cfg.eval_seqs))
    _log(f"teacher: held-out CE {ce:.3f} nats/token after {train_s:.0f} s", started)
    return ce, train_s


def _tasks(cfg: lab.LabSettings, keys: list[str], seeds: int, procs: int, work: Path) -> list[dict[str, Any]]:
    """(seed, group of students) tasks; a seed's students split into ``procs`` groups so that the tasks
    balance over the processes (each group pays its own teacher forward per step)."""
    groups = max(1, min(procs, len(keys)))
    return [
        {"settings": lab.settings_dict(cfg), "work_dir": str(work), "seed": seed, "keys": keys[g::groups]}
        for seed in range(seeds)
        for g in range(groups)
    ]


def _run_tasks(tasks: list[dict[str, Any]], procs: int, started: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if procs <= 1:
        for task in tasks:
            out += lab.distil(task)
            _log(f"seed {task['seed']} {','.join(task['keys'])} done", started)
        return out
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool:
        futures = {pool.submit(lab.distil, task): task for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            task = futures[future]
            out += future.result()
            _log(f"seed {task['seed']} {','.join(task['keys'])} done", started)
    return out


def _aggregate(results: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Mean, spread and per-seed values per loss and metric; baseline the full-KD mean."""
    by_key: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    for r in results:
        if r["key"] in by_key:
            by_key[r["key"]].append(r)
    rows = []
    base = (
        {m: statistics.fmean(r[m] for r in by_key["full"]) for m in ("ce", "kl")}
        if by_key.get("full")
        else {}
    )
    for key in keys:
        runs = sorted(by_key[key], key=lambda r: r["seed"])
        for metric, unit in (("ce", "nats/token"), ("kl", "nats/token")):
            values = [r[metric] for r in runs]
            mean = statistics.fmean(values)
            ref = base.get(metric) if key != "full" else None
            row = result(
                "fidelity", f"{metric}_{key}", mean, unit, ref, ref / mean if ref and mean > 0 else None
            )
            row["spread"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["seeds"] = values
            rows.append(row)
        if key != "ce":
            rows.append(
                result("fidelity", f"entries_{key}", statistics.fmean(r["entries"] for r in runs), "entries")
            )
    return rows


def run(args: list[str]) -> list[dict[str, Any]]:
    """Train the teacher, distil every student, and return the result rows."""
    opts = _parse(args)
    cfg = TINY if opts.tiny else lab.LabSettings()
    overrides = {
        f.name: getattr(opts, f.name) for f in fields(lab.LabSettings) if getattr(opts, f.name) is not None
    }
    cfg = replace(cfg, **overrides)
    ks = [int(k) for k in opts.ks.split(",") if k]
    if opts.seeds < 1 or not ks or min(ks) < 1 or max(ks) > cfg.vocab:
        raise SystemExit(f"gkd bench fidelity: expected --seeds >= 1 and 1 <= k <= {cfg.vocab}, got {opts}")
    keys = ["ce", "full"] + [f"{mode}_k{k}" for k in ks for mode in ("tail", "renorm", "sampled")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gkd-fidelity-") as tmp:
        work = Path(tmp)
        teacher_ce, teacher_s = _prepare(cfg, work, started)
        tasks = _tasks(cfg, keys, opts.seeds, opts.procs, work)
        _log(f"distilling {len(keys)} students x {opts.seeds} seeds in {len(tasks)} tasks", started)
        results = _run_tasks(tasks, opts.procs, started)
    rows = [result("fidelity", "ce_teacher", teacher_ce, "nats/token")]
    rows += _aggregate(results, keys)
    rows.append(result("fidelity", "teacher_train_s", teacher_s, "s"))
    rows.append(result("fidelity", "wall_s", time.perf_counter() - started, "s"))
    settings = lab.settings_dict(cfg) | {"seeds": opts.seeds, "ks": ks, "procs": opts.procs}
    rows[-1]["settings"] = settings
    return rows
