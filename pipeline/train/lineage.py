"""The checkpoint lineage of a trainer rank (mixed into `pipeline.train.trainer.Trainer`): loading the
student and resuming from the latest checkpoint, settling and requeuing at start, writing checkpoints
(with the listing of unjournaled samples and the journal trim) and publishing their exported policies.

See `pipeline.train.trainer` for the delivery contract these steps keep (ARCHITECTURE.md, 4.4).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import Dist
from pipeline.train.export import PolicyExporter, export_complete
from pipeline.train.ready import ReadyLeases
from pipeline.train.settings import TrainSettings
from pipeline.train.startup import schedule_change, schedule_of
from pipeline.train.student import Student, build_student

log = logging.getLogger("gkd.train")

#: How long a checkpoint waits for the journal writes of its steps; unconfirmed ones it lists instead.
JOURNAL_WAIT_S = 10.0


class Lineage:
    """The checkpoint side of a `Trainer` (its attributes are the trainer's)."""

    s: TrainSettings
    dist: Dist
    ready: ReadyLeases
    consumer_name: str
    summary: Any
    student: Student
    exports: PolicyExporter
    tokenizer: Any
    vocab: int
    step: int
    version: int
    last_ckpt_step: int
    resumed_from: str | None
    _listed: dict[str, list[tuple[str, int]]]

    def _load_model(self) -> None:
        """The student, its optimizer and LR schedule; their state from the latest checkpoint on --resume."""
        s = self.s
        self.student = build_student(s, self.dist)
        self.tokenizer, self.vocab = self.student.tokenizer, self.student.vocab
        self.exports = PolicyExporter(self.student.lm, self.tokenizer, self.dist)
        latest = ckpt.latest_checkpoint(s.output_dir) if s.resume else None
        self.resumed_from = str(latest) if latest is not None else None
        if latest is not None:
            self._resume(latest)
        elif s.resume:
            log.info("--resume: no checkpoint in %s yet, starting from %s", s.output_dir, s.student)

    def _resume(self, latest: Path) -> None:
        """Model, optimizer, schedule, step and RNG from `latest`; acknowledge the samples it includes."""
        d, st = self.dist, self.student
        state = ckpt.load_checkpoint(
            latest, model=st.lm, optimizer=st.optimizer, scheduler=st.scheduler, rank=d.rank
        )
        self.step = self.last_ckpt_step = state.step
        self.version = state.policy_version
        self._apply_schedule(state.extra.get("schedule", {}))
        self._listed = state.entries  # settled by `_recover`
        log.info("resumed from %s (step %d)", latest, self.step)
        if export_complete(latest):
            if d.is_main:
                self.ready.publish(self.version, str(latest))
        else:  # the crash came before its export was written
            self.exports.start(st.lm, latest, self.version)

    def _apply_schedule(self, saved: dict[str, Any]) -> None:
        """Resume under this run's LR settings, saying how they differ from the checkpoint's."""
        s = self.s
        scheduler, optimizer = self.student.scheduler, self.student.optimizer
        # LambdaLR restores the checkpoint's base LR and keeps our (new) lambda: set both from ours, so a
        # changed --lr applies too; unchanged settings give exactly the LR the checkpoint had.
        scheduler.base_lrs = [s.lr for _ in scheduler.base_lrs]
        factor = scheduler.lr_lambdas[0](self.step)
        for group in optimizer.param_groups:
            group["initial_lr"] = s.lr
            group["lr"] = s.lr * factor
        note = schedule_change(saved, s, self.step, s.lr * factor)
        if note:
            log.warning("%s", note)

    def _recover(self) -> None:
        """Rank 0, before any rank reads: settle what the checkpoint lists as included but unjournaled,
        put journal entries past it back into rollouts (every rank of every earlier job), drop the rest."""
        if self.dist.is_main:
            self.ready.recover(self._listed, self.step)
        self.dist.barrier()

    def _checkpoint(self) -> None:
        """Every rank journals what it trained and writes its shard (the checkpoint lists the samples whose
        journal write is unconfirmed); rank 0 then trims the journal up to it; the policy export starts,
        and is published once written (`_publish_exports`)."""
        d, st = self.dist, self.student
        listing = self.ready.unjournaled(JOURNAL_WAIT_S)
        mine = {"consumer": self.consumer_name, "entries": listing, "rng": ckpt.capture_rng()}
        everyone = d.all_gather(mine)
        # Every rank has journaled the steps this checkpoint includes, and none has begun the next.
        mark = self.ready.journal_mark() if d.is_main else []
        state = ckpt.TrainState(
            step=self.step,
            policy_version=self.step,
            world_size=d.world_size,
            entries={m["consumer"]: m["entries"] for m in everyone if m["entries"]},
            created_ms=int(time.time() * 1000),
            extra={"schedule": schedule_of(self.s)},  # a resume says how its schedule differs
        )
        self.exports.wait()  # the previous export writes into a checkpoint folder that pruning may remove
        path = ckpt.save_checkpoint(
            self.s.output_dir,
            model=st.lm,
            optimizer=st.optimizer,
            scheduler=st.scheduler,
            state=state,
            rng_states=[m["rng"] for m in everyone],
            keep=self.s.keep_checkpoints,
            dist=d,
        )
        if d.is_main:
            self.ready.trim_journal(mark)
        self.last_ckpt_step = self.step
        self.summary.checkpoint = str(path)
        self.version = self.step
        self.exports.start(st.lm, path, self.version)
        self._publish_exports()

    def _publish_exports(self) -> None:
        """Publish the policies whose export is written (rank 0)."""
        for version, path in self.exports.finished():
            self.ready.publish(version, path)
            log.info("checkpoint %s written; policy version %d published", path, version)
