"""`gkd demo`: the whole system on one machine, on embedded defaults, each part as its own process.

Redis: a private redis-server that the demo starts and stops, unless `--redis URL` names one (never a
shared server by chance: GKD_REDIS_URL is not read). On a given Redis the run must be new (or `--keep`):
the demo never clears keys it did not write. Models: a tiny teacher and a smaller student built offline
from a fixed seed and cached (`pipeline.local.tiny_models`), or `--teacher` / `--student`. Then, as a
user would start them: the reference teacher server, a worker pool, a rollout producer (on-policy with
probability `--lmbda`) and a trainer, each from its own settings object turned into flags. Progress is
printed live; `run_demo` returns the summary (`Tally.summary`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import SettingsError
from pipeline.local.procs import Procs, wait_http
from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.local.tiny_models import tiny_models, write_prompts
from pipeline.produce.producer import RolloutSettings
from pipeline.queue.connection import connect_sync
from pipeline.queue.schema import RunKeys, Stat
from pipeline.score.options import WorkerOptions
from pipeline.score.pool import WorkerSettings
from pipeline.sections import FlowSettings, RunSettings, check_redis_url
from pipeline.settings import mask_url, section, setting, to_argv
from pipeline.train.settings import TrainSettings


@dataclasses.dataclass
class DemoSettings:
    """Settings of `gkd demo` (every part gets its own flags from these)."""

    run: RunSettings = section(RunSettings, "name", "k", name="demo", k=16)
    redis_url: str | None = setting(
        None,
        "Redis URL (default: a private redis-server, stopped at the end; GKD_REDIS_URL is not read). The run "
        "must be new there, or --keep.",
        secret=True,
        name="redis",
    )
    teacher: str | None = setting(None, "Teacher model path or id (default: the tiny offline teacher).")
    student: str | None = setting(None, "Student model path or id (default: the tiny offline student).")
    steps: int = setting(60, "Optimizer steps the trainer runs.")
    lmbda: float = setting(0.5, "Probability that the student generates a rollout's completion.")
    batch_tokens: int = setting(1024, "Trainer token budget per batch.")
    lr: float = setting(3e-3, "Student learning rate.")
    workers: int = setting(1, "Worker processes.")
    workdir: str = setting(".gkd/demo", "Folder for prompts, checkpoints and logs.")
    json_output: bool = setting(False, "Print only the final JSON summary line.", flags=("--json",))
    keep: bool = setting(False, "With --redis: continue the run's existing keys (and checkpoints).")
    timeout_s: float = setting(600.0, "Give up (and stop everything) after this many seconds.")

    def __post_init__(self) -> None:
        if self.redis_url is not None:
            check_redis_url(self.redis_url, "redis")


@dataclasses.dataclass
class Tally:
    """Where every produced rollout is now, and the trainer's progress."""

    produced: int = 0
    scored: int = 0
    trained: int = 0
    dead: int = 0
    rollouts_queued: int = 0
    ready_queued: int = 0
    steps: int = 0
    kl_first: float | None = None
    kl_last: float | None = None
    loss_last: float | None = None
    data_wait_after_warmup: float | None = None
    """The trainer's data-wait fraction (wait / step time) over the steps after the first tenth (>= 5)."""
    stalled_intervals: int = 0
    """2 s progress intervals (after the first step) in which neither a rollout was scored nor a step
    taken while rollouts waited: a pipeline that pauses shows here."""

    @property
    def lost(self) -> int:
        """Rollouts that are nowhere: neither trained, dead nor still queued. Must be 0."""
        return self.produced - (self.trained + self.dead + self.rollouts_queued + self.ready_queued)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "kl_first": self.kl_first,
            "kl_last": self.kl_last,
            "rollouts": self.produced,
            "scored": self.scored,
            "trained": self.trained,
            "dead": self.dead,
            "queued_rollouts": self.rollouts_queued,
            "queued_ready": self.ready_queued,
            "lost": self.lost,
            "data_wait_after_warmup": self.data_wait_after_warmup,
            "stalled_intervals": self.stalled_intervals,
        }

    def progress(self, elapsed_s: float, scored_per_s: float) -> str:
        kl = f"{self.kl_last:.3f}" if self.kl_last is not None else "-"
        loss = f"{self.loss_last:.3f}" if self.loss_last is not None else "-"
        return (
            f"[{elapsed_s:5.1f}s] rollouts q={self.rollouts_queued:<4} ready q={self.ready_queued:<4} "
            f"produced={self.produced:<5} scored={self.scored:<5} ({scored_per_s:5.1f}/s) "
            f"step={self.steps:<4} loss={loss} KL={kl} dead={self.dead}"
        )


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def read_tally(client: Any, keys: RunKeys, metrics: Path, window: int = 5) -> Tally:
    """Counters from Redis and the trainer's per-step metrics (KL: mean of the first/last `window` steps)."""
    stats = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
    steps: list[dict[str, Any]] = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
    kls = [float(x["kl"]) for x in steps if x.get("kl") is not None and math.isfinite(float(x["kl"]))]
    warm = steps[max(5, len(steps) // 10) :]
    step_s = sum(float(x["step_s"]) for x in warm)
    return Tally(
        produced=stats.get(Stat.ROLLOUTS_PRODUCED, 0),
        scored=stats.get(Stat.SCORED, 0),
        trained=stats.get(Stat.TRAINED_SAMPLES, 0),
        dead=int(client.xlen(keys.dead.key)),
        rollouts_queued=int(client.xlen(keys.rollouts.key)),
        ready_queued=int(client.xlen(keys.ready.key)),
        steps=len(steps),
        kl_first=_mean(kls[:window]),
        kl_last=_mean(kls[-window:]),
        loss_last=float(steps[-1]["loss"]) if steps else None,
        data_wait_after_warmup=sum(float(x["data_wait_s"]) for x in warm) / step_s if step_s > 0 else None,
    )


def _redis(s: DemoSettings) -> tuple[str, RedisServer | None]:
    """The Redis to use: a private server, or the given URL (where the run must be new, or --keep)."""
    if s.redis_url is None:
        server = RedisServer().start()
        return server.url, server
    client = connect_sync(s.redis_url, socket_timeout_s=2.0)
    try:
        client.ping()
        existing = sum(1 for _ in client.scan_iter(match=s.run.keys.pattern, count=1000))
    finally:
        client.close()
    if existing and not s.keep:
        run = s.run.name
        raise SettingsError(
            f"run {run!r} already has {existing} keys in Redis at {mask_url(s.redis_url)}: expected a new "
            f"run (the demo does not clear keys it did not write); pass --run NEW_NAME, --keep to continue "
            f"it, or clear it first (gkd runs delete {run} --redis URL)"
        )
    return s.redis_url, None


def commands(s: DemoSettings, teacher: str, student: str, port: int, workdir: Path) -> dict[str, list[str]]:
    """The `gkd` command line of each part (the run and Redis come through GKD_RUN and GKD_REDIS_URL)."""
    run = RunSettings(k=s.run.k)
    train = TrainSettings(
        run=run, student=student, output_dir=str(workdir / "ckpt"), max_steps=s.steps,
        batch_tokens=s.batch_tokens, lr=s.lr, checkpoint_every=max(5, s.steps // 4), log_every=1,
        warmup_steps=2, seed=0,
    )  # fmt: skip
    workers = WorkerSettings(
        run=run, teacher=[f"http://127.0.0.1:{port}"], procs=s.workers, loop=WorkerOptions(concurrency=16),
        flow=FlowSettings(high_water=256, low_water=128, lease_ms=20_000),
    )  # fmt: skip
    rollouts = RolloutSettings(
        prompts=str(workdir / "prompts.jsonl"), student=student, lmbda=s.lmbda, max_new_tokens=24,
        flow=FlowSettings(high_water=64, low_water=32), seed=0, epochs=0, policy_poll_s=1.0,
    )  # fmt: skip
    return {
        "teacher": [
            "teacher",
            "--model",
            teacher,
            "--port",
            str(port),
            "--max-logprobs",
            str(max(64, s.run.k)),
        ],
        "trainer": ["train", *to_argv(train)],
        "workers": ["workers", *to_argv(workers)],
        "rollouts": ["rollouts", *to_argv(rollouts)],
    }


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """Start every part, print progress until the trainer is done, stop the rest; the summary."""
    workdir = Path(s.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    say: Callable[..., None] = (lambda *_: None) if s.json_output else (lambda *a: print(*a, flush=True))
    url, private = _redis(s)
    say(f"redis: {mask_url(url)}" + (" (a private redis-server, stopped at the end)" if private else ""))
    keys = s.run.keys
    client = connect_sync(url)
    if not s.keep:  # a new run: checkpoints of an earlier demo would be resumed by nothing
        shutil.rmtree(workdir / "ckpt", ignore_errors=True)
    models = tiny_models() if not (s.teacher and s.student) else None
    teacher = s.teacher or str(models.teacher)  # type: ignore[union-attr]
    student = s.student or str(models.student)  # type: ignore[union-attr]
    write_prompts(workdir / "prompts.jsonl")
    env = env_without_proxy()
    env.update({"GKD_RUN": s.run.name, "GKD_REDIS_URL": url, "HF_HUB_OFFLINE": "1"})
    env.update({"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    procs = Procs(workdir / "logs", env)
    port = free_port()
    deadline = time.monotonic() + s.timeout_s
    cmds = commands(s, teacher, student, port, workdir)
    try:
        procs.start("teacher", cmds["teacher"])
        procs.start("trainer", cmds["trainer"])
        wait_http(port, deadline, procs)
        say(f"teacher server up on 127.0.0.1:{port} ({teacher})")
        procs.start("workers", cmds["workers"])
        procs.start("rollouts", cmds["rollouts"])
        stalled = _watch(s, procs, client, keys, workdir, deadline, say)
        for name in ("rollouts", "workers", "teacher"):
            procs.stop(name)
        tally = read_tally(client, keys, workdir / "ckpt" / "metrics.jsonl")
        tally.stalled_intervals = stalled
        return tally.summary()
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every process the demo started")
        raise
    finally:
        procs.stop_all()
        client.close()
        if private is not None:
            private.cleanup()


def _watch(
    s: DemoSettings, procs: Procs, client: Any, keys: RunKeys, workdir: Path, deadline: float,
    say: Callable[..., None],
) -> int:  # fmt: skip
    """Print progress every 2 s until the trainer exits; raise SystemExit when a part fails or time is up.
    Returns the stalled intervals (see `Tally.stalled_intervals`)."""
    trainer = procs.procs["trainer"]
    start = last = time.monotonic()
    last_scored, last_steps, stalled = 0, 0, 0
    while trainer.poll() is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"gkd demo: not finished within {s.timeout_s:.0f} s; logs in {workdir / 'logs'}")
        err = procs.failed()
        if err:
            raise SystemExit(f"gkd demo: {err}")
        time.sleep(0.5)
        now = time.monotonic()
        if now - last >= 2.0:
            tally = read_tally(client, keys, workdir / "ckpt" / "metrics.jsonl")
            say(tally.progress(now - start, (tally.scored - last_scored) / (now - last)))
            still = tally.scored == last_scored and tally.steps == last_steps
            stalled += int(still and last_steps > 0 and tally.rollouts_queued > 0)
            last, last_scored, last_steps = now, tally.scored, tally.steps
    if trainer.returncode != 0:
        raise SystemExit(f"gkd demo: {procs.failed()}")
    return stalled
