"""The student's forward with the distillation loss inside it, and what a model allows it to compute.

`DistillModule` is what the trainer wraps in DDP or shards with FSDP: calling it on a micro-batch runs
the model and the top-k GKD loss and returns (loss, stats, KL stats). The loss has to be inside: under
FSDP2 the LM head's weight is a shard outside the root module's forward and the whole tensor inside it.

Shape legend: B samples, T padded length, N loss rows, V vocabulary, H hidden size, K teacher top-k.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.train.batching import Batch, gather_logits
from pipeline.train.loss import topk_gkd_loss
from pipeline.train.step import LossConfig


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
