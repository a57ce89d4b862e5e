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
from dataclasses import dataclass, fields
from typing import Any

import torch

from pipeline.train.batching import Batch, gather_logits
from pipeline.train.loss import topk_gkd_loss
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

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: list[float]) -> StepStats:
        return cls(*values)


def supports_mask_logits(model: Any, device: torch.device) -> bool:
    """Whether `model(..., logits_to_keep=<bool [B, T]>)` returns only the masked rows' logits [n, V].

    Computing the LM head on the loss rows only saves the [B, T, V] logits of prompts and padding.
    """
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    keep = torch.tensor([[True, False]], device=device)
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep, use_cache=False
            )
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    return out.logits.dim() == 2 and out.logits.shape[0] == 1


def forward_rows(model: Any, batch: Batch, mask_logits: bool) -> torch.Tensor:
    """The student's logits at the batch's loss rows: [N, V]."""
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids_BT,
        "attention_mask": batch.attention_mask_BT,
        "use_cache": False,
    }
    if mask_logits:
        kwargs["logits_to_keep"] = batch.loss_mask_BT
    return gather_logits(model(**kwargs).logits, batch)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


Stats = dict[str, float]


class DistillModule(torch.nn.Module):
    """The student with the distillation loss inside its forward: ``module(batch, ...) -> (loss, stats, kl)``.

    The loss runs inside the forward of the module that DDP or FSDP wraps. Under FSDP2 the LM head's
    parameters are shards outside the root module's forward and whole tensors inside it, so a loss that
    reads the LM-head weight itself (the fused loss) must run here; DDP sees one forward per micro-batch.
    `batch` None is a pass with a loss of exactly 0 that still touches every parameter: a rank without
    data this step joins the other ranks' gradient collectives with it.
    """

    def __init__(self, lm: Any, *, mask_logits: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.mask_logits = mask_logits

    def forward(
        self, batch: Batch | None, cfg: LossConfig, normalizer: float, want_kl: bool
    ) -> tuple[torch.Tensor, Stats, Stats | None]:
        if batch is None:
            ids = torch.zeros((1, 1), dtype=torch.long, device=self._device())
            return self.lm(input_ids=ids, use_cache=False).logits.float().sum() * 0.0, {}, None
        logits_NV = forward_rows(self.lm, batch, self.mask_logits)
        loss, stats = topk_gkd_loss(
            logits_NV,
            batch.teacher_ids_NK,
            batch.teacher_logprobs_NK,
            beta=cfg.beta,
            temperature=cfg.temperature,
            mode=cfg.mode,
            normalizer=normalizer,
        )
        kl: Stats | None = None
        if cfg.beta == 0.0:
            kl = {"loss_sum": stats["loss_sum"], "rows": stats["rows"]}
        elif want_kl:
            m = min(cfg.kl_rows, batch.num_loss_tokens)
            with torch.no_grad():
                _, kl = topk_gkd_loss(
                    logits_NV[:m].detach(),
                    batch.teacher_ids_NK[:m],
                    batch.teacher_logprobs_NK[:m],
                    beta=0.0,
                    temperature=cfg.temperature,
                    mode=cfg.mode,
                )
        return loss, stats, kl

    def _device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device


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
    params = [p for p in module.parameters() if p.grad is not None]
    # max_norm = inf measures the norm without clipping.
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    st.grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, limit))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return st
