"""Top-k generalized-JSD distillation loss (DESIGN.md, "Loss"), usable from any training loop.

Shape legend (suffixes of tensor names):
    N   rows: loss positions (tokens), flattened over batch and time
    V   the student's vocabulary size
    K   the teacher's top-k entries of a row (``k`` in prose)
    K1  the categories the loss compares: K + 1 in ``tail`` mode (top-k plus "rest"), K in ``renorm``
    C   rows of one chunk (C <= N)

The student's [N, V] logits are never upcast to fp32 all at once: forward and backward walk over
chunks of C rows, so the extra memory is O(C x V) plus the gradient itself (which has the logits'
shape and dtype), and no [N, V] teacher tensor exists at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

MODES = ("tail", "renorm")

TAIL_MASS_FLOOR = 1e-6
"""Smallest teacher "rest" mass in ``tail`` mode. 1 - sum_K p is not resolvable below about k x fp32
epsilon (fp16 logprobs are coarser still, and can sum above 1); without a floor a rounding-level
rest mass of 0 would make reverse KL infinite for any student mass outside K."""

CHUNK_BYTES = 256 * 2**20
"""Target size of one chunk's fp32 [C, V] working tensor when ``chunk_rows`` is None."""


@dataclass(frozen=True)
class _Config:
    beta: float
    tau: float
    tail: bool  # False: renormalize over K (``renorm``, and ``tail`` when k == V, where it is exact)
    chunk_rows: int
    need_grad: bool


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower inputs; fp64 inputs stay fp64 (for float64 gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _teacher_categories(logp_CK: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """Teacher log-probs over the loss's categories, tempered: [C, K1]."""
    if not cfg.tail:
        return torch.log_softmax(logp_CK / cfg.tau, 1)
    lse_C1 = torch.logsumexp(logp_CK, 1, keepdim=True)
    # 1 - sum_K p as -expm1(log sum_K p): no cancellation when the top-k hold nearly all the mass.
    rest_C1 = (-torch.expm1(lse_C1)).clamp(min=TAIL_MASS_FLOOR)
    # log_softmax renormalizes rows whose sum_K p exceeded 1 - floor (rounding); others are unchanged.
    return torch.log_softmax(torch.cat([logp_CK, rest_C1.log()], 1) / cfg.tau, 1)


def _chunk_forward(
    logits_CV: torch.Tensor, ids_CK: torch.Tensor, logp_CK: torch.Tensor, cfg: _Config, cdt: torch.dtype
) -> dict[str, torch.Tensor]:
    """Loss, stats and (if wanted) dloss/du for C rows; u are the student's category log-masses."""
    logp_CK = logp_CK.to(cdt)
    if cfg.tail:
        z_CV = logits_CV.to(cdt, copy=True)  # our own buffer: masked in place below
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
        urest_C = lse_C.new_zeros(lse_C.shape)
    a_CK1 = _teacher_categories(logp_CK, cfg)
    l_CK1 = torch.log_softmax(u_CK1 / cfg.tau, 1)
    loss_C, g_CK1 = _gjsd_rows(a_CK1, l_CK1, cfg.beta)
    out = {
        "loss": loss_C,
        "tmass": torch.logsumexp(logp_CK, 1).exp(),
        "smass": (lsek_C - lse_C).exp().clamp(max=1),
        "top1": (ids_CK == argmax_C1).any(1).to(cdt),
        # A rest category with no finite logit has gradient 0; 0 keeps exp(z - u) free of NaN there.
        "urest": torch.where(torch.isfinite(urest_C), urest_C, 0.0),
    }
    if cfg.need_grad:
        # Through l = log_softmax(u / tau): dL/du = (g - q * sum(g)) / tau.
        out["h"] = (g_CK1 - l_CK1.exp() * g_CK1.sum(1, keepdim=True)) / cfg.tau
    return out


class _TopKGKD(torch.autograd.Function):
    """Per-row loss [N] with a chunked, memory-bounded backward. Inputs are validated by the caller."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits_NV: torch.Tensor, ids_NK: torch.Tensor, logp_NK: torch.Tensor, cfg: _Config
    ) -> tuple[torch.Tensor, ...]:
        n_rows, k = ids_NK.shape
        cdt = _compute_dtype(logits_NV.dtype)
        names = ("loss", "tmass", "smass", "top1", "urest")
        outs = {name: logits_NV.new_zeros(n_rows, dtype=cdt) for name in names}
        h_NK1 = logits_NV.new_zeros((n_rows, k + cfg.tail) if cfg.need_grad else (0, 0), dtype=cdt)
        for start in range(0, n_rows, cfg.chunk_rows):
            rows = slice(start, min(n_rows, start + cfg.chunk_rows))
            chunk = _chunk_forward(logits_NV[rows], ids_NK[rows], logp_NK[rows], cfg, cdt)
            for name in names:
                outs[name][rows] = chunk[name]
            if cfg.need_grad:
                h_NK1[rows] = chunk["h"]
        ctx.cfg = cfg
        ctx.save_for_backward(logits_NV, ids_NK, h_NK1, outs["urest"])
        ctx.mark_non_differentiable(outs["tmass"], outs["smass"], outs["top1"])
        return outs["loss"], outs["tmass"], outs["smass"], outs["top1"]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        logits_NV, ids_NK, h_NK1, urest_N = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        gloss_N1 = grads[0][:, None]
        # Rows with zero upstream gradient (masked out) get exactly 0, whatever their h holds.
        h_NK1 = torch.where(gloss_N1 != 0, h_NK1 * gloss_N1, h_NK1.new_zeros(()))
        k = ids_NK.shape[1]
        if not cfg.tail:
            grad_NV = torch.zeros_like(logits_NV)
            grad_NV.scatter_(1, ids_NK, h_NK1.to(grad_NV.dtype))
            return grad_NV, None, None, None
        grad_NV = torch.empty_like(logits_NV)
        for start in range(0, ids_NK.shape[0], cfg.chunk_rows):
            rows = slice(start, min(ids_NK.shape[0], start + cfg.chunk_rows))
            # A token j outside K gets dL/du_rest * softmax-within-rest(z)_j; tokens in K get dL/du_j.
            buf_CV = logits_NV[rows].to(h_NK1.dtype, copy=True)
            buf_CV.sub_(urest_N[rows, None]).exp_().mul_(h_NK1[rows, k:])
            buf_CV.scatter_(1, ids_NK[rows], h_NK1[rows, :k])
            grad_NV[rows] = buf_CV
        return grad_NV, None, None, None


def _check_tensors(
    logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor | None
) -> tuple[int, int, int]:
    """Shape, dtype and device checks that need no device sync. Returns (N, V, k)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"student_logits: expected a 2-D floating tensor [N, V], got shape {tuple(logits.shape)} "
            f"dtype {logits.dtype}"
        )
    n_rows, vocab = logits.shape
    if ids.dim() != 2 or ids.shape[0] != n_rows or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"teacher_ids: expected an integer tensor [N, k] with N={n_rows} rows, got shape "
            f"{tuple(ids.shape)} dtype {ids.dtype}"
        )
    k = ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(
            f"teacher_ids: expected 1 <= k <= V={vocab} (the student's vocabulary size), got k={k}"
        )
    if logprobs.shape != ids.shape or not logprobs.is_floating_point():
        raise ValueError(
            f"teacher_logprobs: expected a floating tensor of shape {tuple(ids.shape)} (as teacher_ids), "
            f"got shape {tuple(logprobs.shape)} dtype {logprobs.dtype}"
        )
    if mask is not None and (mask.shape != (n_rows,) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask: expected a bool tensor of shape ({n_rows},), "
            f"got shape {tuple(mask.shape)} dtype {mask.dtype}"
        )
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", logprobs), ("mask", mask)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name}: expected device {logits.device} (as student_logits), got {t.device}")
    return n_rows, vocab, k


def _check_scalars(beta: float, temperature: float, normalizer: float | torch.Tensor | None) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dtype == torch.bool:
            raise ValueError(
                f"normalizer: expected a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
            )
    elif normalizer is not None and not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(
            f"normalizer: expected a finite number > 0 (a count of loss tokens), got {normalizer}"
        )


def topk_gkd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mode: str = "tail",
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generalized JSD between the teacher's top-k distribution and the student, summed over masked rows.

    Args:
        student_logits: [N, V] fp32, bf16 or fp16 (fp64 is computed in fp64); the gradient flows here.
        teacher_ids: [N, k] int32/int64 token ids in [0, V), distinct within a row, any order.
        teacher_logprobs: [N, k] fp16/fp32 natural-log probabilities normalized over the teacher's full
            vocabulary (no gradient flows to them).
        beta: in [0, 1]; beta * KL(P||M) + (1 - beta) * KL(Q||M) with M = beta P + (1 - beta) Q.
            beta = 0 is forward KL(P||Q) and beta = 1 reverse KL(Q||P) exactly (the limits of the
            GJSD divided by beta, resp. 1 - beta, as in TRL and ms-swift, so the scale jumps there).
        temperature: tau > 0; the student is q = softmax(z / tau), the teacher p ∝ p^(1/tau).
        mode: ``"tail"``: k + 1 categories, the top-k ids plus "rest", with p_rest = 1 - sum_K p
            (floored at TAIL_MASS_FLOOR, the row renormalized) and q_rest = 1 - sum_K q computed as a
            logsumexp over the complement of K. Exact when k = V and, at tau = 1, whenever the
            teacher's rest mass is above the floor. ``"renorm"``: p and q both renormalized over K
            (ms-swift's ``gkd_logits_topk``); exact for any tau, since tempering commutes with it.
        mask: [N] bool, the rows that count (None: all). Other rows may hold any ids or logprobs.
        normalizer: the loss is sum over masked rows / normalizer. Default: the masked row count
            (a loss with no masked rows is 0, not NaN). A trainer passes the global count of loss
            tokens over ranks and accumulation steps, so the sum of its losses is a global mean.
            A one-element tensor on the logits' device is used without a host sync.
        chunk_rows: rows per chunk (None: about CHUNK_BYTES of fp32 [C, V]); the result does not
            depend on it beyond rounding.

    Temperature in ``tail`` mode: full-vocabulary tempering needs sum over the tail of p_j^(1/tau),
    which top-k data does not determine (for a rest mass r it lies anywhere between r^(1/tau) and
    (V - k)^(1 - 1/tau) r^(1/tau) when tau > 1). So both sides are tempered as (k + 1)-category
    distributions: P = softmax([log p_K, log p_rest] / tau), Q = softmax([log q_K, log q_rest] / tau)
    with q = softmax(z) at tau = 1. This equals full-vocabulary tempering at tau = 1 and at k = V;
    otherwise the ratios among the K entries are exact but the rest category's share differs (for
    tau > 1 it is smaller than full-vocabulary tempering would give). The same map on both sides
    keeps the optimum: the loss is 0 exactly when the untempered (k + 1)-category distributions agree.

    Returns:
        (loss, stats): loss is a 0-dim fp32 (fp64 for fp64 logits) tensor. stats, python floats over
        masked rows (0.0 when there are none): ``teacher_mass`` mean sum_K p, ``student_mass`` mean
        sum_K softmax(z) (both untempered), ``top1_in_topk`` fraction of rows whose student argmax is
        in K, ``loss_sum`` the sum before dividing by the normalizer, ``rows`` the masked row count.
        One host sync (a single ``.tolist()``) per call.

    Raises:
        ValueError: bad shapes, dtypes or devices; beta outside [0, 1]; temperature <= 0; unknown
            mode; chunk_rows < 1; normalizer <= 0; in masked rows, ids outside [0, V), repeated ids,
            or NaN/+inf/all -inf logprobs. Each message says what was expected and what came.
    """
    n_rows, vocab, k = _check_tensors(student_logits, teacher_ids, teacher_logprobs, mask)
    _check_scalars(beta, temperature, normalizer)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows: expected an integer >= 1 or None, got {chunk_rows!r}")
    cdt = _compute_dtype(student_logits.dtype)
    device = student_logits.device
    mask_N = torch.ones(n_rows, dtype=torch.bool, device=device) if mask is None else mask
    ids_NK = teacher_ids.long()
    # Value checks need a host sync, so they ride on the one .tolist() below; until then clamped ids
    # keep gather/scatter in bounds (on CUDA a bad index is a device assert, not an exception), and
    # unmasked rows get a harmless teacher row so that nothing there can produce NaN.
    safe_ids_NK = ids_NK.clamp(0, vocab - 1)
    logp_NK = torch.where(mask_N[:, None], teacher_logprobs.to(cdt), -math.log(k + 1))
    cfg = _Config(
        beta=float(beta),
        tau=float(temperature),
        tail=mode == "tail" and k < vocab,
        chunk_rows=chunk_rows or max(1, CHUNK_BYTES // (4 * vocab)),
        need_grad=torch.is_grad_enabled() and student_logits.requires_grad,
    )
    loss_N, tmass_N, smass_N, top1_N = _TopKGKD.apply(student_logits, safe_ids_NK, logp_NK, cfg)

    def masked_sum(x_N: torch.Tensor) -> torch.Tensor:
        return torch.where(mask_N, x_N, x_N.new_zeros(())).sum()

    loss_sum = masked_sum(loss_N)
    rows = mask_N.sum()
    sorted_NK = ids_NK.sort(1).values
    checks = [
        (((ids_NK < 0) | (ids_NK >= vocab)).any(1) & mask_N).sum(),
        torch.where(mask_N[:, None], ids_NK, 0).amin() if n_rows else rows,
        torch.where(mask_N[:, None], ids_NK, 0).amax() if n_rows else rows,
        ((sorted_NK[:, 1:] == sorted_NK[:, :-1]).any(1) & mask_N).sum(),
        (((~(teacher_logprobs < math.inf)).any(1) | (teacher_logprobs == -math.inf).all(1)) & mask_N).sum(),
    ]
    denom: torch.Tensor | float
    if normalizer is None:
        denom = rows.clamp(min=1).to(cdt)
    elif isinstance(normalizer, torch.Tensor):
        denom = normalizer.reshape(()).to(device=device, dtype=cdt)
    else:
        denom = float(normalizer)  # a python number: no host-to-device copy (that would sync)
    denom_t = denom if isinstance(denom, torch.Tensor) else rows  # rows: a placeholder, not used
    scalars = [loss_sum, rows, masked_sum(tmass_N), masked_sum(smass_N), masked_sum(top1_N), denom_t, *checks]
    (loss_sum_f, rows_f, tmass_f, smass_f, top1_f, denom_f, n_bad, lo, hi, n_dup, n_nan) = torch.stack(
        [s.detach().to(torch.float64) for s in scalars]
    ).tolist()
    denom_f = denom if isinstance(denom, float) else denom_f
    if n_bad:
        offending = int(lo) if lo < 0 else int(hi)
        raise ValueError(
            f"teacher_ids: expected ids in [0, {vocab}) for the student's vocabulary size V={vocab}, "
            f"got {offending} ({int(n_bad)} row(s) out of range)"
        )
    if n_dup:
        raise ValueError(
            f"teacher_ids: expected k={k} distinct ids per row, got repeats in {int(n_dup)} row(s)"
        )
    if n_nan:
        raise ValueError(
            "teacher_logprobs: expected log-probabilities (finite or -inf, not all -inf in a row), "
            f"got NaN, +inf or an all -inf row in {int(n_nan)} row(s)"
        )
    if not (math.isfinite(denom_f) and denom_f > 0):
        raise ValueError(f"normalizer: expected a finite number > 0 (a count of loss tokens), got {denom_f}")
    per_row = 1.0 / max(rows_f, 1.0)
    stats = {
        "teacher_mass": tmass_f * per_row,
        "student_mass": smass_f * per_row,
        "top1_in_topk": top1_f * per_row,
        "loss_sum": loss_sum_f,
        "rows": rows_f,
    }
    return loss_sum / denom, stats


def full_vocab_gjsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-vocabulary generalized JSD, the loss of an in-process teacher (reference and benchmark baseline).

    student_logits and teacher_logits are [N, V] (any float dtype, computed in fp32, fp64 stays
    fp64); q = softmax(z / tau), p = softmax(t / tau). beta, mask and normalizer mean what they mean
    in ``topk_gkd_loss``. Plain autograd: it materializes several [N, V] fp32 tensors. Returns a
    0-dim tensor with gradient to student_logits only. Raises ValueError on mismatched shapes or bad
    beta, temperature or normalizer.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits: expected shape {tuple(student_logits.shape)} (as student_logits, [N, V]), "
            f"got {tuple(teacher_logits.shape)}"
        )
    _check_scalars(beta, temperature, normalizer)
    n_rows = student_logits.shape[0]
    if mask is not None and (mask.shape != (n_rows,) or mask.dtype != torch.bool):
        raise ValueError(f"mask: expected a bool tensor of shape ({n_rows},), got shape {tuple(mask.shape)}")
    cdt = _compute_dtype(student_logits.dtype)
    l_NV = torch.log_softmax(student_logits.to(cdt) / temperature, -1)
    a_NV = torch.log_softmax(teacher_logits.detach().to(cdt) / temperature, -1)
    if beta == 0.0:
        rows_N = (a_NV.exp() * (a_NV - l_NV)).sum(-1)
    elif beta == 1.0:
        rows_N = (l_NV.exp() * (l_NV - a_NV)).sum(-1)
    else:
        logm_NV = torch.logaddexp(a_NV + math.log(beta), l_NV + math.log1p(-beta))
        rows_N = beta * (a_NV.exp() * (a_NV - logm_NV)).sum(-1)
        rows_N = rows_N + (1 - beta) * (l_NV.exp() * (l_NV - logm_NV)).sum(-1)
    mask_N = torch.ones(n_rows, dtype=torch.bool, device=l_NV.device) if mask is None else mask
    total = torch.where(mask_N, rows_N, rows_N.new_zeros(())).sum()
    if normalizer is None:
        return total / mask_N.sum().clamp(min=1).to(cdt)
    if isinstance(normalizer, torch.Tensor):
        return total / normalizer.reshape(()).to(device=total.device, dtype=cdt)
    return total / float(normalizer)
