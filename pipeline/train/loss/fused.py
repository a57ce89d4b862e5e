"""``fused_topk_gkd_loss``: the loss straight from the last hidden states and the LM-head weight, so that
the student's [N, V] logits never exist (as Liger's fused linear JSD does for the full-vocabulary JSD).

Forward: logits of C rows at a time (C x V), the per-row loss and the O(N x K) parts of dL/dz
(``RowGrad``). Backward: vocabulary tiles of B columns over all N rows, recomputing the tile's logits
(only where the gradient is dense: ``tail``, ``sampled``), then dL/dhidden += G W_tile and
dL/dW_tile = G^T hidden, each weight tile written once. Extra memory: one [C, V] chunk in the forward,
one [N, B] tile in the backward, an fp32 [N, H] accumulator for the hidden states' gradient, and the
weight's gradient itself. Cost: the logits version's three matmuls plus one (the recompute), none in
``renorm`` mode, which needs no logits in its backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pipeline.train.loss.common import CHUNK_BYTES, Config, RowGrad, check_call, compute_dtype, finish, plan
from pipeline.train.loss.logits import STAT_NAMES, forward_rows

MIN_CHUNK_BYTES = 32 * 2**20
"""Smallest fp32 working block of the defaults: below it per-op overhead outweighs the memory saved."""


def _target_bytes(n_rows: int, hidden: int) -> int:
    """An fp32 working block about twice the size of fp32 hidden states [N, H] (Liger sizes chunks like
    the hidden states; larger blocks cost fewer, bigger kernels), within [MIN_CHUNK_BYTES, CHUNK_BYTES]."""
    return min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, 8 * n_rows * hidden))


def default_chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Forward rows per chunk: an fp32 [C, V] chunk of about ``_target_bytes``."""
    return max(1, _target_bytes(n_rows, hidden) // (4 * vocab))


def default_vocab_tile(n_rows: int, hidden: int, vocab: int) -> int:
    """Backward vocabulary columns per tile: an fp32 [N, B] tile of about ``_target_bytes``."""
    return max(1, min(vocab, _target_bytes(n_rows, hidden) // (4 * max(n_rows, 1))))


class _FusedGKD(torch.autograd.Function):
    """Per-row loss [N] from hidden states and the LM head. Inputs are validated by the caller."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_NH: torch.Tensor,
        weight_VH: torch.Tensor,
        bias_V: torch.Tensor | None,
        ids_NK: torch.Tensor,
        logp_NK: torch.Tensor,
        counts_NK: torch.Tensor | None,
        cfg: Config,
        vocab_tile: int,
    ) -> tuple[torch.Tensor, ...]:
        cdt = compute_dtype(hidden_NH.dtype)
        n_rows, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        # One scratch buffer for every chunk's logits: no allocator churn, and the loss may overwrite it.
        chunk_CV = hidden_NH.new_empty(min(cfg.chunk_rows, n_rows), vocab)

        def logits_for(rows: slice) -> torch.Tensor:
            out_CV = chunk_CV[: rows.stop - rows.start]
            torch.mm(hidden_NH[rows], weight_VH.t(), out=out_CV)
            return out_CV if bias_V is None else out_CV.add_(bias_V)

        with torch.autocast(hidden_NH.device.type, enabled=False):
            outs, grad = forward_rows(
                logits_for, n_rows, ids_NK, logp_NK, counts_NK, cfg, cdt, hidden_NH.device, owned=True
            )
        ctx.cfg, ctx.grad, ctx.vocab_tile, ctx.has_bias = cfg, grad, vocab_tile, bias_V is not None
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, ids_NK)
        ctx.mark_non_differentiable(outs["tmass"], outs["smass"], outs["top1"])
        return tuple(outs[name] for name in STAT_NAMES)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden_NH, weight_VH, bias_V, ids_NK = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden_NH.device.type, enabled=False):
            grad_h, grad_w, grad_b = _backward_tiles(
                ctx.grad.scaled(grads[0]),
                ctx.cfg,
                ctx.vocab_tile,
                hidden_NH,
                weight_VH,
                bias_V,
                ids_NK,
                (need_h, need_w, need_b and ctx.has_bias),
            )
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _backward_tiles(
    grad: RowGrad,
    cfg: Config,
    tile: int,
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    ids_NK: torch.Tensor,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dL/dhidden, dL/dW, dL/db over vocabulary tiles (None where not needed)."""
    n_rows = hidden_NH.shape[0]
    vocab = weight_VH.shape[0]
    acc_dt = compute_dtype(hidden_NH.dtype)  # fp32 for bf16: the sum over tiles must not round per tile
    grad_h = torch.zeros(hidden_NH.shape, dtype=acc_dt, device=hidden_NH.device) if need[0] else None
    grad_w = torch.empty_like(weight_VH) if need[1] else None
    grad_b = torch.empty_like(bias_V) if need[2] and bias_V is not None else None
    rows = slice(0, n_rows)
    buf = torch.empty(n_rows, min(tile, vocab) + 1, dtype=acc_dt, device=hidden_NH.device)
    tile_NK = torch.div(ids_NK, tile, rounding_mode="floor")  # which tile each teacher id falls in
    local_NK = ids_NK - tile_NK * tile
    for index, v0 in enumerate(range(0, vocab, tile)):
        v1 = min(vocab, v0 + tile)
        width = v1 - v0
        w_BH = weight_VH[v0:v1]
        z_NB = None
        if cfg.dense_grad:
            z_NB = F.linear(hidden_NH, w_BH, None if bias_V is None else bias_V[v0:v1])
        cols_NK = torch.where(tile_NK == index, local_NK, width)
        g_NB = grad.block(z_NB, rows, cols_NK, width, spill=True, buf=buf).to(hidden_NH.dtype)
        del z_NB
        if grad_h is not None:
            if grad_h.dtype == g_NB.dtype:
                grad_h.addmm_(g_NB, w_BH)
            else:
                grad_h += (g_NB @ w_BH).to(acc_dt)
        if grad_w is not None:
            torch.mm(g_NB.t(), hidden_NH, out=grad_w[v0:v1])
        if grad_b is not None:
            grad_b[v0:v1] = g_NB.sum(0, dtype=acc_dt)
    return (None if grad_h is None else grad_h.to(hidden_NH.dtype)), grad_w, grad_b


def _is_sharded(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden: expected a 2-D floating tensor [N, H], got shape {tuple(hidden.shape)} "
            f"dtype {hidden.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or not weight.is_floating_point():
        raise ValueError(
            f"weight: expected a floating tensor [V, H] with H={hidden.shape[1]} (as hidden), "
            f"got shape {tuple(weight.shape)} dtype {weight.dtype}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and _is_sharded(t):
            raise ValueError(
                f"{name}: expected an unsharded torch.Tensor, got a DTensor (FSDP-sharded); pass the full "
                "LM-head weight (e.g. inside the FSDP module's forward, or after unshard())"
            )
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} (as hidden), got {t.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (V, as weight), got {tuple(bias.shape)}")
    autocast = torch.is_autocast_enabled(hidden.device.type)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype and not autocast:
            raise ValueError(
                f"{name}: expected dtype {hidden.dtype} (as hidden), got {t.dtype}; cast it "
                f"(e.g. weight.to(hidden.dtype), which autograd differentiates) or run under torch.autocast"
            )


def fused_topk_gkd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    mode: str = "tail",
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    vocab_tile: int | None = None,
    teacher_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``topk_gkd_loss(F.linear(hidden, weight, bias), ...)`` without ever building the [N, V] logits.

    The contract is ``topk_gkd_loss``'s (same modes, beta, temperature, mask, normalizer, teacher tensors,
    stats, errors, one host sync), with the logits replaced by the LM head applied to the hidden states:
    the value and the gradients to ``hidden``, ``weight`` and ``bias`` equal those of the logits version
    up to rounding (exactly so in float64; tested).

    Args:
        hidden: [N, H] the student's last hidden states at the loss rows (after the final norm), fp32,
            bf16, fp16 or fp64; gradient flows here.
        weight: [V, H] the LM-head weight, same dtype as ``hidden`` (or any, under torch.autocast, which
            then sets the matmul dtype as it would for ``lm_head``). It must be the full, unsharded
            tensor: under FSDP call this where the LM head is unsharded (a DTensor is refused). Gradient
            flows here (a tied embedding receives it as usual).
        teacher_ids, teacher_logprobs, teacher_counts, mask, normalizer, beta, temperature, mode: as in
            ``topk_gkd_loss`` (rows of ``hidden``).
        bias: [V] optional LM-head bias (gradient flows here).
        chunk_rows: forward rows per chunk (None: ``default_chunk_rows``, fp32 [C, V] about 2x [N, H]).
        vocab_tile: backward vocabulary columns per tile (None: ``default_vocab_tile``). Neither changes
            the result beyond rounding.

    Memory: the logits version holds [N, V] logits and their gradient; this holds one [C, V] chunk (and
    its fp32 copies) in the forward and one [N, B] tile in the backward, plus an fp32 [N, H] accumulator
    and the weight's gradient. The matmuls run in the inputs' dtype (bf16 on GPU), the loss math in fp32.

    Returns:
        (loss, stats) exactly as ``topk_gkd_loss``: loss a 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    _check_linear(hidden, weight, bias)
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    given = (teacher_ids, teacher_logprobs, teacher_counts, mask)
    scalars: dict[str, Any] = {"beta": beta, "temperature": temperature, "mode": mode}
    check_call(n_rows, vocab, hidden.device, given, "hidden", normalizer=normalizer, chunk_rows=chunk_rows,
               **scalars)  # fmt: skip
    if vocab_tile is not None and (not isinstance(vocab_tile, int) or vocab_tile < 1):
        raise ValueError(f"vocab_tile: expected an integer >= 1 or None, got {vocab_tile!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what autocast would do to the lm_head's linear
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    teacher, cdt = plan(
        hidden.dtype, vocab, given, chunk_rows=chunk_rows or default_chunk_rows(n_rows, width, vocab),
        need_grad=torch.is_grad_enabled() and needs_grad, **scalars,
    )  # fmt: skip
    tile = vocab_tile or default_vocab_tile(n_rows, width, vocab)
    per_row = _FusedGKD.apply(
        hidden, weight, bias, teacher.ids_NK, teacher.logp_NK, teacher.counts_NK, teacher.cfg, tile
    )
    return finish(teacher, dict(zip(STAT_NAMES, per_row, strict=True)), normalizer, cdt)
