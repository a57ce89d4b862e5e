"""Random-sampling KD (RS-KD; Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs", ACL 2025): the teacher sends, per position, the distinct tokens of n draws from
its distribution with their counts and log-probabilities, instead of its top-k.

The estimator. Draw x_1..x_n ~ p (the teacher at temperature 1, the paper's proposal q = p) and set
p_hat_i = c_i / n for the distinct drawn tokens i (c_i: how often i was drawn), 0 elsewhere. Then
E[p_hat] = p exactly, and the KD loss -sum_i p_hat_i log q_i over the student's full-vocabulary
log-softmax q has the gradient softmax(z) - p_hat, whose expectation is the full-vocabulary forward-KL
gradient softmax(z) - p: unbiased, unlike top-k (the paper's Theorem; our test checks it). The value
we report, sum_i p_hat_i (log p_i - log q_i), is the same loss plus a constant (the teacher's
logprobs carry no gradient) and an unbiased estimate of KL(P || Q), so it can come out slightly
negative on a row.

Temperature tau != 1: the target P_tau ∝ p^(1/tau) differs from the proposal p, so the entries get
self-normalized importance weights w_i = c_i p_i^(1/tau - 1), p_hat = w / sum(w), and log P_tau(i) is
estimated as log p_i / tau - log(sum_j w_j / n). That is consistent (exact as n grows) but not
unbiased for finite n. The student side is q = softmax(z / tau) over the full vocabulary.

Only forward KL (beta = 0) has an estimator here: the JSD mixture and reverse KL need the teacher's
probability of tokens the student would put mass on, which n draws from the teacher do not give.

Shape legend: see ``pipeline.train.loss``; S draws per row.
"""

from __future__ import annotations

import math

import torch

from pipeline.train.loss.common import Config


def sampled_chunk(
    logits_CV: torch.Tensor,
    ids_CK: torch.Tensor,
    logp_CK: torch.Tensor,
    counts_CK: torch.Tensor,
    cfg: Config,
    cdt: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Per-row RS-KD estimate of forward KL and stats; with ``cfg.need_grad`` the gradient parts.

    ``counts_CK`` are float counts (0 for undrawn padding entries, whose ids and logprobs are ignored).
    """
    tau = cfg.tau
    z_CV = logits_CV.to(cdt)
    argmax_C1 = z_CV.argmax(1, keepdim=True)
    lse1_C = torch.logsumexp(z_CV, 1)
    lse_C = lse1_C if tau == 1.0 else torch.logsumexp(z_CV / tau, 1)
    zk_CK = z_CV.gather(1, ids_CK)
    l_CK = zk_CK / tau - lse_C[:, None]  # student log q at the drawn ids
    drawn_CK = counts_CK > 0
    # log w = log c + (1/tau - 1) log p; at tau = 1 simply the counts.
    logw_CK = torch.where(drawn_CK, counts_CK.log() + (1.0 / tau - 1.0) * logp_CK, -math.inf)
    logsumw_C = torch.logsumexp(logw_CK, 1)
    phat_CK = (logw_CK - logsumw_C[:, None]).exp()  # 0 at undrawn entries
    # log P_tau(i) estimated; at tau = 1 it is log p_i exactly (sum_j w_j = n).
    log_n_C = counts_CK.sum(1).log()
    logpt_CK = logp_CK / tau - (logsumw_C - log_n_C)[:, None]
    zero = phat_CK.new_zeros(())
    loss_C = torch.where(drawn_CK, phat_CK * (logpt_CK - l_CK), zero).sum(1)
    out = {
        "loss": loss_C,
        "tmass": torch.where(drawn_CK, logp_CK.exp(), zero).sum(1),
        "smass": torch.where(drawn_CK, (zk_CK - lse1_C[:, None]).exp(), zero).sum(1).clamp(max=1),
        "top1": ((ids_CK == argmax_C1) & drawn_CK).any(1).to(cdt),
    }
    if cfg.need_grad:
        # dL/dz = (softmax(z / tau) - p_hat) / tau: a dense part plus -p_hat / tau added at the ids.
        out["h"] = -phat_CK / tau
        out["dense"] = torch.full_like(lse_C, 1.0 / tau)
        out["off"] = lse_C
    return out


def draw_teacher_samples(
    logprobs_NV: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``samples`` tokens per row from the teacher's distribution (with replacement), as RS-KD entries.

    Args:
        logprobs_NV: [N, V] teacher log-probabilities (or logits: rows are normalized here).
        samples: draws per row, n >= 1.
        generator: for reproducible draws (on the rows' device).

    Returns:
        (ids_NS int64, counts_NS int32, logprobs_NS fp32), S = ``samples``: per row the distinct drawn
        ids sorted by logprob (descending), how often each was drawn (summing to n), and its normalized
        teacher logprob; entries past a row's distinct ids are padding with count 0, id 0 and logprob 0.
    """
    if samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples}")
    logp_NV = torch.log_softmax(logprobs_NV.float(), -1)
    n_rows = logp_NV.shape[0]
    drawn_NS = torch.multinomial(logp_NV.exp(), samples, replacement=True, generator=generator)
    sorted_NS = drawn_NS.sort(1).values
    first_NS = torch.ones_like(sorted_NS, dtype=torch.bool)
    first_NS[:, 1:] = sorted_NS[:, 1:] != sorted_NS[:, :-1]
    # The j-th distinct id of a row goes to slot j; its count is the length of its run.
    slot_NS = first_NS.long().cumsum(1) - 1
    # Every draw of a run writes the same id to the same slot, so the scatter is deterministic.
    ids_NS = torch.zeros(n_rows, samples, dtype=torch.long, device=logp_NV.device)
    ids_NS.scatter_(1, slot_NS, sorted_NS)
    counts_NS = torch.zeros(n_rows, samples, dtype=torch.int32, device=logp_NV.device)
    counts_NS.scatter_add_(1, slot_NS, torch.ones_like(slot_NS, dtype=torch.int32))
    live_NS = counts_NS > 0
    lp_NS = torch.where(live_NS, logp_NV.gather(1, ids_NS), -math.inf)
    order_NS = lp_NS.sort(dim=1, descending=True, stable=True).indices
    ids_NS, counts_NS = ids_NS.gather(1, order_NS), counts_NS.gather(1, order_NS)
    lp_NS = lp_NS.gather(1, order_NS)
    return ids_NS, counts_NS, torch.where(counts_NS > 0, lp_NS, 0.0)
