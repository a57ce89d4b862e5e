"""The worker pool's process side: `gkd workers` settings, and the supervisor of `--procs N` children.

With `--procs N` (N > 1) the `gkd workers` process becomes a supervisor: it starts N children running
the worker loop under distinct consumer names (``<name>-0`` ... ``<name>-N-1``; metrics on port + i),
forwards SIGTERM and SIGINT to them, restarts a child that crashes after a healthy start, and exits with
the first fatal status of a child that fails at start (a config mismatch, an unreachable teacher).
This module imports nothing heavy: `gkd workers` reads it before its signal handlers are set.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.queue.schema import DEFAULT_TEACHER
from pipeline.score.options import WorkerOptions
from pipeline.score.teachers import parse_teachers
from pipeline.sections import REDIS_LAYOUT, CommonSettings, FlowSettings, RunSettings
from pipeline.settings import secret_flags, section, setting

if TYPE_CHECKING:  # aiohttp, redis and numpy wait until the signal handlers are set
    from pipeline.teacher.config import TeacherConfig

log = logging.getLogger("gkd.workers")

#: A child that fails within this many seconds of its start failed to start: the pool gives up.
START_FAILURE_WINDOW_S = 15.0

#: Environment variable naming the supervisor's pid in its children (they stop when it is gone).
SUPERVISOR_ENV = "GKD_SUPERVISOR_PID"


@dataclass
class WorkerSettings(CommonSettings):
    """Settings of `gkd workers` (flags, GKD_* environment variables, TOML table [workers])."""

    run: RunSettings = section(
        RunSettings, "name", "redis_url", "k", "logprob_dtype", "teacher_mode", "samples", *REDIS_LAYOUT
    )
    flow: FlowSettings = section(FlowSettings)
    loop: WorkerOptions = section(
        WorkerOptions,
        "concurrency",
        "max_held",
        "grace_s",
        "heartbeat_ttl_ms",
        "metrics_port",
        "metrics_addr",
    )
    teacher: list[str] = setting(
        [],
        "Teacher endpoint URLs, URL[,URL...] (the default teacher) or NAME=URL[,URL...] (a named teacher "
        "that rollouts choose by their teacher_name); repeat for several teachers.",
    )
    backend: str = setting("auto", "Teacher protocol.", choices=("auto", "vllm", "sglang"))
    model: str | None = setting(
        None,
        "Default teacher's model name to request (default: the server's only model; named teachers: theirs).",
    )
    procs: int = setting(1, "Worker processes (each runs its own event loop).")
    api_key: str | None = setting(None, "Bearer token for the teacher.", secret=True)
    student_tokenizer: str | None = setting(
        None, "Student tokenizer path or id: refuse to start unless the teacher tokenizes the same."
    )
    name: str | None = setting(None, "Consumer name prefix (default: <host>-<pid>).")
    request_timeout_s: float = setting(60.0, "Timeout of one teacher request.")
    max_retries: int = setting(4, "Teacher client retries (with failover) before a rollout backs off.")
    per_endpoint_concurrency: int = setting(64, "Requests in flight per teacher endpoint (per process).")


def teacher_configs(s: WorkerSettings) -> dict[str, TeacherConfig]:
    """Teacher name -> client configuration of these settings (see `pipeline.score.teachers`).
    Raises SettingsError for a bad --teacher list."""
    from pipeline.teacher.config import TeacherConfig

    return {
        name: TeacherConfig(
            endpoints=urls,
            backend=s.backend,
            k=s.run.width,
            sampled=s.run.sampled,
            model=s.model if name == DEFAULT_TEACHER else None,
            api_key=s.api_key,
            request_timeout_s=s.request_timeout_s,
            max_retries=s.max_retries,
            per_endpoint_concurrency=s.per_endpoint_concurrency,
            student_tokenizer=s.student_tokenizer,
        )
        for name, urls in parse_teachers(list(s.teacher)).items()
    }


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _child_cmd(argv: list[str], s: WorkerSettings, base: str, i: int) -> list[str]:
    """The command line of child `i`: the parent's flags minus secrets, then its own (later flags win)."""
    port = s.loop.metrics_port + i if s.loop.metrics_port > 0 else 0
    own = ["--procs", "1", "--name", f"{base}-{i}", "--metrics-port", str(port)]
    return [sys.executable, "-m", "workers.cli", "workers", *_without_secrets(argv), *own]


def _without_secrets(argv: list[str]) -> list[str]:
    """`argv` without the secret flags (children get those values through the environment, not argv:
    `ps` shows argv)."""
    secret = secret_flags(WorkerSettings)
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in secret:
            skip = True  # "--flag VALUE"
        elif arg.split("=", 1)[0] not in secret:
            out.append(arg)
    return out


def _child_env(s: WorkerSettings) -> dict[str, str]:
    """The environment of the children: ours plus the resolved secrets (whatever their source)."""
    env = dict(os.environ)
    secrets = {"--redis-url": s.run.redis_url, "--api-key": s.api_key}
    env.update({secret_flags(WorkerSettings)[flag]: v for flag, v in secrets.items() if v})
    env[SUPERVISOR_ENV] = str(os.getpid())
    return env


def _spawn(
    argv: list[str], s: WorkerSettings, base: str, i: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    # In a session of its own: a Ctrl-C in the terminal reaches the supervisor only, which forwards it
    # once (a child that also got it from the terminal would take the forwarded copy for a second Ctrl-C).
    return subprocess.Popen(_child_cmd(argv, s, base, i), env=env, start_new_session=True)


def supervise(s: WorkerSettings, argv: list[str], stop_requested: bool = False) -> int:
    """Start `s.procs` children, forward SIGTERM/SIGINT, restart crashed ones; see the module doc."""
    base = s.name or default_name()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    procs: list[subprocess.Popen[bytes]] = []
    started: list[float] = []
    env = _child_env(s)
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    stopping = stopping or stop_requested
    try:
        for i in range(s.procs if not stopping else 0):
            procs.append(_spawn(argv, s, base, i, env))
            started.append(time.monotonic())
        log.info("pool %s: %d worker processes started", base, s.procs)
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                rc = proc.poll()
                if rc is None or rc == 0 or stopping:
                    continue
                if time.monotonic() - started[i] < START_FAILURE_WINDOW_S:
                    log.error("pool %s: worker %d failed at start (exit %d); stopping the pool", base, i, rc)
                    status = rc
                    forward(signal.SIGTERM, None)
                    break
                log.warning("pool %s: worker %d exited with %d; restarting it", base, i, rc)
                procs[i] = _spawn(argv, s, base, i, env)
                started[i] = time.monotonic()
        _reap(procs, s.loop.grace_s + 10)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _reap(procs, 0)
    if status == 0:
        failed = [p.returncode for p in procs if p.returncode]
        status = failed[0] if failed else 0
    return status if status >= 0 else 1  # killed by a signal


def _reap(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Wait for children up to `timeout_s`; kill those still running (their entries get reclaimed)."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
