"""``topk_gkd_loss``: the loss on the student's [N, V] logits, forward and backward in chunks of rows.

The logits are never upcast to fp32 all at once: forward and backward walk over chunks of C rows, so
the extra memory is O(C x V) plus the gradient itself (which has the logits' shape and dtype), and no
[N, V] teacher tensor exists at all. ``fused.py`` goes further and never builds [N, V] at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from pipeline.train.loss.common import CHUNK_BYTES, Config, RowGrad, check_call, compute_dtype, finish, plan
from pipeline.train.loss.divergence import chunk_forward

STAT_NAMES = ("loss", "tmass", "smass", "top1")


def forward_rows(
    logits_for: Any,
    n_rows: int,
    ids_NK: torch.Tensor,
    logp_NK: torch.Tensor,
    counts_NK: torch.Tensor | None,
    cfg: Config,
    cdt: torch.dtype,
    device: torch.device,
    owned: bool = False,
) -> tuple[dict[str, torch.Tensor], RowGrad | None]:
    """Run ``chunk_forward`` over chunks of ``cfg.chunk_rows`` rows; ``logits_for(rows)`` gives a
    chunk's [C, V] logits (a scratch buffer the loss may overwrite if ``owned``). Returns the per-row
    results and (with ``cfg.need_grad``) the gradient parts."""
    outs = {name: torch.zeros(n_rows, dtype=cdt, device=device) for name in STAT_NAMES}
    k = ids_NK.shape[1]
    h_NK = torch.zeros((n_rows, k) if cfg.need_grad else (0, 0), dtype=cdt, device=device)
    dense_N = torch.zeros(n_rows, dtype=cdt, device=device) if cfg.need_grad and cfg.dense_grad else None
    off_N = torch.zeros_like(dense_N) if dense_N is not None else None
    for start in range(0, n_rows, cfg.chunk_rows):
        rows = slice(start, min(n_rows, start + cfg.chunk_rows))
        counts = counts_NK[rows] if counts_NK is not None else None
        chunk = chunk_forward(logits_for(rows), ids_NK[rows], logp_NK[rows], counts, cfg, cdt, owned)
        for name in STAT_NAMES:
            outs[name][rows] = chunk[name]
        if cfg.need_grad:
            h_NK[rows] = chunk["h"]
            if dense_N is not None and off_N is not None:
                dense_N[rows], off_N[rows] = chunk["dense"], chunk["off"]
    if not cfg.need_grad:
        return outs, None
    return outs, RowGrad(h_NK, dense_N, off_N, cfg.zscale, accumulate=cfg.kind == "sampled")


class _LogitsGKD(torch.autograd.Function):
    """Per-row loss [N] with a chunked, memory-bounded backward. Inputs are validated by the caller."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits_NV: torch.Tensor,
        ids_NK: torch.Tensor,
        logp_NK: torch.Tensor,
        counts_NK: torch.Tensor | None,
        cfg: Config,
    ) -> tuple[torch.Tensor, ...]:
        cdt = compute_dtype(logits_NV.dtype)
        outs, grad = forward_rows(
            lambda rows: logits_NV[rows],
            logits_NV.shape[0],
            ids_NK,
            logp_NK,
            counts_NK,
            cfg,
            cdt,
            logits_NV.device,
        )
        ctx.cfg, ctx.grad = cfg, grad
        ctx.save_for_backward(logits_NV, ids_NK)
        ctx.mark_non_differentiable(outs["tmass"], outs["smass"], outs["top1"])
        return tuple(outs[name] for name in STAT_NAMES)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        logits_NV, ids_NK = ctx.saved_tensors
        cfg: Config = ctx.cfg
        grad: RowGrad = ctx.grad.scaled(grads[0])
        n_rows, vocab = logits_NV.shape
        if not cfg.dense_grad:  # renorm: only the k gathered logits get gradient, in one scatter
            grad_NV = torch.zeros_like(logits_NV)
            grad_NV.scatter_(1, ids_NK, grad.h_NK.to(grad_NV.dtype))
            return grad_NV, None, None, None, None
        grad_NV = torch.empty_like(logits_NV)
        for start in range(0, n_rows, cfg.chunk_rows):
            rows = slice(start, min(n_rows, start + cfg.chunk_rows))
            grad_NV[rows] = grad.block(logits_NV[rows], rows, ids_NK[rows], vocab, spill=False)
        return grad_NV, None, None, None, None


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
    teacher_counts: torch.Tensor | None = None,
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
            ``"sampled"``: RS-KD (see ``pipeline.train.loss.sampled``): the teacher entries are the
            distinct tokens of n draws from the teacher, ``teacher_counts`` how often each was drawn;
            the loss is an unbiased estimate (at tau = 1) of forward KL over the full vocabulary, with
            an unbiased gradient. beta must be 0; undrawn entries (count 0) are padding and ignored.
        mask: [N] bool, the rows that count (None: all). Other rows may hold any ids or logprobs.
        normalizer: the loss is sum over masked rows / normalizer. Default: the masked row count
            (a loss with no masked rows is 0, not NaN). A trainer passes the global count of loss
            tokens over ranks and accumulation steps, so the sum of its losses is a global mean.
            A one-element tensor on the logits' device is used without a host sync.
        chunk_rows: rows per chunk (None: about CHUNK_BYTES of fp32 [C, V]); the result does not
            depend on it beyond rounding.
        teacher_counts: [N, k] integer draw counts, in ``sampled`` mode only.

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
        sum_K softmax(z) (both untempered; in ``sampled`` mode over the drawn ids), ``top1_in_topk``
        fraction of rows whose student argmax is in K, ``loss_sum`` the sum before dividing by the
        normalizer, ``rows`` the masked row count. One host sync (a single ``.tolist()``) per call.

    Raises:
        ValueError: bad shapes, dtypes or devices; beta outside [0, 1] (or not 0 in ``sampled`` mode);
            temperature <= 0; unknown mode; counts given without ``sampled`` mode or missing in it;
            chunk_rows < 1; normalizer <= 0; in masked rows, ids outside [0, V), repeated ids,
            NaN/+inf/all -inf logprobs, or (``sampled``) negative counts, rows without a draw, or
            drawn entries whose logprob is not finite. Each message says what was expected and what came.
    """
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits: expected a 2-D floating tensor [N, V], got shape {tuple(student_logits.shape)} "
            f"dtype {student_logits.dtype}"
        )
    n_rows, vocab = student_logits.shape
    given = (teacher_ids, teacher_logprobs, teacher_counts, mask)
    scalars: dict[str, Any] = {"beta": beta, "temperature": temperature, "mode": mode}
    check_call(n_rows, vocab, student_logits.device, given, "student_logits", normalizer=normalizer,
               chunk_rows=chunk_rows, **scalars)  # fmt: skip
    teacher, cdt = plan(
        student_logits.dtype, vocab, given, chunk_rows=chunk_rows or max(1, CHUNK_BYTES // (4 * vocab)),
        need_grad=torch.is_grad_enabled() and student_logits.requires_grad, **scalars,
    )  # fmt: skip
    per_row = _LogitsGKD.apply(
        student_logits, teacher.ids_NK, teacher.logp_NK, teacher.counts_NK, teacher.cfg
    )
    return finish(teacher, dict(zip(STAT_NAMES, per_row, strict=True)), normalizer, cdt)
