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
from pipeline.train.loss import fused_topk_gkd_loss, topk_gkd_loss
from pipeline.train.step import LossConfig, teacher_key


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


def supports_fused_head(model: Any) -> bool:
    """Whether the model's logits are exactly ``lm_head(base_model(...).last_hidden_state)``: a plain
    linear head and nothing after it (no logit scaling or soft-capping). Then the fused loss may take the
    last hidden states and the head's weight instead of logits. Checked on a short input (model on the
    host), with the head's output amplified so that a soft cap, which is the identity on small logits,
    shows.
    """
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return False
    vocab, gain = int(head.weight.shape[0]), 1e3
    ids = (torch.arange(8, dtype=torch.long) * 7919 % vocab).view(1, -1)
    hook = head.register_forward_hook(lambda _module, _inputs, out: out * gain)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state
            fused = torch.nn.functional.linear(hidden, head.weight, head.bias).float() * gain
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return False
    finally:
        hook.remove()
    return fused.shape == logits.shape and torch.allclose(fused, logits, rtol=1e-4, atol=1e-3)


def hidden_rows(model: Any, batch: Batch) -> torch.Tensor:
    """The student's last hidden states (after the final norm) at the batch's loss rows: [N, H]."""
    out = model.base_model(
        input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False
    )
    hidden_BTH = out.last_hidden_state
    return hidden_BTH.reshape(-1, hidden_BTH.shape[-1]).index_select(0, batch.positions_N)


Stats = dict[str, float]


class DistillModule(torch.nn.Module):
    """The student with the distillation loss inside its forward: ``module(batch, ...) -> (loss, stats, kl)``.

    The loss runs inside the forward of the module that DDP or FSDP wraps. Under FSDP2 the LM head's
    parameters are shards outside the root module's forward and whole tensors inside it, so the fused
    loss, which reads the LM-head weight itself, must run here; DDP sees one forward per micro-batch.
    `fused`: the loss from the last hidden states and the LM-head weight, never building [N, V] logits
    (`supports_fused_head` says whether the model allows it); else from the logits of the loss rows.
    `batch` None is a pass with a loss of exactly 0 that still touches every parameter: a rank without
    data this step joins the other ranks' gradient collectives with it.
    """

    def __init__(self, lm: Any, *, mask_logits: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.mask_logits = mask_logits
        self.fused = fused

    def forward(
        self, batch: Batch | None, cfg: LossConfig, normalizer: float, want_kl: bool
    ) -> tuple[torch.Tensor, Stats, Stats | None]:
        if batch is None:
            ids = torch.zeros((1, 1), dtype=torch.long, device=self._device())
            return self.lm(input_ids=ids, use_cache=False).logits.float().sum() * 0.0, {}, None
        # [N, H] hidden states for the fused loss, [N, V] logits for the other.
        rows = hidden_rows(self.lm, batch) if self.fused else forward_rows(self.lm, batch, self.mask_logits)
        loss, stats = self._loss(rows, batch, cfg.beta, cfg, normalizer=normalizer)
        kl: Stats | None = None
        if cfg.beta == 0.0:
            kl = {"loss_sum": stats["loss_sum"], "rows": stats["rows"]}
        elif want_kl:
            m = min(cfg.kl_rows, batch.num_loss_tokens)
            with torch.no_grad():
                _, kl = self._loss(rows[:m].detach(), batch, 0.0, cfg)
        if want_kl and kl is not None and (groups := batch.teacher_rows()):
            with torch.no_grad():
                kl.update(self._per_teacher(rows.detach(), batch, groups, cfg))
        return loss, stats, kl

    def _per_teacher(
        self, rows: torch.Tensor, batch: Batch, groups: dict[str, list[int]], cfg: LossConfig
    ) -> Stats:
        """Forward KL and teacher mass on up to `kl_rows` rows of each teacher's samples (no grad), under
        the keys of `step.teacher_key`."""
        out: Stats = {}
        for name, idx in groups.items():
            pick = torch.tensor(idx[: cfg.kl_rows], dtype=torch.long, device=rows.device)
            ids = batch.teacher_ids_NK.index_select(0, pick)
            logp = batch.teacher_logprobs_NK.index_select(0, pick)
            counts = batch.teacher_counts_NK
            counts = None if counts is None else counts.index_select(0, pick)
            _, st = self._loss(rows.index_select(0, pick), batch, 0.0, cfg, teacher=(ids, logp, counts))
            out[teacher_key(name, "kl_sum")] = st["loss_sum"]
            out[teacher_key(name, "mass_sum")] = st["teacher_mass"] * st["rows"]
            out[teacher_key(name, "rows")] = st["rows"]
        return out

    def _loss(
        self,
        rows: torch.Tensor,
        batch: Batch,
        beta: float,
        cfg: LossConfig,
        normalizer: float | None = None,
        teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, Stats]:
        """The loss over the first n = len(rows) loss rows of `batch` (or against `teacher`'s rows: ids
        [n, K], logprobs [n, K] and, of a sampled teacher, draw counts [n, K] given)."""
        n = rows.shape[0]
        common: dict[str, Any] = {
            "beta": beta,
            "temperature": cfg.temperature,
            "mode": cfg.mode,
            "normalizer": normalizer,
        }
        if teacher is None:
            counts = batch.teacher_counts_NK
            teacher = (
                batch.teacher_ids_NK[:n],
                batch.teacher_logprobs_NK[:n],
                None if counts is None else counts[:n],
            )
        ids, logp, counts = teacher
        if counts is not None:  # a sampled teacher's draws (mode "sampled")
            common["teacher_counts"] = counts
        if self.fused:
            head = self.lm.get_output_embeddings()
            return fused_topk_gkd_loss(rows, head.weight, ids, logp, bias=head.bias, **common)
        return topk_gkd_loss(rows, ids, logp, **common)

    def _device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device
