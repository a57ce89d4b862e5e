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

from pipeline.train.distill import DistillModule, supports_mask_logits
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Loaded on the host: FSDP moves only this rank's shards to the device.
    lm: Any = AutoModelForCausalLM.from_pretrained(s.student, dtype=torch.float32)
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(s.student)
    except (OSError, ValueError):
        tokenizer = None
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    mask_logits = supports_mask_logits(lm, torch.device("cpu"))
    lm.train()
    if s.activation_checkpointing:
        enable_activation_checkpointing(lm)
    module = shard(
        DistillModule(lm, mask_logits=mask_logits),
        lm,
        d,
        sharding=s.sharding,
        bf16=s.precision == "bf16",
        cpu_offload=s.cpu_offload,
    )
    optimizer = build_optimizer(lm, s.lr, s.weight_decay)
    scheduler = build_scheduler(optimizer, s.warmup_steps, s.max_steps, s.lr_schedule, s.min_lr_ratio)
    return Student(lm, module, optimizer, scheduler, tokenizer, vocab)
