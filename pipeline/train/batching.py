"""ScoredSamples -> padded micro-batch tensors under a token budget, with the loss rows gathered flat.

Alignment (ARCHITECTURE.md, "The wire format"): teacher row r of a sample is the distribution over token
``prompt_len + r`` given the tokens before it, so it pairs with the student's logits at position
``prompt_len - 1 + r``. A sample of T tokens has R = T - prompt_len rows, at positions
``prompt_len - 1 .. T - 2``.

Shape legend (suffixes of tensor names):
    B   samples in a micro-batch
    T   padded sequence length (the longest sample of the micro-batch)
    N   loss rows of the micro-batch (sum of R over its samples), in (sample, position) order
    K   teacher top-k (or, sampled, the draws per position)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.queue.schema import DEFAULT_TEACHER
from pipeline.wire.codec import ScoredSample


@dataclass
class Batch:
    """One padded micro-batch. Sequences are right-padded, so default position ids are right."""

    input_ids_BT: torch.Tensor
    """int64 [B, T]; padding holds `pad_id`."""
    attention_mask_BT: torch.Tensor
    """int64 [B, T]; 1 on real tokens, 0 on padding."""
    loss_mask_BT: torch.Tensor
    """bool [B, T]; True at the student logit positions that have a teacher row (N of them)."""
    positions_N: torch.Tensor
    """int64 [N]; flat indices b * T + t of those positions, ascending (the order of the rows)."""
    teacher_ids_NK: torch.Tensor
    """int32 [N, K] (as on the wire); row n pairs with logits at positions_N[n]."""
    teacher_logprobs_NK: torch.Tensor
    """float16 [N, K] when every sample sent fp16, else float32."""
    teacher_counts_NK: torch.Tensor | None
    """int32 [N, K] draw counts of a sampled teacher (ScoredSample v2); None for top-k samples."""
    sample_ids: list[str]
    """Rollout ids, in batch order."""
    refs: list[Any] = field(default_factory=list)
    """Opaque per-sample references carried along (the trainer's stream entries), in batch order."""
    num_tokens: int = 0
    """Real (unpadded) tokens: the sum of T over the samples."""
    sample_teachers: list[str] = field(default_factory=list)
    """The teacher each sample names (`Rollout.teacher_name`, "default" when none), in batch order."""
    sample_rows: list[int] = field(default_factory=list)
    """Loss rows of each sample (R = T - prompt_len), in batch order: its rows follow the previous ones'."""

    @property
    def num_loss_tokens(self) -> int:
        """N: the rows the loss sums over."""
        return int(self.positions_N.shape[0])

    def teacher_rows(self) -> dict[str, list[int]]:
        """Row indices (into the N loss rows) of each teacher's samples; empty when no sample names a
        teacher (a single-teacher run: nothing to split)."""
        if all(t == DEFAULT_TEACHER for t in self.sample_teachers):
            return {}
        out: dict[str, list[int]] = {}
        row = 0
        for name, n in zip(self.sample_teachers, self.sample_rows, strict=True):
            out.setdefault(name, []).extend(range(row, row + n))
            row += n
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "input_ids_BT": self.input_ids_BT,
            "attention_mask_BT": self.attention_mask_BT,
            "loss_mask_BT": self.loss_mask_BT,
            "positions_N": self.positions_N,
            "teacher_ids_NK": self.teacher_ids_NK,
            "teacher_logprobs_NK": self.teacher_logprobs_NK,
        }
        if self.teacher_counts_NK is not None:
            out["teacher_counts_NK"] = self.teacher_counts_NK
        return out

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        moved: dict[str, Any] = {k: fn(v) for k, v in self.tensors().items()}
        return replace(self, **moved)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy on `device` (non-blocking copies need pinned host memory to overlap)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked host memory (needs CUDA); returns self when CUDA is unavailable."""
        if not torch.cuda.is_available():
            return self
        return self._map(lambda t: t.pin_memory())


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a padded micro-batch of these sequence lengths computes: B x max(T)."""
    return len(lengths) * max(lengths, default=0)


def collate(
    samples: Sequence[ScoredSample],
    *,
    pad_id: int = 0,
    refs: Sequence[Any] | None = None,
    pin: bool | None = None,
) -> Batch:
    """Pad `samples` into one Batch (host memory; pinned when `pin`, default: CUDA is available).

    Raises ValueError for an empty list, samples with different k, or top-k and sampled samples mixed.
    """
    if not samples:
        raise ValueError("collate: expected at least one sample, got none")
    ks = {s.k for s in samples}
    if len(ks) != 1:
        raise ValueError(f"collate: expected one teacher k across the micro-batch, got {sorted(ks)}")
    modes = {s.sampled for s in samples}
    if len(modes) != 1:
        raise ValueError("collate: expected only top-k or only sampled samples in a micro-batch, got both")
    sampled = modes.pop()
    pin = torch.cuda.is_available() if pin is None else pin
    n_b = len(samples)
    t_max = max(s.rollout.num_tokens for s in samples)
    n_rows = sum(s.rollout.num_tokens - s.rollout.prompt_len for s in samples)
    k = ks.pop()
    fp16 = all(s.topk_logprobs.dtype == np.float16 for s in samples)

    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Written in place through a numpy view: one copy from the wire buffer into (pinned) memory.
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    ids_BT = empty((n_b, t_max), torch.int64)
    attn_BT = empty((n_b, t_max), torch.int64)
    lmask_BT = empty((n_b, t_max), torch.bool)
    pos_N = empty((n_rows,), torch.int64)
    tids_NK = empty((n_rows, k), torch.int32)
    tlp_NK = empty((n_rows, k), torch.float16 if fp16 else torch.float32)
    counts_NK = empty((n_rows, k), torch.int32) if sampled else None
    ids_np, attn_np, lmask_np = ids_BT.numpy(), attn_BT.numpy(), lmask_BT.numpy()
    pos_np, tids_np, tlp_np = pos_N.numpy(), tids_NK.numpy(), tlp_NK.numpy()
    ids_np.fill(pad_id)
    attn_np.fill(0)
    lmask_np.fill(False)
    row = 0
    for b, s in enumerate(samples):
        t, p = s.rollout.num_tokens, s.rollout.prompt_len
        rows = t - p
        ids_np[b, :t] = s.rollout.input_ids
        attn_np[b, :t] = 1
        lmask_np[b, p - 1 : t - 1] = True
        pos_np[row : row + rows] = b * t_max + np.arange(p - 1, t - 1)
        tids_np[row : row + rows] = s.topk_ids
        tlp_np[row : row + rows] = s.topk_logprobs
        if counts_NK is not None:
            counts_NK.numpy()[row : row + rows] = s.teacher_counts
        row += rows
    return Batch(
        input_ids_BT=ids_BT,
        attention_mask_BT=attn_BT,
        loss_mask_BT=lmask_BT,
        positions_N=pos_N,
        teacher_ids_NK=tids_NK,
        teacher_logprobs_NK=tlp_NK,
        teacher_counts_NK=counts_NK,
        sample_ids=[s.rollout.id for s in samples],
        refs=list(refs) if refs is not None else [],
        num_tokens=sum(s.rollout.num_tokens for s in samples),
        sample_teachers=[s.rollout.teacher_name or DEFAULT_TEACHER for s in samples],
        sample_rows=[s.rollout.num_tokens - s.rollout.prompt_len for s in samples],
    )


class BatchPacker:
    """Greedy packer: samples in arrival order into micro-batches of at most `batch_tokens` padded tokens.

    A micro-batch is closed when the next sample would push B x max(T) over the budget, so the batches
    depend only on the order of the samples (not on how they were read). A sample longer than the
    budget on its own forms a micro-batch of one (the budget cannot be met by any other split).
    """

    def __init__(self, batch_tokens: int, *, pad_id: int = 0, pin: bool | None = None) -> None:
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens: expected >= 1, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.pin = pin
        self._samples: list[ScoredSample] = []
        self._refs: list[Any] = []

    @property
    def pending(self) -> int:
        """Samples waiting for their micro-batch to fill."""
        return len(self._samples)

    def add(self, sample: ScoredSample, ref: Any = None) -> list[Batch]:
        """Add one sample; returns the micro-batches this closed (zero or one)."""
        out: list[Batch] = []
        lengths = [s.rollout.num_tokens for s in self._samples] + [sample.rollout.num_tokens]
        if self._samples and padded_cost(lengths) > self.batch_tokens:
            flushed = self.flush()
            assert flushed is not None
            out.append(flushed)
        self._samples.append(sample)
        self._refs.append(ref)
        return out

    def flush(self) -> Batch | None:
        """Close the partial micro-batch (None when empty)."""
        if not self._samples:
            return None
        batch = collate(self._samples, pad_id=self.pad_id, refs=self._refs, pin=self.pin)
        self._samples, self._refs = [], []
        return batch


def pack(samples: Sequence[ScoredSample], batch_tokens: int, *, pad_id: int = 0) -> list[Batch]:
    """All of `samples`, in order, as micro-batches under the budget (see BatchPacker)."""
    packer = BatchPacker(batch_tokens, pad_id=pad_id)
    out: list[Batch] = []
    for s in samples:
        out += packer.add(s)
    last = packer.flush()
    return [*out, last] if last is not None else out


def gather_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The student's loss-row logits [N, V] from a model output.

    Accepts [B, T, V] logits (the whole sequence) or [N, V] logits already restricted to
    `loss_mask_BT` (a model called with ``logits_to_keep=loss_mask_BT``). Raises ValueError otherwise.
    """
    n_rows = batch.num_loss_tokens
    if logits.dim() == 2 and logits.shape[0] == n_rows:
        return logits
    if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(batch.input_ids_BT.shape):
        return logits.reshape(-1, logits.shape[-1]).index_select(0, batch.positions_N)
    raise ValueError(
        f"logits: expected [B, T, V] with B, T = {tuple(batch.input_ids_BT.shape)} or [N={n_rows}, V], "
        f"got {tuple(logits.shape)}"
    )
