"""`gkd demo`: the whole system on one machine, on embedded defaults, each part as its own process.

Redis: `--redis` / GKD_REDIS_URL, else localhost:6379 when it answers, else a private redis-server that
the demo starts and stops. Models: a tiny teacher and a smaller student built offline from a fixed seed
and cached (`pipeline.local.tiny_models`), or `--teacher` / `--student`. Then, as a user would start them: the
reference teacher server, a worker pool, a rollout producer (on-policy with probability `--lmbda`) and
a trainer. Progress is printed live; at the end a summary, and with `--json` one JSON line
``{"steps", "kl_first", "kl_last", "rollouts", "scored", "trained", "dead", "lost"}`` where
lost = produced - (trained + dead + still queued), which must be 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.local.tiny_models import corpus, tiny_models
from pipeline.queue.connection import connect_sync
from pipeline.queue.schema import RunKeys, Stat
from pipeline.sections import RunSettings
from pipeline.settings import mask_url, parse, section, setting


@dataclasses.dataclass
class DemoSettings:
    """Settings of `gkd demo` (every part gets its own flags from these)."""

    run: RunSettings = section(RunSettings, "name", "k", name="demo", k=16)
    redis_url: str | None = setting(
        None,
        "Redis URL (default: localhost:6379 if it answers, else a private server).",
        flags=("--redis",),
        secret=True,
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
    keep: bool = setting(False, "Keep the run's existing keys instead of clearing them.")
    timeout_s: float = setting(600.0, "Give up (and stop everything) after this many seconds.")


@dataclasses.dataclass
class Ledger:
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
            "lost": self.lost,
        }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def read_ledger(client: Any, keys: RunKeys, metrics: Path, window: int = 5) -> Ledger:
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
    return Ledger(
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
    )


def _redis(url: str | None) -> tuple[str, RedisServer | None]:
    """The Redis to use: the given URL, else localhost:6379 when it answers, else a private server."""
    candidates = [url] if url else ["redis://127.0.0.1:6379/0"]
    for cand in candidates:
        try:
            client = connect_sync(cand, socket_timeout_s=1.0)
            client.ping()
            client.close()
            return cand, None
        except Exception:
            if url:
                raise SystemExit(f"gkd demo: Redis at {mask_url(url)} does not answer") from None
    server = RedisServer().start()
    return server.url, server


def _prompts(path: Path, n: int = 200) -> None:
    """JSONL of prompt/completion pairs cut from the embedded corpus (the student may regenerate them)."""
    rng = random.Random(7)
    with path.open("w") as fh:
        for line in corpus(n, seed=11):
            words = line.split()
            cut = rng.randint(2, 4)
            prompt, completion = " ".join(words[:cut]), " " + " ".join(words[cut:])
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


class Procs:
    """The demo's child processes, each in its own process group, stopped together."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 30.0) -> int | None:
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def failed(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() not in (None, 0):
                tail = (self.logdir / f"{name}.log").read_text(errors="replace")[-1500:]
                return f"{name} exited with {proc.returncode}:\n{tail}"
        return None


def _wait_http(port: int, deadline: float, procs: Procs) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        err = procs.failed()
        if err:
            raise SystemExit(f"gkd demo: {err}")
        try:
            with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("gkd demo: the teacher server did not become healthy in time")


def _progress(ledger: Ledger, elapsed: float, scored_per_s: float) -> str:
    kl = f"{ledger.kl_last:.3f}" if ledger.kl_last is not None else "-"
    loss = f"{ledger.loss_last:.3f}" if ledger.loss_last is not None else "-"
    return (
        f"[{elapsed:5.1f}s] rollouts q={ledger.rollouts_queued:<4} ready q={ledger.ready_queued:<4} "
        f"produced={ledger.produced:<5} scored={ledger.scored:<5} ({scored_per_s:5.1f}/s) "
        f"step={ledger.steps:<4} loss={loss} KL={kl} dead={ledger.dead}"
    )


def run_demo(s: DemoSettings) -> dict[str, Any]:
    workdir = Path(s.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if s.json_output else (lambda *a: print(*a, flush=True))
    url, private = _redis(s.redis_url)
    say(f"redis: {mask_url(url)}" + (" (private server started by the demo)" if private else ""))
    keys = s.run.keys
    client = connect_sync(url)
    if not s.keep:
        for key in client.scan_iter(match=keys.pattern):
            client.delete(key)
    models = tiny_models() if not (s.teacher and s.student) else None
    teacher = s.teacher or str(models.teacher)  # type: ignore[union-attr]
    student = s.student or str(models.student)  # type: ignore[union-attr]
    prompts = workdir / "prompts.jsonl"
    _prompts(prompts)
    env = env_without_proxy()
    env.update(
        {
            "GKD_RUN": s.run.name,
            "GKD_REDIS_URL": url,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        }
    )
    procs = Procs(workdir / "logs", env)
    port = free_port()
    start = time.monotonic()
    deadline = start + s.timeout_s
    ckpt = workdir / "ckpt"
    if not s.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    metrics = ckpt / "metrics.jsonl"  # the trainer's per-step metrics (--log-every 1)
    try:
        procs.start(
            "teacher",
            ["teacher", "--model", teacher, "--port", str(port), "--max-logprobs", str(max(64, s.run.k))],
        )
        procs.start(
            "trainer",
            [
                "train",
                "--student",
                student,
                "--k",
                str(s.run.k),
                "--output-dir",
                str(ckpt),
                "--max-steps",
                str(s.steps),
                "--batch-tokens",
                str(s.batch_tokens),
                "--lr",
                str(s.lr),
                "--checkpoint-every",
                str(max(5, s.steps // 4)),
                "--log-every",
                "1",
                "--warmup-steps",
                "2",
                "--seed",
                "0",
            ],
        )
        _wait_http(port, deadline, procs)
        say(f"teacher server up on 127.0.0.1:{port} ({teacher})")
        procs.start(
            "workers",
            [
                "workers",
                "--teacher",
                f"http://127.0.0.1:{port}",
                "--k",
                str(s.run.k),
                "--procs",
                str(s.workers),
                "--concurrency",
                "16",
                "--high-water",
                "256",
                "--low-water",
                "128",
                "--lease-ms",
                "20000",
            ],
        )
        procs.start(
            "rollouts",
            [
                "rollouts",
                "--prompts",
                str(prompts),
                "--student",
                student,
                "--lmbda",
                str(s.lmbda),
                "--max-new-tokens",
                "24",
                "--high-water",
                "64",
                "--low-water",
                "32",
                "--seed",
                "0",
                "--epochs",
                "0",
                "--policy-poll-s",
                "1",
            ],
        )
        trainer = procs.procs["trainer"]
        last, last_scored = time.monotonic(), 0
        while trainer.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"gkd demo: not finished within {s.timeout_s:.0f} s; logs in {workdir / 'logs'}"
                )
            err = procs.failed()
            if err:
                raise SystemExit(f"gkd demo: {err}")
            time.sleep(0.5)
            now = time.monotonic()
            if now - last >= 2.0:
                ledger = read_ledger(client, keys, metrics)
                say(_progress(ledger, now - start, (ledger.scored - last_scored) / (now - last)))
                last, last_scored = now, ledger.scored
        if trainer.returncode != 0:
            raise SystemExit(f"gkd demo: {procs.failed()}")
        for name in ("rollouts", "workers", "teacher"):
            procs.stop(name)
        return read_ledger(client, keys, metrics).summary()
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every process the demo started")
        raise
    finally:
        procs.stop_all()
        client.close()
        if private is not None:
            private.cleanup()


def _table(summary: dict[str, Any]) -> str:
    rows = [
        (k, "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        for k, v in summary.items()
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>10}" for k, v in rows)


def main(argv: list[str]) -> int:
    s = parse(DemoSettings, argv, prog="gkd demo", description=__doc__.split("\n\n")[0] if __doc__ else "")
    try:
        summary = run_demo(s)
    except KeyboardInterrupt:
        return 130
    if s.json_output:
        print(json.dumps(summary), flush=True)
    else:
        print("\nsummary:\n" + _table(summary))
        kl_first, kl_last = summary["kl_first"], summary["kl_last"]
        if kl_first is not None and kl_last is not None:
            print(
                f"KL to the teacher fell from {kl_first:.3f} to {kl_last:.3f}"
                if kl_last < kl_first
                else f"KL to the teacher did not fall ({kl_first:.3f} -> {kl_last:.3f})"
            )
        print(f"inspect: gkd status --run {s.run.name}   |   redis-cli XLEN '{s.run.keys.ready.key}'")
    return 0 if summary["lost"] == 0 else 1
