"""The trainer's student: the Hugging Face model, how the ranks hold it, its optimizer and LR schedule.

Order matters: the model is loaded on the host, probed (which loss paths it allows) while it is still a
plain module, optionally given activation checkpointing, then placed on the ranks (`sharding.shard`);
only then is the optimizer built, because FSDP replaces the parameters by sharded ones. A resumed run
then loads model and optimizer state from the checkpoint into that layout (`checkpoint.load_checkpoint`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.train.distill import DistillModule, supports_fused_head, supports_mask_logits
from pipeline.train.distributed import Dist
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.sharding import enable_activation_checkpointing, shard

if TYPE_CHECKING:
    from pipeline.train.trainer import TrainSettings

log = logging.getLogger("gkd.train")


@dataclass
class Student:
    """What the training loop needs of the student."""

    lm: Any
    """The Hugging Face model (its parameters are DTensor shards under FSDP): state dicts, export."""
    module: torch.nn.Module
    """What a step calls: the `DistillModule` around `lm`, wrapped by DDP or sharded by FSDP."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Any
    """The student's tokenizer (None if the model folder has none); saved with exported policies."""
    vocab: int
    """Rows of the LM head: token ids at or above it cannot be trained."""

    @property
    def fsdp(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.module, FSDPModule)


def build_student(s: TrainSettings, d: Dist) -> Student:
    """Load `s.student` onto this rank as `s.sharding` says, with a fresh optimizer and schedule."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Under FSDP with several ranks only rank 0 reads the weights (into host memory); the others build
    # the model without storage and receive their shards from it: one full copy in host memory per
    # job instead of one per rank (8 x 28 GB for a 7B student on 8 GPUs).
    from_rank0 = s.sharding == "fsdp" and d.world_size > 1
    lm = _load(s.student, meta=from_rank0 and not d.is_main)
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(s.student)
    except (OSError, ValueError):
        tokenizer = None
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    # The probes run a forward: on rank 0 when the others have no weights.
    probes = [False, False]
    if lm.device.type != "meta":
        probes = [supports_mask_logits(lm, torch.device("cpu")), supports_fused_head(lm)]
    mask_logits, fusable = d.broadcast(probes) if from_rank0 else probes
    fused = s.loss_impl == "fused" and fusable
    if s.loss_impl == "fused" and not fused:
        log.warning(
            "loss_impl fused: %s's logits are not a plain linear head of its last hidden states; "
            "computing the loss from logits",
            type(lm).__name__,
        )
    full: dict[str, Any] = dict(lm.state_dict()) if from_rank0 and d.is_main else {}
    lm.train()
    if s.activation_checkpointing:
        enable_activation_checkpointing(lm)
    module = shard(
        DistillModule(lm, mask_logits=mask_logits, fused=fused),
        lm,
        d,
        sharding=s.sharding,
        bf16=s.precision == "bf16",
        cpu_offload=s.cpu_offload,
    )
    if from_rank0:
        _receive_from_rank0(lm, full, d, offload=s.cpu_offload)
    del full
    optimizer = build_optimizer(lm, s.lr, s.weight_decay)
    scheduler = build_scheduler(optimizer, s.warmup_steps, s.max_steps, s.lr_schedule, s.min_lr_ratio)
    return Student(lm, module, optimizer, scheduler, tokenizer, vocab)


def _load(path: str, meta: bool) -> Any:
    """The model in fp32 on the host, or (`meta`) its structure without storage."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not meta:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.device("meta"):
        lm: Any = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    try:  # exported with the policy (only rank 0 exports, but every rank keeps one model config)
        lm.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return lm


def _receive_from_rank0(lm: Any, full: dict[str, Any], d: Dist, *, offload: bool) -> None:
    """Collective, after sharding: every rank's shards (and buffers) from rank 0's full weights `full`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.is_main:  # storage for the shards and buffers; the values come next
        lm.to_empty(device=torch.device("cpu") if offload else d.device)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(lm, full, options=opts)
    # Buffers outside the state dict (rotary tables) were built from the config on rank 0 only.
    for buf in lm.buffers():
        dist.broadcast(buf, src=0)
