"""The student's forward with the loss inside (`pipeline.train.distill`): the fused LM-head loss is used
where the model's logits are a plain linear head of its last hidden states, and it trains exactly like
the logits loss (float64: same loss, statistics, KL and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.local.tiny_models import tiny_models
from pipeline.train.batching import Batch
from pipeline.train.distill import DistillModule, supports_fused_head
from pipeline.train.step import LossConfig
from tests.sharded_steps import micro_batches


def _lm(dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models().student, dtype=dtype)


def test_a_plain_linear_head_allows_the_fused_loss_and_soft_capped_logits_do_not() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    assert supports_fused_head(_lm())
    capped = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                          final_logit_softcapping=30.0)  # fmt: skip
    assert not supports_fused_head(Gemma2ForCausalLM(capped))


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_fused_and_logits_paths_agree_in_float64(mode: str, beta: float) -> None:
    batch = micro_batches(0)[0]
    batch = Batch(**{**batch.__dict__, "teacher_logprobs_NK": batch.teacher_logprobs_NK.double()})
    cfg = LossConfig(beta=beta, temperature=1.5, mode=mode)
    lm = _lm(torch.float64)
    out = {}
    for fused in (False, True):
        module = DistillModule(copy.deepcopy(lm), fused=fused)
        loss, stats, kl = module(batch, cfg, 50.0, True)
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        out[fused] = (loss.item(), stats, kl, grads)
    (l0, s0, k0, g0), (l1, s1, k1, g1) = out[False], out[True]
    assert l1 == pytest.approx(l0, rel=1e-12, abs=1e-15)
    assert s1 == pytest.approx(s0, rel=1e-12) and k1 == pytest.approx(k0, rel=1e-12)
    assert g0.keys() == g1.keys() and all(g is not None for g in g1.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-14, msg=name)
