"""What every entry point of the loss shares: settings, input checks, teacher-row preparation, the
single host sync that turns per-row results into (loss, stats), and the gradient of a block of logits.

Shape legend: see ``pipeline.train.loss`` (N rows, V vocabulary, K teacher entries, C rows of a chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("tail", "renorm", "sampled")

TAIL_MASS_FLOOR = 1e-6
"""Smallest teacher "rest" mass in ``tail`` mode. 1 - sum_K p is not resolvable below about k x fp32
epsilon (fp16 logprobs are coarser still, and can sum above 1); without a floor a rounding-level
rest mass of 0 would make reverse KL infinite for any student mass outside K."""

CHUNK_BYTES = 256 * 2**20
"""Target size of one chunk's fp32 [C, V] working tensor when ``chunk_rows`` is None."""


@dataclass(frozen=True)
class Config:
    """How the per-row losses of one call are computed."""

    beta: float
    tau: float
    kind: str
    """``tail``, ``renorm`` (also ``tail`` with k == V, where the two agree exactly) or ``sampled``."""
    chunk_rows: int
    need_grad: bool

    @property
    def dense_grad(self) -> bool:
        """Whether logits outside the teacher's entries get gradient (all but ``renorm``)."""
        return self.kind != "renorm"

    @property
    def zscale(self) -> float:
        """The gradient outside K is dense_N * exp(z * zscale - off_N): softmax(z) or softmax(z / tau)."""
        return 1.0 / self.tau if self.kind == "sampled" else 1.0


@dataclass(frozen=True)
class Teacher:
    """A call's teacher rows, made safe to compute on before the value checks (which need a host sync)."""

    cfg: Config
    mask_N: torch.Tensor
    ids_NK: torch.Tensor
    """int64, clamped into [0, V); in ``sampled`` mode undrawn entries may repeat ids (weight 0)."""
    logp_NK: torch.Tensor
    """Compute dtype; rows outside the mask (and undrawn entries) hold harmless finite values."""
    counts_NK: torch.Tensor | None
    """``sampled`` mode: draw counts in the compute dtype (0 outside the mask's drawn entries)."""
    raw_ids_NK: torch.Tensor
    raw_logp_NK: torch.Tensor
    raw_counts_NK: torch.Tensor | None
    vocab: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower inputs; fp64 inputs stay fp64 (for float64 gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_teacher(
    n_rows: int,
    vocab: int,
    device: torch.device,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    counts: torch.Tensor | None,
    mask: torch.Tensor | None,
    owner: str,
) -> int:
    """Shape, dtype and device checks of the teacher tensors (no device sync). Returns k."""
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
    if counts is not None and (
        counts.shape != ids.shape or counts.is_floating_point() or counts.dtype == torch.bool
    ):
        raise ValueError(
            f"teacher_counts: expected an integer tensor of shape {tuple(ids.shape)} (as teacher_ids), "
            f"got shape {tuple(counts.shape)} dtype {counts.dtype}"
        )
    if mask is not None and (mask.shape != (n_rows,) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask: expected a bool tensor of shape ({n_rows},), "
            f"got shape {tuple(mask.shape)} dtype {mask.dtype}"
        )
    named = (("teacher_ids", ids), ("teacher_logprobs", logprobs), ("teacher_counts", counts), ("mask", mask))
    for name, t in named:
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected device {device} (as {owner}), got {t.device}")
    return k


def check_scalars(beta: float, temperature: float, normalizer: float | torch.Tensor | None) -> None:
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


def check_mode(mode: str, beta: float, counts: torch.Tensor | None, chunk_rows: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "sampled" and beta != 0.0:
        raise ValueError(
            f"beta: mode 'sampled' supports beta=0 (forward KL, the RS-KD estimator) only, got {beta}; "
            "use mode 'tail' or 'renorm' for beta > 0"
        )
    if (mode == "sampled") != (counts is not None):
        raise ValueError(
            "teacher_counts: expected the draw counts in mode 'sampled' and nothing in other modes, "
            f"got {'none' if counts is None else 'counts'} with mode {mode!r}"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows: expected an integer >= 1 or None, got {chunk_rows!r}")


def check_call(
    n_rows: int,
    vocab: int,
    device: torch.device,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    owner: str,
    *,
    beta: float,
    temperature: float,
    normalizer: float | torch.Tensor | None,
    mode: str,
    chunk_rows: int | None,
) -> None:
    """Every argument check a loss call makes before computing (no device sync): `teacher` is (ids,
    logprobs, counts, mask) as the caller got them; ValueError naming the argument otherwise."""
    ids, logprobs, counts, mask = teacher
    check_teacher(n_rows, vocab, device, ids, logprobs, counts, mask, owner)
    check_scalars(beta, temperature, normalizer)
    check_mode(mode, beta, counts, chunk_rows)


def plan(
    dtype: torch.dtype,
    vocab: int,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    *,
    beta: float,
    temperature: float,
    mode: str,
    chunk_rows: int,
    need_grad: bool,
) -> tuple[Teacher, torch.dtype]:
    """(the call's Config and teacher rows made safe, the compute dtype) for inputs of `dtype`: ``tail``
    with k == V is computed as ``renorm`` (the two agree exactly there)."""
    ids, logprobs, counts, mask = teacher
    cdt = compute_dtype(dtype)
    cfg = Config(
        beta=float(beta),
        tau=float(temperature),
        kind="renorm" if mode == "tail" and ids.shape[1] == vocab else mode,
        chunk_rows=chunk_rows,
        need_grad=need_grad,
    )
    return prepare_teacher(cfg, vocab, cdt, ids, logprobs, counts, mask), cdt


def prepare_teacher(
    cfg: Config,
    vocab: int,
    cdt: torch.dtype,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    counts: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> Teacher:
    """Teacher rows safe to compute on. The value checks ride on ``finish``'s single host sync; until then
    clamped ids keep gather/scatter in bounds (on CUDA a bad index is a device assert, not an exception),
    and rows outside the mask get a harmless teacher row so that nothing there can produce NaN."""
    n_rows, k = ids.shape
    mask_N = torch.ones(n_rows, dtype=torch.bool, device=ids.device) if mask is None else mask
    ids_NK = ids.long()
    safe_ids_NK = ids_NK.clamp(0, vocab - 1)
    logp_NK = torch.where(mask_N[:, None], logprobs.to(cdt), -math.log(k + 1))
    counts_NK = None
    if counts is not None:
        drawn_NK = (counts > 0) & mask_N[:, None]
        counts_NK = torch.where(drawn_NK, counts.to(cdt), 0.0)
        # Undrawn entries carry no weight; a finite logprob there keeps 0 * x free of NaN.
        logp_NK = torch.where(drawn_NK, logp_NK, 0.0)
        # Rows outside the mask: one draw of their first entry, so weights normalize without 0 / 0.
        counts_NK[:, 0] = torch.where(mask_N, counts_NK[:, 0], 1.0)
    return Teacher(cfg, mask_N, safe_ids_NK, logp_NK, counts_NK, ids_NK, logprobs, counts, vocab)


def _value_checks(t: Teacher) -> list[torch.Tensor]:
    """Counts of bad masked rows (device tensors, read at the host sync): ids out of range, lowest and
    highest id, repeated ids, bad logprobs, bad counts."""
    ids_NK, mask_N, vocab = t.raw_ids_NK, t.mask_N, t.vocab
    lp = t.raw_logp_NK
    if t.raw_counts_NK is None:
        live_NK = torch.ones_like(ids_NK, dtype=torch.bool)
        bad_lp_N = (~(lp < math.inf)).any(1) | (lp == -math.inf).all(1)
        bad_counts_N = torch.zeros_like(mask_N)
    else:
        live_NK = t.raw_counts_NK > 0
        # A drawn token has probability > 0: its logprob must be finite and at most 0 (plus rounding).
        bad_lp_N = (live_NK & ~((lp > -math.inf) & (lp < 1e-2))).any(1)
        bad_counts_N = (t.raw_counts_NK < 0).any(1) | ~live_NK.any(1)
    # Only live entries must be distinct: undrawn entries get distinct negative keys.
    spare_K = -1 - torch.arange(ids_NK.shape[1], device=ids_NK.device)
    sorted_NK = torch.where(live_NK, ids_NK, spare_K).sort(1).values
    out_of_range_N = (((ids_NK < 0) | (ids_NK >= vocab)) & live_NK).any(1) & mask_N
    live_ids_NK = torch.where(live_NK & mask_N[:, None], ids_NK, 0)
    empty = ids_NK.numel() == 0
    return [
        out_of_range_N.sum(),
        live_ids_NK.amin() if not empty else mask_N.sum(),
        live_ids_NK.amax() if not empty else mask_N.sum(),
        ((sorted_NK[:, 1:] == sorted_NK[:, :-1]).any(1) & mask_N).sum(),
        (bad_lp_N & mask_N).sum(),
        (bad_counts_N & mask_N).sum(),
    ]


def finish(
    t: Teacher,
    rows_N: dict[str, torch.Tensor],
    normalizer: float | torch.Tensor | None,
    cdt: torch.dtype,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked sums of the per-row ``loss``, ``tmass``, ``smass`` and ``top1``, the value checks, and
    the loss divided by its normalizer, with one host sync (a single ``.tolist()``)."""
    mask_N = t.mask_N

    def masked_sum(x_N: torch.Tensor) -> torch.Tensor:
        return torch.where(mask_N, x_N, x_N.new_zeros(())).sum()

    loss_sum = masked_sum(rows_N["loss"])
    rows = mask_N.sum()
    denom: torch.Tensor | float
    if normalizer is None:
        denom = rows.clamp(min=1).to(cdt)
    elif isinstance(normalizer, torch.Tensor):
        denom = normalizer.reshape(()).to(device=mask_N.device, dtype=cdt)
    else:
        denom = float(normalizer)  # a python number: no host-to-device copy (that would sync)
    denom_t = denom if isinstance(denom, torch.Tensor) else rows  # rows: a placeholder, not used
    sums = [masked_sum(rows_N[name]) for name in ("tmass", "smass", "top1")]
    scalars = [loss_sum, rows, *sums, denom_t, *_value_checks(t)]
    (loss_sum_f, rows_f, tmass_f, smass_f, top1_f, denom_f, n_bad, lo, hi, n_dup, n_lp, n_counts) = (
        torch.stack([s.detach().to(torch.float64) for s in scalars]).tolist()
    )
    denom_f = denom if isinstance(denom, float) else denom_f
    _raise_on_bad_values(t, int(n_bad), int(lo), int(hi), int(n_dup), int(n_lp), int(n_counts), denom_f)
    per_row = 1.0 / max(rows_f, 1.0)
    stats = {
        "teacher_mass": tmass_f * per_row,
        "student_mass": smass_f * per_row,
        "top1_in_topk": top1_f * per_row,
        "loss_sum": loss_sum_f,
        "rows": rows_f,
    }
    return loss_sum / denom, stats


def _raise_on_bad_values(
    t: Teacher, n_bad: int, lo: int, hi: int, n_dup: int, n_lp: int, n_counts: int, denom: float
) -> None:
    vocab, k = t.vocab, t.raw_ids_NK.shape[1]
    if n_bad:
        raise ValueError(
            f"teacher_ids: expected ids in [0, {vocab}) for the student's vocabulary size V={vocab}, "
            f"got {lo if lo < 0 else hi} ({n_bad} row(s) out of range)"
        )
    if n_dup:
        what = "drawn ids (count > 0)" if t.raw_counts_NK is not None else f"k={k} ids"
        raise ValueError(f"teacher_ids: expected distinct {what} per row, got repeats in {n_dup} row(s)")
    if n_counts:
        raise ValueError(
            "teacher_counts: expected counts >= 0 with at least one drawn entry (count > 0) per row, "
            f"got negative counts or no draws in {n_counts} row(s)"
        )
    if n_lp:
        expected = (
            "finite log-probabilities <= 0 for drawn entries"
            if t.raw_counts_NK is not None
            else "log-probabilities (finite or -inf, not all -inf in a row)"
        )
        raise ValueError(
            f"teacher_logprobs: expected {expected}, got NaN, +inf or an all -inf row in {n_lp} row(s)"
            if t.raw_counts_NK is None
            else f"teacher_logprobs: expected {expected}, got NaN, -inf or > 0 in {n_lp} row(s)"
        )
    if not (math.isfinite(denom) and denom > 0):
        raise ValueError(f"normalizer: expected a finite number > 0 (a count of loss tokens), got {denom}")


@dataclass(frozen=True)
class RowGrad:
    """dL/dz of a set of rows, kept at O(N x K): ``h_NK`` at the teacher's entries; elsewhere
    ``dense_N * exp(z * zscale - off_N)``, or 0 when ``dense_N`` is None (``renorm``). ``accumulate``: h
    adds to the dense part at the ids (``sampled``, whose undrawn entries may repeat an id with h = 0)
    instead of replacing it (``tail`` and ``renorm``, whose ids are distinct)."""

    h_NK: torch.Tensor
    dense_N: torch.Tensor | None
    off_N: torch.Tensor | None
    zscale: float
    accumulate: bool

    def scaled(self, g_N: torch.Tensor) -> RowGrad:
        """Times the upstream per-row gradient; rows with zero upstream gradient get exactly 0, whatever
        their h holds."""
        keep_N = g_N != 0
        zero = self.h_NK.new_zeros(())
        h_NK = torch.where(keep_N[:, None], self.h_NK * g_N[:, None], zero)
        dense_N = None if self.dense_N is None else torch.where(keep_N, self.dense_N * g_N, zero)
        return RowGrad(h_NK, dense_N, self.off_N, self.zscale, self.accumulate)

    def block(
        self,
        z_CB: torch.Tensor | None,
        rows: slice,
        cols_CK: torch.Tensor,
        width: int,
        spill: bool,
        buf: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """dL/dz for ``rows`` over a block of ``width`` vocabulary columns, in the compute dtype: [C, B].

        ``z_CB``: those rows' logits over the block (unused, may be None, in ``renorm``). ``cols_CK``: the
        teacher ids as column indices into the block; with ``spill``, ids outside the block must point at
        column ``width``, an extra column that is cut off (the result is then a strided view). ``buf``:
        a reusable compute-dtype buffer of at least [C, width + spill] to write into (default: a new one).
        """
        c = rows.stop - rows.start
        h_CK = self.h_NK[rows]
        if buf is None:
            buf = h_CK.new_empty(c, width + spill)
        buf_CB = buf[:c, : width + spill]
        body_CB = buf_CB[:, :width]
        if self.dense_N is None or self.off_N is None:
            buf_CB.zero_()
        else:
            assert z_CB is not None, "the logits block is needed for a dense gradient"
            body_CB.copy_(z_CB)
            if self.zscale != 1.0:
                body_CB.mul_(self.zscale)
            body_CB.sub_(self.off_N[rows, None]).exp_().mul_(self.dense_N[rows, None])
            if spill:
                buf_CB[:, width] = 0
        if self.accumulate:
            buf_CB.scatter_add_(1, cols_CK, h_CK)
        else:
            buf_CB.scatter_(1, cols_CK, h_CK)
        return body_CB
