"""`TrainSettings`: the settings of `gkd train` (flags, GKD_* variables, TOML table [train]).

Importing this module loads no torch, so a launcher (the demo) can build a trainer's flags cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import SettingsError
from pipeline.sections import REDIS_LAYOUT, SAMPLED, CommonSettings, FlowSettings, RunSettings
from pipeline.settings import section, setting

#: LR schedules after warmup (pipeline.train.optim implements them).
SCHEDULES = ("cosine", "linear", "constant")
#: How ranks hold the student (pipeline.train.sharding implements them).
SHARDINGS = ("fsdp", "ddp")


@dataclass
class TrainSettings(CommonSettings):
    """Settings of `gkd train`."""

    run: RunSettings = section(RunSettings, "name", "redis_url", "k", "loss_mode", "samples", *REDIS_LAYOUT)
    flow: FlowSettings = section(
        FlowSettings,
        "lease_ms",
        "max_deliveries",
        "dead_max_entries",
        "dead_max_payload_bytes",
        lease_ms=120_000,
    )
    student: str = setting("", "Student model: a local folder or a Hugging Face id (required).")
    output_dir: str = setting("gkd-out", "Folder for checkpoints/ and metrics.jsonl.")
    lr: float = setting(1e-5, "Peak learning rate of AdamW.")
    weight_decay: float = setting(0.0, "AdamW weight decay (not applied to biases and norms).")
    warmup_steps: int = setting(10, "Linear LR warmup, in optimizer steps.")
    lr_schedule: str = setting(
        "cosine", "LR decay after warmup, to --min-lr-ratio at --max-steps.", choices=SCHEDULES
    )
    min_lr_ratio: float = setting(0.1, "Final LR as a fraction of --lr.")
    max_steps: int = setting(0, "Stop after this many optimizer steps (0: until SIGTERM or --idle-exit-s).")
    batch_tokens: int = setting(
        8192, "Token budget of a micro-batch: samples x longest sample, padding included."
    )
    grad_accum: int = setting(1, "Micro-batches per optimizer step (per rank).")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0: no clipping).")
    beta: float = setting(
        0.5, "Generalized JSD beta: 0 forward KL, 1 reverse KL (--loss-mode sampled: 0 only)."
    )
    temperature: float = setting(1.0, "Distillation temperature (student and teacher).")
    checkpoint_every: int = setting(
        500, "Checkpoint (then trim the trained journal and publish the policy) every N steps."
    )
    keep_checkpoints: int = setting(3, "Checkpoints kept on disk (the newest ones).")
    resume: bool = setting(False, "Continue from the latest checkpoint in --output-dir (if any).")
    max_staleness: int | None = setting(
        None,
        "Skip (and count) student rollouts generated more than this many optimizer steps before the "
        "trainer's step (none: keep all; rollouts a resume put back are kept).",
    )
    prefetch: bool = setting(True, "Read, decode and copy the next micro-batches in the background.")
    prefetch_depth: int = setting(0, "Micro-batches prefetched ahead (0: 2 x --grad-accum, at least 2).")
    seed: int = setting(0, "Random seed (rank r uses seed + r).")
    device: str = setting("auto", "Training device.", choices=("cpu", "cuda", "auto"))
    precision: str = setting(
        "fp32",
        "fp32, or bf16 compute with fp32 weights (FSDP: bf16 parameters and fp32 gradient reduction; "
        "DDP: autocast).",
        choices=("fp32", "bf16"),
    )
    tensorboard_dir: str | None = setting(None, "Write TensorBoard scalars here (needs `tensorboard`).")
    log_every: int = setting(10, "Log metrics every N steps.")
    name: str = setting("trainer", "Process name; rank r reads as consumer <name>-<r>.")
    idle_exit_s: float = setting(0.0, "Exit after this long without data, checkpointing first (0: never).")
    sample_log: str | None = setting(
        None, "Append the sample ids of every optimizer step to this JSONL file."
    )
    sharding: str = setting(
        "fsdp",
        "How ranks hold the student: fsdp (FSDP2: parameters, gradients and optimizer state sharded "
        "over ranks) or ddp (every rank holds all of them).",
        choices=SHARDINGS,
    )
    activation_checkpointing: bool = setting(
        False, "Recompute each decoder layer's activations in the backward: less memory, ~1/3 more compute."
    )
    cpu_offload: bool = setting(
        False, "FSDP: keep parameters, gradients and optimizer state in host memory (optimizer steps on CPU)."
    )
    loss_impl: str = setting(
        "fused",
        "fused: the loss from the last hidden states and the LM-head weight in chunks, never building the "
        "[N, V] logits (models whose logits are more than a linear head use logits); logits: from logits.",
        choices=("fused", "logits"),
    )
    num_threads: int = setting(0, "torch CPU threads (0: torch's default).")
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms (reproducible CPU runs).")

    def __post_init__(self) -> None:
        if self.run.loss_mode == SAMPLED and self.beta != 0.0:
            raise SettingsError(
                f"beta: --loss-mode sampled (RS-KD) estimates forward KL only, expected --beta 0, got "
                f"{self.beta}; the JSD mixture and reverse KL need the teacher's probability of tokens it "
                f"did not draw (use --loss-mode tail or renorm with a top-k teacher for beta > 0)"
            )
