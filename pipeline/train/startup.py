"""What a trainer checks before it trains, each refusal naming the fix (see `Trainer.__init__`).

- its paths: the student can be loaded, ``--output-dir`` is (or can become) a folder;
- the run's published policy: a trainer never starts below it (a mistyped ``--output-dir`` with
  ``--resume`` would otherwise restart from the base student and publish versions the producers already
  left behind, training the run's samples into a throwaway checkpoint);
- the student's vocabulary against the teacher's (`pipeline.vocab.check_student`);
- the run's teacher mode: a sampled teacher's draws train with ``--loss-mode sampled`` only, and that
  mode needs a sampled teacher (`check_teacher_mode`);
- a resume under another LR schedule (``--max-steps``, ``--lr``, ...) is said, with what it changes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigMismatch, PolicyRegression, SettingsError
from pipeline.queue.schema import Config
from pipeline.sections import SAMPLED, TOPK, RunSettings
from pipeline.train import checkpoint as ckpt

#: The settings that shape the LR schedule, recorded in every checkpoint (TrainState.extra["schedule"]).
SCHEDULE_SETTINGS = ("lr", "warmup_steps", "max_steps", "lr_schedule", "min_lr_ratio")


def check_teacher_mode(config: Mapping[str, str], run: RunSettings) -> None:
    """Raise ConfigMismatch naming the flags when the run's recorded teacher mode is not this trainer's:
    draws (with counts) train only with the RS-KD loss, and that loss needs draws. A run whose workers
    have not recorded a mode yet is checked when they do (both record it in the run config)."""
    recorded = config.get(Config.TEACHER_MODE)
    if recorded is None or recorded == (SAMPLED if run.sampled else TOPK):
        return
    k = config.get(Config.K, "?")
    if recorded == SAMPLED:
        fix = f"--loss-mode sampled --samples {k} --beta 0"
        what = f"its teacher draws {k} samples per position (gkd workers --teacher-mode sampled)"
    else:
        fix = f"--loss-mode tail or renorm (with --k {k})"
        what = f"its teacher sends its top-{k} (gkd workers --teacher-mode topk)"
    raise ConfigMismatch(
        f"run {run.name!r}: {what}; this trainer has --loss-mode {run.loss_mode}: expected {fix}, or "
        f"another --run"
    )


def check_output_dir(path: str) -> None:
    """Raise SettingsError unless `path` is a folder, or one can be created there (nothing is created)."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SettingsError(
                f"output_dir: expected a folder for checkpoints/ and metrics.jsonl, got the file {path!r}; "
                "pass another --output-dir"
            )
        if not os.access(p, os.W_OK | os.X_OK):
            raise SettingsError(
                f"output_dir: expected a writable folder, got {path!r}; pass another --output-dir"
            )
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SettingsError(
            f"output_dir: expected a folder that can be created, got {path!r} ({parent} is not a writable "
            "folder); pass another --output-dir"
        )


def start_point(output_dir: str, resume: bool) -> tuple[Path | None, int]:
    """(the checkpoint a --resume continues from, or None; the policy version the trainer starts at)."""
    latest = ckpt.latest_checkpoint(output_dir) if resume else None
    return latest, (ckpt.read_state(latest).policy_version if latest is not None else 0)


def _output_dir_of(checkpoint: str) -> str | None:
    """The --output-dir that holds a checkpoint folder ``<output_dir>/checkpoints/step-N``, if it is one."""
    p = Path(checkpoint)
    return str(p.parent.parent) if p.parent.name == ckpt.CHECKPOINTS else None


def check_policy_floor(
    run: str,
    published: tuple[int, str | None],
    *,
    resume: bool,
    output_dir: str,
    latest: Path | None,
    start_version: int,
) -> None:
    """Raise PolicyRegression when this trainer would start below the run's published policy version."""
    version, checkpoint = published
    if version <= start_version:
        return
    there = _output_dir_of(checkpoint) if checkpoint else None
    where = f" (checkpoint {checkpoint})" if checkpoint else ""
    if latest is not None:
        came = f"--resume found an older checkpoint in {output_dir!r}: step {start_version} ({latest})"
    elif resume:
        came = f"--resume found no checkpoint in {output_dir!r}"
    else:
        came = "this trainer starts from the base student (no --resume)"
    fix = f"--resume --output-dir {there}" if there else "--resume with the --output-dir that holds it"
    raise PolicyRegression(
        f"run {run!r} has published policy version {version}{where}, but {came}: it would publish lower "
        f"versions and send the producers back to an older policy; expected {fix} to continue the run, "
        f"or another --run name (or `gkd runs delete {run}`) to start over"
    )


def schedule_of(settings: Any) -> dict[str, Any]:
    """The LR-schedule settings of a TrainSettings, as recorded in a checkpoint."""
    return {name: getattr(settings, name) for name in SCHEDULE_SETTINGS}


def schedule_change(saved: Mapping[str, Any], settings: Any, step: int, lr_now: float) -> str | None:
    """A sentence on how the LR schedule differs from the one a checkpoint was written under (None: same,
    or not recorded). `lr_now`: the LR at `step` under the current settings."""
    ours = schedule_of(settings)
    changed = {k: (saved[k], ours[k]) for k in SCHEDULE_SETTINGS if k in saved and saved[k] != ours[k]}
    if not changed:
        return None
    diffs = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items())
    target = f"to step {ours['max_steps']}" if ours["max_steps"] else "without an end (--max-steps 0)"
    lr = f"{lr_now:.3g}" if math.isfinite(lr_now) else str(lr_now)
    return (
        f"resuming at step {step} with another LR schedule than the checkpoint's ({diffs}): the schedule is "
        f"rebuilt {target} from the new settings and continues at step {step} (LR now {lr}); the optimizer "
        f"state is kept"
    )
