"""``full_vocab_gjsd``: the full-vocabulary loss of an in-process teacher (reference, benchmark baseline)."""

from __future__ import annotations

import math

import torch

from pipeline.train.loss.common import check_scalars, compute_dtype


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
    check_scalars(beta, temperature, normalizer)
    n_rows = student_logits.shape[0]
    if mask is not None and (mask.shape != (n_rows,) or mask.dtype != torch.bool):
        raise ValueError(f"mask: expected a bool tensor of shape ({n_rows},), got shape {tuple(mask.shape)}")
    cdt = compute_dtype(student_logits.dtype)
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
