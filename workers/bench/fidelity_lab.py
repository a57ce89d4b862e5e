"""The parts of `gkd bench fidelity`: a real corpus available on every machine (the Python standard
library's own source files), a byte-level BPE trained on it offline, a small Llama teacher trained on it,
and students distilled from that teacher with one loss each, evaluated on held-out files.

Shape legend: B sequences, T positions, N = B x T loss rows, V vocabulary, K teacher entries per row.
"""

from __future__ import annotations

import math
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.local import tiny_models
from pipeline.train.loss import draw_teacher_samples, full_vocab_gjsd, topk_gkd_loss

EOS = "<|eos|>"


@dataclass(frozen=True)
class LabSettings:
    """Sizes of the experiment (the defaults fit about 20 minutes on 2 CPU cores)."""

    vocab: int = 1024
    """BPE vocabulary of teacher and student."""
    seq_len: int = 128
    """Tokens per training sequence."""
    batch: int = 16
    """Sequences per optimizer step (teacher and students)."""
    corpus_chars: int = 6_000_000
    """Characters of training source text (the held-out files are apart from these)."""
    teacher_hidden: int = 256
    teacher_layers: int = 3
    teacher_steps: int = 500
    teacher_lr: float = 3e-3
    student_hidden: int = 96
    student_layers: int = 2
    student_steps: int = 300
    student_lr: float = 3e-3
    eval_seqs: int = 32
    """Held-out sequences of ``seq_len`` tokens for the metrics."""


def stdlib_sources(limit_chars: int) -> tuple[list[str], list[str]]:
    """(train, held-out) source texts of the running interpreter's standard library, test suites
    excluded. A file is held out when crc32(relative path) % 10 == 0, so the split does not depend on
    the order of a directory listing; train files are taken in crc32 order up to ``limit_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[tuple[int, str]] = []
    held: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or rel.split("/")[0] in ("test", "tests", "idlelib") or "/test" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        key = zlib.crc32(rel.encode())
        (held if key % 10 == 0 else train).append((key, text))
    if not train or not held:
        raise RuntimeError(f"no standard-library sources found under {root}")
    train.sort()
    held.sort()
    chosen, total = [], 0
    for _, text in train:
        if total >= limit_chars:
            break
        chosen.append(text)
        total += len(text)
    return chosen, [text for _, text in held]


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE trained on ``texts`` (offline, with the `tokenizers` package)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return bpe


def encode(tokenizer: Any, texts: list[str], limit_tokens: int | None = None) -> np.ndarray:
    """The texts' token ids, one EOS after each file, as one int32 array."""
    eos = tokenizer.token_to_id(EOS)
    out: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos)
        if limit_tokens is not None and len(out) >= limit_tokens:
            break
    return np.asarray(out, dtype=np.int32)


def llama(vocab: int, hidden: int, layers: int, seed: int) -> Any:
    """A small Llama causal LM (Hugging Face) with a fixed initialization, one head per 32 dimensions."""
    heads = max(1, hidden // 32)
    return tiny_models.llama(vocab, hidden, layers, heads, seed, max_positions=1024)


def windows(
    tokens: np.ndarray, seq_len: int, batch: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches [B, T + 1] of random windows of ``tokens`` (inputs and next-token targets)."""
    flat = torch.from_numpy(tokens.astype(np.int64))
    while True:
        starts = torch.randint(0, flat.numel() - seq_len - 1, (batch,), generator=generator)
        yield torch.stack([flat[s : s + seq_len + 1] for s in starts.tolist()])


def eval_batches(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced held-out windows [E, T + 1]."""
    span = tokens.size - seq_len - 1
    if span < count:
        raise RuntimeError(f"held-out text too short: {tokens.size} tokens for {count} windows of {seq_len}")
    starts = np.linspace(0, span, count).astype(np.int64)
    return torch.stack([torch.from_numpy(tokens[s : s + seq_len + 1].astype(np.int64)) for s in starts])


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5 % of the steps, then cosine decay to 10 % of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(
    model: Any,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """AdamW with warmup and cosine decay, gradient clipping at 1; ``loss_fn(logits_NV, batch_BT1)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    for step in range(steps):
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        logits_BTV = model(input_ids=batch[:, :-1]).logits
        loss = loss_fn(logits_BTV.flatten(0, 1), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    model.eval()


def ce_loss(logits_NV: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_NV.float(), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(student: Any, teacher: Any, held_ET1: torch.Tensor) -> tuple[float, float]:
    """(held-out cross-entropy of the student, full-vocabulary KL(teacher || student)), nats per token."""
    ce_sum = kl_sum = 0.0
    count = 0
    for start in range(0, held_ET1.shape[0], 8):
        batch = held_ET1[start : start + 8]
        s_NV = student(input_ids=batch[:, :-1]).logits.flatten(0, 1).float()
        t_NV = teacher(input_ids=batch[:, :-1]).logits.flatten(0, 1).float()
        ce_sum += F.cross_entropy(s_NV, batch[:, 1:].flatten(), reduction="sum").item()
        lp_t, lp_s = torch.log_softmax(t_NV, -1), torch.log_softmax(s_NV, -1)
        kl_sum += (lp_t.exp() * (lp_t - lp_s)).sum().item()
        count += s_NV.shape[0]
    return ce_sum / count, kl_sum / count


def mode_loss(
    key: str, teacher_lp_NV: torch.Tensor, generator: torch.Generator
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], float]:
    """The loss of one student (``ce``, ``full``, ``<tail|renorm|sampled>_k<k>``) against this batch's
    teacher log-probs, and the teacher entries per position it uses (V for full, 0 for ce)."""
    if key == "ce":
        return ce_loss, 0.0
    if key == "full":
        return (lambda z, _b: full_vocab_gjsd(z, teacher_lp_NV, beta=0.0)), float(teacher_lp_NV.shape[1])
    mode, k = key.split("_k")[0], int(key.split("_k")[1])
    if mode == "sampled":
        ids, counts, lp = draw_teacher_samples(teacher_lp_NV, k, generator=generator)
        entries = float((counts > 0).sum(1).double().mean())

        def sampled(z: torch.Tensor, _b: torch.Tensor) -> torch.Tensor:
            return topk_gkd_loss(z, ids, lp, teacher_counts=counts, mode="sampled", beta=0.0)[0]

        return sampled, entries
    lp_NK, ids_NK = teacher_lp_NV.topk(k, -1)
    return (lambda z, _b: topk_gkd_loss(z, ids_NK, lp_NK, mode=mode, beta=0.0)[0]), float(k)


def distil(task: dict[str, Any]) -> list[dict[str, Any]]:
    """One worker task: students of ``task["keys"]`` for one seed, trained in lockstep on the same
    batches (one teacher forward per step), then evaluated. Runs in a child process (1 thread)."""
    torch.set_num_threads(task.get("threads", 1))
    cfg = LabSettings(**task["settings"])
    work = Path(task["work_dir"])
    teacher = llama(cfg.vocab, cfg.teacher_hidden, cfg.teacher_layers, seed=0)
    teacher.load_state_dict(torch.load(work / "teacher.pt", weights_only=True))
    teacher.eval()
    train_tokens, held_tokens = np.load(work / "train.npy"), np.load(work / "heldout.npy")
    seed = task["seed"]
    students = {
        key: llama(cfg.vocab, cfg.student_hidden, cfg.student_layers, seed=1000 + seed)
        for key in task["keys"]
    }
    opts = {
        key: torch.optim.AdamW(m.parameters(), lr=cfg.student_lr, weight_decay=0.0, betas=(0.9, 0.95))
        for key, m in students.items()
    }
    gens = {key: torch.Generator().manual_seed(hash_seed(seed, key)) for key in students}
    batches = windows(train_tokens, cfg.seq_len, cfg.batch, torch.Generator().manual_seed(seed))
    entries = {key: 0.0 for key in students}
    started = time.perf_counter()
    for step in range(cfg.student_steps):
        batch = next(batches)
        with torch.no_grad():
            teacher_lp_NV = torch.log_softmax(
                teacher(input_ids=batch[:, :-1]).logits.flatten(0, 1).float(), -1
            )
        for key, model in students.items():
            loss_fn, used = mode_loss(key, teacher_lp_NV, gens[key])
            entries[key] += used / cfg.student_steps
            for group in opts[key].param_groups:
                group["lr"] = _lr_at(step, cfg.student_steps, cfg.student_lr)
            model.train()
            loss = loss_fn(model(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch)
            opts[key].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[key].step()
    held = eval_batches(held_tokens, cfg.seq_len, cfg.eval_seqs)
    out = []
    for key, model in students.items():
        model.eval()
        ce, kl = evaluate(model, teacher, held)
        out.append({"seed": seed, "key": key, "ce": ce, "kl": kl, "entries": entries[key]})
    out.append({"seed": seed, "key": "_time", "seconds": time.perf_counter() - started})
    return out


def hash_seed(seed: int, key: str) -> int:
    """A per-(seed, student) stream for the sampled draws, the same whichever worker runs it."""
    return zlib.crc32(f"{seed}:{key}".encode())


def settings_dict(cfg: LabSettings) -> dict[str, Any]:
    return asdict(cfg)
