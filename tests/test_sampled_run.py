"""A sampled run's settings and trainer-side plumbing: the run config's teacher mode and width, the
trainer's refusals (beta, a mismatched loss mode), and micro-batches carrying the draw counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigMismatch, SettingsError
from pipeline.queue.schema import Config
from pipeline.sections import RunSettings
from pipeline.train.batching import collate
from pipeline.train.loss import topk_gkd_loss
from pipeline.train.settings import TrainSettings
from pipeline.train.startup import check_teacher_mode
from pipeline.wire.codec import Rollout, ScoredSample


def test_a_sampled_run_fixes_its_mode_and_the_draws_as_k() -> None:
    workers = RunSettings(k=20, teacher_mode="sampled", samples=12)
    trainer = RunSettings(k=20, loss_mode="sampled", samples=12)
    topk = RunSettings(k=20)
    fields = (Config.K, Config.TEACHER_MODE)
    assert workers.fixed(*fields) == trainer.fixed(*fields) == {Config.K: 12, Config.TEACHER_MODE: "sampled"}
    assert topk.fixed(*fields) == {Config.K: 20, Config.TEACHER_MODE: "topk"}
    with pytest.raises(SettingsError, match=r"samples: expected an int in \[1, 256\], got 0"):
        RunSettings(teacher_mode="sampled", samples=0)


def test_the_trainer_refuses_beta_and_a_mismatched_teacher_mode() -> None:
    with pytest.raises(SettingsError, match=r"expected --beta 0, got 0\.5"):
        TrainSettings(run=RunSettings(loss_mode="sampled"), student="s", beta=0.5)
    TrainSettings(run=RunSettings(loss_mode="sampled"), student="s", beta=0.0)
    sampled_run = {Config.TEACHER_MODE: "sampled", Config.K: "16"}
    with pytest.raises(ConfigMismatch, match="expected --loss-mode sampled --samples 16 --beta 0"):
        check_teacher_mode(sampled_run, RunSettings(name="r", loss_mode="tail"))
    with pytest.raises(ConfigMismatch, match="its teacher sends its top-20"):
        check_teacher_mode({Config.TEACHER_MODE: "topk", Config.K: "20"}, RunSettings(loss_mode="sampled"))
    check_teacher_mode(sampled_run, RunSettings(loss_mode="sampled", samples=16))
    check_teacher_mode({}, RunSettings(loss_mode="sampled"))  # not recorded yet: checked when it is


def drawn_sample(i: int, t: int, prompt_len: int, n: int, counts: bool = True) -> ScoredSample:
    rng = np.random.default_rng(i)
    rows = t - prompt_len
    ids_RN = np.zeros((rows, n), dtype=np.int32)
    counts_RN = np.zeros((rows, n), dtype=np.int32)
    for r in range(rows):
        drawn = np.bincount(rng.integers(0, 5, size=n), minlength=5)
        live = np.flatnonzero(drawn)
        ids_RN[r, : live.size], counts_RN[r, : live.size] = live, drawn[live]
    lp_RN = np.where(counts_RN > 0, np.log(np.maximum(counts_RN, 1) / (2 * n)), -np.inf).astype(np.float32)
    ro = Rollout(id=f"d{i}", input_ids=np.arange(t, dtype=np.int32), prompt_len=prompt_len)
    return ScoredSample(ro, ids_RN, lp_RN, "t", n, teacher_counts=counts_RN if counts else None)


def test_micro_batches_carry_the_counts_into_the_sampled_loss() -> None:
    samples = [drawn_sample(1, 7, 3, 6), drawn_sample(2, 5, 2, 6)]
    b = collate(samples, pin=False)
    assert b.teacher_counts_NK is not None and b.teacher_counts_NK.dtype == torch.int32
    expected = np.concatenate([s.teacher_counts for s in samples if s.teacher_counts is not None])
    np.testing.assert_array_equal(b.teacher_counts_NK.numpy(), expected)
    assert "teacher_counts_NK" in b.to("cpu").tensors()
    logits_NV = torch.randn(b.num_loss_tokens, 8, requires_grad=True)
    loss, stats = topk_gkd_loss(logits_NV, b.teacher_ids_NK, b.teacher_logprobs_NK, beta=0.0, mode="sampled",
                                teacher_counts=b.teacher_counts_NK)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and stats["rows"] == b.num_loss_tokens
    assert logits_NV.grad is not None and torch.isfinite(logits_NV.grad).all()
    with pytest.raises(ValueError, match="only top-k or only sampled"):
        collate([samples[0], drawn_sample(3, 6, 2, 6, counts=False)], pin=False)
    assert collate([drawn_sample(3, 6, 2, 6, counts=False)], pin=False).teacher_counts_NK is None
