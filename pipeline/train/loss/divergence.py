"""The per-row math of every mode on one chunk of rows: generalized JSD over the top-k categories
(``tail``, ``renorm``) and the RS-KD estimate (``sampled``, in ``sampled.py``).

Shape legend: see ``pipeline.train.loss``; K1 is the categories the loss compares: K + 1 in ``tail`` mode
(top-k plus "rest"), K in ``renorm``.
"""

from __future__ import annotations

import math

import torch

from pipeline.train.loss.common import TAIL_MASS_FLOOR, Config
from pipeline.train.loss.sampled import sampled_chunk


def _gjsd_rows(a_CK1: torch.Tensor, l_CK1: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row generalized JSD of teacher log-probs ``a`` and student log-probs ``l`` (both normalized).

    Returns (loss_C, dloss/dl_CK1). Categories with probability 0 contribute 0 (0 log 0 = 0), to the
    value and to the gradient. beta = 0 and 1 are the limits forward KL(P||Q) and reverse KL(Q||P)
    (as in TRL and ms-swift): the mixture M is degenerate there, so they are computed directly.
    """
    p_CK1, q_CK1 = a_CK1.exp(), l_CK1.exp()
    zero = a_CK1.new_zeros(())
    if beta == 0.0:
        terms = torch.where(p_CK1 > 0, p_CK1 * (a_CK1 - l_CK1), zero)
        grad_CK1 = -p_CK1
    elif beta == 1.0:
        terms = torch.where(q_CK1 > 0, q_CK1 * (l_CK1 - a_CK1), zero)
        grad_CK1 = torch.where(q_CK1 > 0, q_CK1 * (l_CK1 - a_CK1 + 1), zero)
    else:
        logm_CK1 = torch.logaddexp(a_CK1 + math.log(beta), l_CK1 + math.log1p(-beta))
        q_part = torch.where(q_CK1 > 0, q_CK1 * (l_CK1 - logm_CK1), zero)
        p_part = torch.where(p_CK1 > 0, p_CK1 * (a_CK1 - logm_CK1), zero)
        terms = beta * p_part + (1 - beta) * q_part
        # d/dl_c of the whole expression simplifies to (1 - beta) q_c (l_c - log m_c).
        grad_CK1 = (1 - beta) * q_part
    # GJSD >= 0 for normalized inputs; the clamp only removes rounding-level negatives.
    return terms.sum(1).clamp(min=0), grad_CK1


def _teacher_categories(logp_CK: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Teacher log-probs over the loss's categories, tempered: [C, K1]."""
    if cfg.kind == "renorm":
        return torch.log_softmax(logp_CK / cfg.tau, 1)
    lse_C1 = torch.logsumexp(logp_CK, 1, keepdim=True)
    # 1 - sum_K p as -expm1(log sum_K p): no cancellation when the top-k hold nearly all the mass.
    rest_C1 = (-torch.expm1(lse_C1)).clamp(min=TAIL_MASS_FLOOR)
    # log_softmax renormalizes rows whose sum_K p exceeded 1 - floor (rounding); others are unchanged.
    return torch.log_softmax(torch.cat([logp_CK, rest_C1.log()], 1) / cfg.tau, 1)


def _topk_chunk(
    logits_CV: torch.Tensor,
    ids_CK: torch.Tensor,
    logp_CK: torch.Tensor,
    cfg: Config,
    cdt: torch.dtype,
    owned: bool,
) -> dict[str, torch.Tensor]:
    """``tail``/``renorm``: loss and stats, and if wanted the gradient parts (``h``, ``dense``, ``off``).
    ``owned``: the logits chunk is a scratch buffer that may be overwritten."""
    tail = cfg.kind == "tail"
    if tail:
        # A buffer of our own, masked in place below.
        z_CV = logits_CV if owned and logits_CV.dtype == cdt else logits_CV.to(cdt, copy=True)
        argmax_C1 = z_CV.argmax(1, keepdim=True)
        zk_CK = z_CV.gather(1, ids_CK)
        # log q_rest as a logsumexp over the complement of K, not log(1 - sum_K q): exact even when
        # the student's top-k mass rounds to 1 in fp32.
        z_CV.scatter_(1, ids_CK, -math.inf)
        urest_C = torch.logsumexp(z_CV, 1)
        del z_CV
        lsek_C = torch.logsumexp(zk_CK, 1)
        lse_C = torch.logaddexp(lsek_C, urest_C)
        u_CK1 = torch.cat([zk_CK, urest_C[:, None]], 1)
    else:
        argmax_C1 = logits_CV.argmax(1, keepdim=True)
        lse_C = torch.logsumexp(logits_CV.to(cdt), 1)  # for student_mass only
        u_CK1 = logits_CV.gather(1, ids_CK).to(cdt)
        lsek_C = torch.logsumexp(u_CK1, 1)
    a_CK1 = _teacher_categories(logp_CK, cfg)
    l_CK1 = torch.log_softmax(u_CK1 / cfg.tau, 1)
    loss_C, g_CK1 = _gjsd_rows(a_CK1, l_CK1, cfg.beta)
    out = {
        "loss": loss_C,
        "tmass": torch.logsumexp(logp_CK, 1).exp(),
        "smass": (lsek_C - lse_C).exp().clamp(max=1),
        "top1": (ids_CK == argmax_C1).any(1).to(cdt),
    }
    if cfg.need_grad:
        # u are the student's category log-masses (z_K, and log q_rest in tail mode); through
        # l = log_softmax(u / tau): dL/du = (g - q * sum(g)) / tau.
        h_CK1 = (g_CK1 - l_CK1.exp() * g_CK1.sum(1, keepdim=True)) / cfg.tau
        k = ids_CK.shape[1]
        out["h"] = h_CK1[:, :k]
        if tail:
            # dL/dz_j outside K is dL/du_rest * softmax-within-rest(z)_j = h_rest * exp(z_j - u_rest).
            out["dense"] = h_CK1[:, k]
            # A rest category with no finite logit has gradient 0; 0 keeps exp(z - u) free of NaN there.
            out["off"] = torch.where(torch.isfinite(urest_C), urest_C, 0.0)
    return out


def chunk_forward(
    logits_CV: torch.Tensor,
    ids_CK: torch.Tensor,
    logp_CK: torch.Tensor,
    counts_CK: torch.Tensor | None,
    cfg: Config,
    cdt: torch.dtype,
    owned: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-row ``loss``, ``tmass``, ``smass``, ``top1`` of C rows, and with ``cfg.need_grad`` the parts
    of dL/dz (see ``RowGrad``): ``h`` [C, K], and ``dense``, ``off`` [C] unless the mode is ``renorm``.
    ``owned``: ``logits_CV`` is a scratch buffer the computation may overwrite (saves a copy)."""
    if cfg.kind == "sampled":
        assert counts_CK is not None
        return sampled_chunk(logits_CV, ids_CK, logp_CK, counts_CK, cfg, cdt)
    return _topk_chunk(logits_CV, ids_CK, logp_CK, cfg, cdt, owned)
