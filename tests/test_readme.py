"""The README's tour, walked as written: every shell line and every redis-cli line of the section, in order.

The commands are read from README.md (the ```sh blocks and the redis-cli table of "A five-minute tour"),
so the test follows the document: a command it has no check for fails it. A private redis-server stands
in for the tour's own (its `redis-server` line is skipped, its URL exported instead), the teacher's port
8000 becomes a free one, and the tour runs in a scratch folder that shares the repository's model cache.
Each command's promise is checked: the teacher answers /health, the workers join the run, the producer
produces, the trainer ends at --max-steps with the KL visibly lower, `gkd status` and every redis-cli
line show what the table says, Ctrl-C stops every process with exit status 0, and the run is cleared.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.queue.schema import Config, RunKeys, Stat

ROOT = Path(__file__).resolve().parents[1]
RUN = RunKeys("tour")


def tour_commands(readme: str) -> list[str]:
    """The shell lines of the tour's ```sh blocks and its redis-cli table, in document order."""
    start = readme.index("## A five-minute tour")
    end = readme.index("\n## ", start + 1)
    out: list[str] = []
    in_block = False
    for raw in readme[start:end].splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_block = line == "```sh" and not in_block
            continue
        if in_block and line and not line.startswith("#"):
            out.append(re.split(r"\s{2,}#", line)[0].strip())  # a trailing comment
        elif (m := re.match(r"\| `(redis-cli [^`]+)` \|", line)) is not None:
            out.append(m.group(1))
    return out


@dataclass
class Tour:
    """The walk's state: environment, scratch folder, background jobs and their logs."""

    cwd: Path
    env: dict[str, str]
    server: RedisServer
    port: int
    jobs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)

    def run(self, cmd: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["bash", "-c", cmd], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        assert "Traceback" not in proc.stderr, (cmd, proc.stderr[-3000:])
        return proc

    def background(self, cmd: str) -> None:
        log = self.cwd / f"job{len(self.jobs)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                ["bash", "-c", "exec " + cmd], cwd=self.cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT
            )
        self.jobs.append((cmd, proc, log))

    def wait_for(self, what: str, ok: Callable[[], bool], timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            for cmd, proc, log in self.jobs:
                assert proc.poll() is None, f"{cmd} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s\n{self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {cmd}\n{log.read_text()[-2000:]}" for cmd, _, log in self.jobs)


def _hash(text: str) -> dict[str, str]:
    lines = text.splitlines()
    return dict(zip(lines[::2], lines[1::2], strict=False))


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _kls(tour: Tour) -> list[float]:
    lines = (tour.cwd / "tour-out" / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(x)["kl"]) for x in lines]


# ------------------------------------------------------------------------------- what each line promises


def check_tiny_models(t: Tour, cmd: str) -> None:
    proc = t.run(cmd, timeout_s=600)
    assert proc.returncode == 0, proc.stderr
    assert len((t.cwd / "prompts.jsonl").read_text().splitlines()) == 200
    assert (t.cwd / ".gkd/models/v1/teacher/config.json").exists()


def check_activate(t: Tour, cmd: str) -> None:
    assert cmd == "source .venv/bin/activate"  # the test's PATH has the venv first already


def check_redis_server(t: Tour, cmd: str) -> None:
    assert "--daemonize yes" in cmd and "--port 6390" in cmd  # the private server stands in for it


def check_export(t: Tour, cmd: str) -> None:
    assert cmd == "export GKD_REDIS_URL=redis://127.0.0.1:6390/0"  # the port of the redis-server line
    t.env["GKD_REDIS_URL"] = t.server.url


def check_teacher(t: Tour, cmd: str) -> None:
    t.background(cmd.removesuffix("&").strip())
    t.wait_for("the teacher's /health", lambda: _healthy(t.port))


def check_workers(t: Tour, cmd: str) -> None:
    t.background(cmd.removesuffix("&").strip())
    config = lambda: {k.decode(): v.decode() for k, v in t.redis.hgetall(RUN.config).items()}  # noqa: E731
    t.wait_for("the workers joining the run", lambda: Config.TEACHER_TOKENIZER in config())
    assert config()[Config.K] == "20" and config()[Config.TEACHER_MAX_MODEL_LEN] == "256"


def check_rollouts(t: Tour, cmd: str) -> None:
    t.background(cmd.removesuffix("&").strip())
    t.wait_for("scored rollouts", lambda: int(t.redis.hget(RUN.stats, Stat.SCORED) or 0) > 0)


def check_train(t: Tour, cmd: str) -> None:
    proc = t.run(cmd, timeout_s=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + t.logs()
    assert "done: step 60, 60 steps" in proc.stderr, proc.stderr[-2000:]
    kls = _kls(t)
    print(f"tour KL by logged step: {[round(x, 2) for x in kls]}")
    assert len(kls) == 13  # step 1 and every 5th step (--log-every 5)
    first, last = sum(kls[:3]) / 3, sum(kls[-3:]) / 3
    assert last < 0.85 * first, kls  # the KL visibly falls
    assert t.redis.hget(RUN.policy, "version") == b"60"


def check_status(t: Tour, cmd: str) -> None:
    proc = t.run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "run 'tour'" in proc.stdout and "policy version 60" in proc.stdout, proc.stdout
    assert re.search(r"workers: [2-9] live", proc.stdout), proc.stdout  # the worker and the producer


def check_redis_cli(t: Tour, cmd: str) -> None:
    proc = t.run(cmd)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    verb = cmd.split()[3]
    if verb == "XLEN":
        assert out.isdigit(), out
    elif verb == "XINFO":
        assert "teachers" in out and "lag" in out, out
    elif verb == "XPENDING" and "teachers" in cmd:
        assert out.splitlines()[0].isdigit(), out
    elif verb == "XPENDING":
        assert out == "" or "trainer-0" in out, out  # what the stopped trainer read but did not train
    elif verb == "HGETALL" and cmd.endswith(":stats'"):
        assert int(_hash(out)[Stat.TRAINED_SAMPLES]) > 0, out
    elif verb == "XRANGE":
        assert out == "", out  # no dead letters
    elif verb == "HGETALL" and cmd.endswith(":config'"):
        assert _hash(out)[Config.K] == "20", out
    elif verb == "HGETALL" and cmd.endswith(":policy'"):
        assert _hash(out)["version"] == "60", out
    elif verb == "--scan":
        assert len(out.splitlines()) >= 2 and all(":worker:" in x for x in out.splitlines()), out
    else:
        raise AssertionError(f"no check for {cmd}")


def check_stop(t: Tour, cmd: str) -> None:
    assert cmd == "kill -INT $(jobs -p); wait"
    for _, proc, _ in t.jobs:
        proc.send_signal(signal.SIGINT)
    for job, proc, log in t.jobs:
        assert proc.wait(60) == 0, f"{job}:\n{log.read_text()[-3000:]}"
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    t.jobs.clear()


def check_runs(t: Tour, cmd: str) -> None:
    proc = t.run(cmd)
    assert proc.returncode == 0 and re.search(r"^\s+tour\s+\d+", proc.stdout, re.M), proc.stdout


def check_delete(t: Tour, cmd: str) -> None:
    proc = t.run(cmd)
    assert proc.returncode == 0 and "deleted run 'tour'" in proc.stdout, proc.stdout + proc.stderr
    assert list(t.redis.scan_iter(match=RUN.pattern)) == []


CHECKS: list[tuple[str, Callable[[Tour, str], None]]] = [
    (r"^python -m pipeline\.local\.tiny_models ", check_tiny_models),
    (r"^source ", check_activate),
    (r"^redis-server ", check_redis_server),
    (r"^export GKD_REDIS_URL=", check_export),
    (r"^gkd teacher .*&$", check_teacher),
    (r"^gkd workers --run tour .*&$", check_workers),
    (r"^gkd rollouts --run tour .*&$", check_rollouts),
    (r"^gkd train --run tour ", check_train),
    (r"^gkd status --run tour$", check_status),
    (r"^redis-cli -u \"\$GKD_REDIS_URL\" ", check_redis_cli),
    (r"^kill -INT ", check_stop),
    (r"^gkd runs$", check_runs),
    (r"^gkd runs delete tour --yes$", check_delete),
]


def test_the_readme_commands_are_found() -> None:
    cmds = tour_commands((ROOT / "README.md").read_text())
    assert len([c for c in cmds if c.startswith("redis-cli")]) == 11
    assert cmds.index("gkd status --run tour") < min(
        i for i, c in enumerate(cmds) if c.startswith("redis-cli")
    )
    for cmd in cmds:
        matching = [fn.__name__ for pattern, fn in CHECKS if re.search(pattern, cmd)]
        assert len(matching) == 1, f"README command without exactly one check ({matching}): {cmd}"


@pytest.mark.timeout(1200)
def test_the_readme_tour_runs_as_written(redis_url: str, redis_server: RedisServer, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    port = free_port()
    (ROOT / ".gkd").mkdir(exist_ok=True)
    (tmp_path / ".gkd").symlink_to(ROOT / ".gkd")  # the model cache of the repository
    env = env_without_proxy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("GKD_REDIS_URL", None)
    tour = Tour(tmp_path, env, redis_server, port)
    done: list[str] = []
    try:
        for cmd in tour_commands(readme):
            cmd = cmd.replace("--port 8000", f"--port {port}").replace(":8000", f":{port}")
            fn = next(fn for pattern, fn in CHECKS if re.search(pattern, cmd))
            fn(tour, cmd)
            done.append(cmd)
    except BaseException:
        print("walked:\n" + "\n".join(done) + "\n" + tour.logs(), file=sys.stderr)
        raise
    finally:
        for _, proc, _ in tour.jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert any(c.startswith("gkd runs delete") for c in done)
