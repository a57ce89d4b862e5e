"""What a trainer writes besides checkpoints: per-step metrics (metrics.jsonl, the log, TensorBoard) and
the optional per-step sample log (``--sample-log``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.errors import SettingsError
from pipeline.train.step import StepStats

log = logging.getLogger("gkd.train")


class SampleLog:
    """``--sample-log``: one JSON line per optimizer step and rank, {"step", "rank", "job", "ids"}.

    `job` is the same for every rank of one `gkd train` job (torchrun launch) and new for each: a job
    resumed from the checkpoint of step S logs steps S+1, ..., and lines of earlier jobs with steps above
    S belong to no checkpoint lineage any more. Lines are appended with one write each (O_APPEND), so
    ranks may share the file and a kill -9 never leaves a torn line behind a complete one.
    """

    def __init__(self, path: str, rank: int, job: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.job = rank, job
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, step: int, ids: list[str]) -> None:
        line = {"step": step, "rank": self.rank, "job": self.job, "ids": ids}
        os.write(self.fd, (json.dumps(line) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def teacher_metrics(ranks: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Per-teacher means of one step from every rank's `StepStats.per_teacher`: ``kl/NAME`` (forward KL
    on the KL rows of NAME's samples) and ``teacher_mass/NAME`` (NAME's mean top-k mass on them)."""
    sums: dict[str, dict[str, float]] = {}
    for per in ranks:
        for name, figures in per.items():
            into = sums.setdefault(name, {})
            for what, value in figures.items():
                into[what] = into.get(what, 0.0) + value
    out: dict[str, float] = {}
    for name in sorted(sums):
        rows = sums[name].get("rows", 0.0)
        if rows > 0:
            out[f"kl/{name}"] = sums[name].get("kl_sum", 0.0) / rows
            out[f"teacher_mass/{name}"] = sums[name].get("mass_sum", 0.0) / rows
    return out


class MetricsSink:
    """Rank 0's per-step metrics: metrics.jsonl in the output folder, the log, TensorBoard."""

    def __init__(self, output_dir: Path, tb_writer: Any = None) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.fh = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 -- open for the whole run
        self.tb = tb_writer

    @staticmethod
    def tensorboard_writer(log_dir: str | None, create: bool = True) -> Any:
        """A SummaryWriter for `log_dir` (None without one). Raises SettingsError without `tensorboard`."""
        if not log_dir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SettingsError(
                f"tensorboard_dir: writing TensorBoard logs to {log_dir!r} needs the `tensorboard` package; "
                "install it (pip install tensorboard) or drop --tensorboard-dir"
            ) from None
        return SummaryWriter(log_dir) if create else None

    @staticmethod
    def step_metrics(
        step: int,
        g: StepStats,
        g_tokens: float,
        step_s: float,
        g_wait_s: float,
        g_step_s: float,
        world: int,
        lr: float,
    ) -> dict[str, float]:
        """Global means of one step from the sums over ranks."""
        rows = max(g.rows, 1.0)
        return {
            "step": step,
            "loss": g.loss_sum / rows,
            "kl": g.kl_sum / g.kl_rows if g.kl_rows else float("nan"),
            "teacher_mass": g.teacher_mass_sum / rows,
            "student_mass": g.student_mass_sum / rows,
            "top1_in_topk": g.top1_sum / rows,
            "grad_norm": g.grad_norm / world,
            "lr": lr,
            "tokens": g_tokens,
            "loss_tokens": g.rows,
            "tokens_per_s": g_tokens / step_s if step_s > 0 else 0.0,
            "step_s": step_s,
            "data_wait_s": g_wait_s / world,
            "data_wait_frac": g_wait_s / g_step_s if g_step_s > 0 else 0.0,
        }

    def write(self, m: dict[str, float]) -> None:
        self.fh.write(json.dumps(m) + "\n")
        self.fh.flush()
        log.info(
            "step %d loss %.4f kl %.4f teacher_mass %.3f tok/s %.0f data_wait %.1f%% lr %.2e",
            m["step"],
            m["loss"],
            m["kl"],
            m["teacher_mass"],
            m["tokens_per_s"],
            100 * m["data_wait_frac"],
            m["lr"],
        )
        teachers = [name[3:] for name in m if name.startswith("kl/")]
        if teachers:
            log.info(
                "step %d by teacher: %s",
                m["step"],
                ", ".join(f"{t} kl {m['kl/' + t]:.4f} mass {m['teacher_mass/' + t]:.3f}" for t in teachers),
            )
        if self.tb is not None:
            for name, value in m.items():
                if name != "step":
                    self.tb.add_scalar(f"train/{name}", value, int(m["step"]))

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
