"""One optimizer step of top-k GKD over the micro-batches of one rank, under DDP or FSDP.

Normalization: the loss of a step is the mean over all loss tokens of the global batch (all ranks, all
accumulation steps). The trainer all-reduces the token count of the step's micro-batches *before* the
backward passes (it already holds them all) and every micro-batch's loss is its divergence sum divided
by that global count. DDP and FSDP average gradients over ranks, so each rank's loss is multiplied by the
world size (normalizer = global count / world size): the summed gradient is then exactly the gradient of
the global mean, however unevenly the tokens fall across ranks and micro-batches.

Shape legend: B samples, T padded length, N loss rows, V vocabulary, K teacher top-k.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pipeline.train.batching import Batch
from pipeline.train.sharding import grad_norm_value


@dataclass(frozen=True)
class LossConfig:
    beta: float = 0.5
    temperature: float = 1.0
    mode: str = "tail"
    kl_rows: int = 1024
    """Rows per micro-batch on which forward KL is measured (no grad) when beta != 0."""


@dataclass
class StepStats:
    """Sums over this rank's micro-batches of one step (divide by `rows`, or `kl_rows`, for means)."""

    loss_sum: float = 0.0
    kl_sum: float = 0.0
    kl_rows: float = 0.0
    teacher_mass_sum: float = 0.0
    student_mass_sum: float = 0.0
    top1_sum: float = 0.0
    rows: float = 0.0
    grad_norm: float = 0.0
    per_teacher: dict[str, dict[str, float]] = field(default_factory=dict)
    """Teacher name -> {"kl_sum", "mass_sum", "rows"} on the KL rows of its samples (log steps of runs
    whose samples name teachers); summed over ranks by the trainer, not by `as_list`."""

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "per_teacher"]

    @classmethod
    def from_list(cls, values: list[float]) -> StepStats:
        st = cls()
        for f, value in zip([f for f in fields(cls) if f.name != "per_teacher"], values, strict=True):
            setattr(st, f.name, value)
        return st


#: Separates a teacher name from a figure in the per-teacher keys of a micro-batch's KL stats.
_TEACHER_SEP = "@teacher:"


def teacher_key(name: str, what: str) -> str:
    """The key of one teacher's figure (`what`: kl_sum, mass_sum, rows) in a micro-batch's KL stats."""
    return f"{what}{_TEACHER_SEP}{name}"


def _accumulate_teachers(st: StepStats, kl: dict[str, float]) -> None:
    for key, value in kl.items():
        what, sep, name = key.partition(_TEACHER_SEP)
        if sep:
            sums = st.per_teacher.setdefault(name, {})
            sums[what] = sums.get(what, 0.0) + value


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _accumulate(st: StepStats, stats: dict[str, float]) -> None:
    rows = stats["rows"]
    st.rows += rows
    st.loss_sum += stats["loss_sum"]
    st.teacher_mass_sum += stats["teacher_mass"] * rows
    st.student_mass_sum += stats["student_mass"] * rows
    st.top1_sum += stats["top1_in_topk"] * rows


def train_step(
    module: Any,
    micro: list[Batch],
    *,
    global_rows: float,
    world_size: int,
    cfg: LossConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    max_grad_norm: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    want_kl: bool = True,
    passes: int = 1,
) -> StepStats:
    """Forward/backward every micro-batch, clip, step the optimizer and the LR schedule.

    `module` is a `DistillModule`, possibly wrapped by DDP or sharded by FSDP. Every rank must run the
    same number of forward/backward passes, `passes` (the most micro-batches any rank has this step):
    FSDP gathers parameters in every forward. A rank with fewer micro-batches (none, when its stream ran
    dry) makes up the difference with zero-loss passes. `global_rows` is the sum of loss rows over all
    ranks' micro-batches (> 0). Returns this rank's sums.
    """
    st = StepStats()
    normalizer = global_rows / world_size
    # DDP all-reduces on the last pass only; FSDP reduce-scatters after every pass, which keeps only
    # sharded gradients between them (the point of sharding).
    ddp = hasattr(module, "no_sync")
    todo: list[Batch | None] = [*micro, *[None] * max(passes - len(micro), 0 if micro else 1)]
    for i, batch in enumerate(todo):
        last = i == len(todo) - 1
        with contextlib.nullcontext() if (last or not ddp) else module.no_sync():
            with _autocast(device, autocast_dtype):
                loss, stats, kl = module(batch, cfg, normalizer, want_kl)
            loss.backward()
        del loss
        if batch is None:
            continue
        _accumulate(st, stats)
        if kl is not None:
            st.kl_sum += kl["loss_sum"]
            st.kl_rows += kl["rows"]
            _accumulate_teachers(st, kl)
    params = [p for p in module.parameters() if p.grad is not None]
    # max_norm = inf measures the norm without clipping.
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    st.grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, limit))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return st
