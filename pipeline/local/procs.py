"""Child processes of `gkd demo`: each `gkd` command in its own process group, logging to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


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


def wait_http(port: int, deadline: float, procs: Procs) -> None:
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
