"""The mistakes a newcomer makes in the first hour (issue 11), each made on the command line as a user would.

Every expected failure must be: exit status 2, no traceback, one line ``gkd <command>: ...`` that names
what was expected and the fix. The quick refusals run through `workers.cli.main` in this process (a
traceback there would be an exception escaping it; two of them also run as real processes), the ones that
need time (waiting for Redis, Ctrl-C while the teacher loads, an idle trainer, a worker pool stopped
twice) as processes in their own tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.local.tiny_models import tiny_models
from pipeline.queue.schema import Config, RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.vocab import tokenizer_fingerprint
from pipeline.wire.codec import Rollout, encode_rollout
from tests.teacher_fakes import FakeTeacher
from workers import cli

ROOT = Path(__file__).resolve().parents[1]


def gkd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "workers.cli", *args]


def env(**extra: str) -> dict[str, str]:
    e = env_without_proxy()
    e.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    e.pop("GKD_REDIS_URL", None)
    e.pop("GKD_DEBUG", None)
    return e


def assert_refused(proc: subprocess.CompletedProcess[str], command: str, *needles: str) -> None:
    """Exit 2, no traceback, and a last line `gkd <command>: ...` holding every needle."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gkd {command}: "), last
    for needle in needles:
        assert needle in last, (needle, last)


@dataclass
class Mistake:
    name: str
    argv: list[str]
    command: str
    needles: tuple[str, ...]


def _student_with_another_vocabulary(path: Path) -> Path:
    """A tiny Llama whose tokenizer (290 tokens) is not the teacher's (320)."""
    from pipeline.local import tiny_models as tm

    tok = tm._build_tokenizer(path, vocab_size=290)
    model = tm._llama(len(tok), hidden=32, layers=1, heads=2, tok=tok, seed=3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One Redis (with the runs the mistakes need), the tiny models, files and a taken port."""
    tmp = tmp_path_factory.mktemp("first-hour")
    models = tiny_models()
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        from transformers import AutoTokenizer

        fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(models.teacher))
        teacher = {Config.K: "20", Config.TEACHER_MODEL: "tiny", Config.TEACHER_TOKENIZER: fp}
        r.hset(RunKeys("k20").config, mapping=teacher)
        r.hset(RunKeys("vocab").config, mapping={**teacher, Config.TEACHER_TOKENIZER_SIZE: "320"})
        r.hset(RunKeys("ctx").config, mapping={**teacher, Config.TEACHER_MAX_MODEL_LEN: "64"})
        out = tmp / "run100-out"
        for run in ("at100", "at100b"):
            r.hset(RunKeys(run).config, mapping=teacher)
            r.hset(
                RunKeys(run).policy,
                mapping={"version": "100", "checkpoint": f"{out}/checkpoints/step-00000100"},
            )
        r.hset(RunKeys("mine").stats, Stat.SCORED, 1)  # a run the demo must not take over
        (tmp / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "cut off\n')
        (tmp / "long.jsonl").write_text(
            '{"prompt": "short"}\n' + json.dumps({"prompt": " ".join(["the cat sees the ball"] * 40)}) + "\n"
        )
        (tmp / "a-file").write_text("not a folder")
        (tmp / "run.toml").write_text("k = 20\nlr = 3e-3\nkk = 4\n[status]\ninterval_s = 0\n")
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield {
            "tmp": tmp, "url": server.url, "models": models, "port": taken.getsockname()[1], "r": r,
            "other_student": _student_with_another_vocabulary(tmp / "other-student"), "out": out,
        }  # fmt: skip
        taken.close()
        r.close()


def mistakes(w: dict[str, Any]) -> list[Mistake]:
    url, tmp, port, out = w["url"], w["tmp"], w["port"], w["out"]
    student, teacher = str(w["models"].student), str(w["models"].teacher)
    bare = url.removeprefix("redis://")
    typo = student.replace("student", "studnet")
    bad, long = str(tmp / "bad.jsonl"), str(tmp / "long.jsonl")
    r = ["--redis", url]
    train = ["train", *r, "--student", student]
    no_scheme = ("expected a URL redis://", f"did you mean 'redis://{bare}'")
    floor = ("has published policy version 100", f"expected --resume --output-dir {out}")
    M = Mistake
    return [
        *(M(f"redis URL without a scheme ({cmd})", [cmd, "--redis", bare, *rest], cmd, no_scheme)
          for cmd, rest in [("status", []), ("runs", []), ("train", ["--student", student]),
                            ("workers", ["--teacher", "http://127.0.0.1:9"]),
                            ("rollouts", ["--prompts", bad, "--student", student])]),
        M("demo: Redis URL without a scheme", ["demo", "--redis", bare], "demo", ("did you mean",)),
        M("a bad JSONL line", ["rollouts", *r, "--prompts", bad, "--student", student], "rollouts",
          ("bad.jsonl: line 2", "expected one JSON object")),
        M("rollouts without --prompts and --student", ["rollouts", *r], "rollouts",
          ("expected --prompts FILE and --student MODEL",)),
        M("train --k 16 on a k = 20 run", [*train, "--run", "k20", "--k", "16"], "train",
          ("k: run has '20', this process has '16'", "gkd runs delete k20")),
        M("a student path that does not exist", ["train", *r, "--student", typo], "train",
          ("--student: expected a model folder", "no such folder", f"did you mean '{student}'")),
        M("rollouts: a student path that does not exist",
          ["rollouts", *r, "--prompts", bad, "--student", typo], "rollouts", ("no such folder",)),
        M("teacher: a model path that does not exist", ["teacher", "--model", typo], "teacher",
          ("--model: expected a model folder", "no such folder")),
        M("--output-dir naming a file", [*train, "--output-dir", str(tmp / "a-file")], "train",
          ("got the file", "pass another --output-dir")),
        M("gkd teacher on a port in use", ["teacher", "--model", teacher, "--port", str(port)], "teacher",
          (f"expected 127.0.0.1:{port} to be free", "pass another --port")),
        M("--resume with a mistyped --output-dir",
          [*train, "--run", "at100", "--resume", "--output-dir", str(tmp / "ckpt")], "train",
          (*floor, "--resume found no checkpoint")),
        M("a fresh trainer on a run at version 100",
          [*train, "--run", "at100b", "--output-dir", str(tmp / "new")], "train",
          (*floor, "starts from the base student")),
        M("a student with another vocabulary",
          ["train", *r, "--run", "vocab", "--student", str(w["other_student"]), "--output-dir", str(tmp)],
          "train", ("has a vocabulary of 290 tokens", "tokenizes into 320", "use such a --student")),
        M("a prompt longer than the teacher's context",
          ["rollouts", *r, "--run", "ctx", "--prompts", long, "--student", student], "rollouts",
          ("longer than the run's teacher accepts", "(lines 2)", "shorten or drop")),
        M("a shared run.toml with a typo", ["status", *r, "--config", str(tmp / "run.toml")], "status",
          ("unknown settings ['kk']",)),
        M("workers without --teacher", ["workers", *r], "workers", ("expected at least one teacher URL",)),
        M("the demo on a run that exists", ["demo", "--redis", url, "--run", "mine"], "demo",
          ("already has 1 keys", "--run NEW_NAME", "gkd runs delete mine")),
    ]  # fmt: skip


def run_inline(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`gkd ARGV` through `workers.cli.main` in this process: its exit status and what it printed. Signal
    handlers a command installs are put back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as exc:  # argparse
                rc = int(exc.code or 0)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def refusals(world: dict[str, Any]) -> dict[str, tuple[Mistake, subprocess.CompletedProcess[str]]]:
    return {m.name: (m, run_inline(m.argv)) for m in mistakes(world)}


def test_every_quick_mistake_is_one_line_and_exit_2(
    refusals: dict[str, tuple[Mistake, subprocess.CompletedProcess[str]]], world: dict[str, Any]
) -> None:
    failed = []
    for name, (m, proc) in refusals.items():
        try:
            assert_refused(proc, m.command, *m.needles)
        except AssertionError as exc:
            failed.append(f"{name}: {exc}")
    assert not failed, "\n".join(failed)
    # None of them fixed anything for a run: a failed start leaves no config behind.
    r = world["r"]
    assert r.hgetall(RunKeys("at100").config).keys() == {b"k", b"teacher_model", b"teacher_tokenizer"}
    assert not r.exists(RunKeys("gkd").config)
    assert r.hget(RunKeys("at100").policy, "version") == b"100"


def test_refusals_of_real_processes_have_no_traceback(world: dict[str, Any]) -> None:
    picked = [m for m in mistakes(world) if m.name in ("train --k 16 on a k = 20 run", "a bad JSONL line")]
    assert len(picked) == 2

    def run(m: Mistake) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            gkd_cmd(*m.argv), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=240
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for m, proc in zip(picked, pool.map(run, picked), strict=True):
            assert_refused(proc, m.command, *m.needles)


def test_a_shared_run_toml_with_top_level_settings_of_other_commands_works(world: dict[str, Any]) -> None:
    toml = world["tmp"] / "shared.toml"
    toml.write_text('k = 20\nlr = 3e-3\nprompts = "p.jsonl"\n[status]\ninterval_s = 0\n')
    proc = subprocess.run(
        gkd_cmd("status", "--redis", world["url"], "--run", "nothing", "--config", str(toml)),
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "run 'nothing' has no data yet" in proc.stdout


def test_gkd_alone_help_version_and_debug() -> None:
    proc = subprocess.run(gkd_cmd(), env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and "usage: gkd" in proc.stderr
    version = subprocess.run(gkd_cmd("--version"), env=env(), capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("gkd-pipeline ")
    helped = subprocess.run(
        gkd_cmd("status", "--help"), env=env(), capture_output=True, text=True, timeout=60
    )
    assert "default 'redis://127.0.0.1:6379/0'" in " ".join(helped.stdout.split())
    assert "'***'" not in helped.stdout and "--debug" in helped.stdout
    debug = subprocess.run(
        gkd_cmd("status", "--redis", "127.0.0.1:6379", "--debug"), env=env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "SettingsError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("gkd status: redis_url: expected")


def test_every_bench_flag_has_help(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib

    from workers.bench.cli import SUITES

    class Parsed(Exception):
        pass

    parsers: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parsers.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    missing = []
    for suite in SUITES:
        parsers.clear()
        with pytest.raises(Parsed):
            importlib.import_module(f"workers.bench.{suite}").run(["--help"])
        for action in parsers[0]._actions:
            if action.option_strings and action.help in (None, "") and action.dest != "help":
                missing.append(f"gkd bench {suite} {action.option_strings[0]}")
    assert not missing, f"flags without --help text: {missing}"


def test_pyproject_license_is_an_spdx_string() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # a table is deprecated: setuptools warns
    assert project["build-system"]["requires"] == ["setuptools>=77"]


# ------------------------------------------------------------------------------------- mistakes over time


def _spawn(args: list[str], log: Path, **extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            gkd_cmd(*args), env=env(**extra), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT
        )


def _wait_log(
    proc: subprocess.Popen[bytes], log: Path, needle: str, timeout_s: float = 120, times: int = 1
) -> str:
    deadline = time.monotonic() + timeout_s
    while (text := log.read_text(errors="replace")).count(needle) < times:
        assert proc.poll() is None, f"exited with {proc.returncode} before {needle!r}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout_s} s:\n{text[-3000:]}"
        time.sleep(0.2)
    return text


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_train_waits_for_redis_naming_the_url_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    log = tmp_path / "train.log"
    proc = _spawn(["train", "--redis", url, "--student", str(tiny_models().student)], log)
    try:
        text = _wait_log(proc, log, "waiting for Redis")
        assert f"cannot reach Redis at redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in text, text
        assert "point --redis / GKD_REDIS_URL at it" in text and "secret" not in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and "stopped before starting (while waiting for Redis)" in text


def test_ctrl_c_while_the_teacher_loads_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "teacher.log"
    proc = _spawn(["teacher", "--model", str(tiny_models().teacher), "--port", str(free_port())], log)
    try:
        _wait_log(proc, log, "loading")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, text
    # Caught while loading: "interrupted" and 130; a signal that lands once serving stops it cleanly.
    assert (rc, text.strip().splitlines()[-1]) == (130, "gkd teacher: interrupted") or (
        rc == 0 and "gkd teacher stopping" in text
    ), (rc, text[-2000:])


def test_an_idle_trainer_blocks_and_says_what_it_waits_for(redis_url: str, tmp_path: Path) -> None:
    redis.Redis.from_url(redis_url).hset(RunKeys("busy").stats, Stat.SCORED, 1)  # where the data may be
    log = tmp_path / "train.log"
    args = ["train", "--redis", redis_url, "--run", "idle", "--student", str(tiny_models().student),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    proc = _spawn(args, log, GKD_NOTICE_EVERY_S="2")
    try:
        _wait_log(proc, log, "the run's teacher tokenizer is not recorded yet")
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        text = _wait_log(proc, log, "waiting for scored samples in gkd:{idle}:ready", 30)
        time.sleep(max(0.0, 4 - (time.monotonic() - t0)))
        busy = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
        assert busy < 0.25, f"an idle trainer used {busy:.0%} of a core"
        assert f"Redis at {redis_url}" in text and "gkd status --run idle" in text
        assert "other runs in this Redis: busy" in _wait_log(proc, log, "other runs in this Redis", 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in log.read_text()


def _rollouts(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        ids = np.arange(1, 9, dtype=np.int32) % 60
        out.append(
            (f"r{i}", encode_rollout(Rollout(id=f"r{i}", input_ids=ids, prompt_len=3, policy_version=0)))
        )
    return out


async def _fill(url: str, keys: RunKeys, n: int) -> None:
    from pipeline.queue.connection import connect

    r = connect(url)
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, _rollouts(n))
    await r.aclose()


def test_a_second_ctrl_c_hands_the_workers_rollouts_back_at_once(redis_url: str, tmp_path: Path) -> None:
    """A pool of two: one Ctrl-C reaches each child once (a countdown, not a hand-back); the second hands
    back at once. A worker that never got past its teacher check fixed nothing for the run."""

    async def main() -> None:
        fake = await FakeTeacher(k_max=8, slow_s=120).start()
        keys = RunKeys("twice")
        try:
            log = tmp_path / "workers.log"
            args = ["workers", "--redis", redis_url, "--run", "twice", "--teacher", fake.url, "--k", "4",
                    "--procs", "2", "--concurrency", "4", "--request-timeout-s", "300"]  # fmt: skip
            proc = _spawn(args, log)
            try:
                await asyncio.to_thread(_wait_log, proc, log, "concurrency 4", 120, 2)  # both started
                fake.mode = "slow"  # every rollout stays in flight
                await _fill(redis_url, keys, 6)
                scoring = lambda: [q for q in fake.requests if q["path"] == "/v1/completions"]  # noqa: E731
                deadline = time.monotonic() + 60
                while len(scoring()) < 2 + 6 and time.monotonic() < deadline:  # two start-up probes
                    await asyncio.sleep(0.2)
                assert len(scoring()) == 8
                proc.send_signal(signal.SIGINT)  # as Ctrl-C does: to the supervisor
                await asyncio.to_thread(_wait_log, proc, log, "get 30 s to finish", 30)
                await asyncio.sleep(2)
                assert proc.poll() is None and "stopped again" not in log.read_text()
                t0 = time.monotonic()
                proc.send_signal(signal.SIGINT)
                assert await asyncio.to_thread(proc.wait, 30) == 0
                assert time.monotonic() - t0 < 15
            finally:
                if proc.poll() is None:
                    proc.kill()
            text = log.read_text()
            assert "stopped again: handing back" in text and "Traceback" not in text, text[-3000:]
            r = redis.Redis.from_url(redis_url)
            handed = r.xpending_range(keys.rollouts.key, "teachers", "-", "+", 10)
            assert len(handed) == 6 and r.xlen(keys.rollouts.key) == 6, text
            assert all(e["time_since_delivered"] > 60_000 for e in handed)  # reclaimable at once
        finally:
            await fake.stop()

    asyncio.run(main())


def test_an_idle_worker_says_what_it_waits_for_and_which_runs_have_data(
    redis_url: str, tmp_path: Path
) -> None:
    async def main() -> None:
        redis.Redis.from_url(redis_url).hset(RunKeys("busy").stats, Stat.SCORED, 1)
        fake = await FakeTeacher(k_max=8).start()
        log = tmp_path / "workers.log"
        args = ["workers", "--redis", redis_url, "--run", "empty", "--teacher", fake.url, "--k", "4"]
        proc = _spawn(args, log, GKD_NOTICE_EVERY_S="1")
        try:
            text = await asyncio.to_thread(_wait_log, proc, log, "other runs in this Redis: busy", 60)
            assert "no rollouts to score in gkd:{empty}:rollouts" in text and "gkd status --run empty" in text
            proc.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            await fake.stop()

    asyncio.run(main())


def test_a_worker_stopped_before_its_teacher_answered_fixes_nothing(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    dead = f"http://127.0.0.1:{free_port()}"
    proc = _spawn(["workers", "--redis", redis_url, "--run", "early", "--teacher", dead, "--k", "4"], log)
    try:
        text = _wait_log(proc, log, "teacher default unavailable at start")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ConnectionKey" not in text and f"teacher {dead}/health: cannot connect" in text, text
    assert redis.Redis.from_url(redis_url).hgetall(RunKeys("early").config) == {}


# ------------------------------------------------------------------------------------------------ units


def test_a_wait_notice_speaks_every_period_of_one_wait(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from pipeline.notice import WaitNotice

    now = [0.0]
    notice = WaitNotice(logging.getLogger("t.notice"), 30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "t.notice")
    for t in (0, 10, 29, 30, 45, 59, 61, 62):
        now[0] = float(t)
        notice.waiting(lambda: "waiting for samples")
    assert [r.getMessage() for r in caplog.records] == [
        "waiting for samples (waiting 30 s)",
        "waiting for samples (waiting 61 s)",
    ]
    notice.over()
    now[0] = 80.0
    notice.waiting("again")  # a new wait counts from zero
    assert len(caplog.records) == 2 and notice.waited_s == 0.0


async def test_the_published_policy_version_never_decreases(r: Any) -> None:
    from pipeline.errors import PolicyRegression
    from pipeline.queue.runstate import publish_policy, read_policy

    keys = RunKeys("pol")
    await publish_policy(r, keys, 100, "/out/checkpoints/step-00000100")
    await publish_policy(r, keys, 100, "/out/checkpoints/step-00000100")  # the same again: a resume
    with pytest.raises(
        PolicyRegression, match="already has policy version 100; refusing to publish version 2"
    ):
        await publish_policy(r, keys, 2, "/elsewhere/checkpoints/step-00000002")
    assert await read_policy(r, keys) == (100, "/out/checkpoints/step-00000100")
    await publish_policy(r, keys, 120, "/out/checkpoints/step-00000120")
    assert await read_policy(r, keys) == (120, "/out/checkpoints/step-00000120")


async def test_a_config_check_without_record_fixes_nothing(r: Any) -> None:
    from pipeline.errors import ConfigMismatch
    from pipeline.queue.runstate import check_run_config

    keys = RunKeys("cfgrec")
    await check_run_config(r, keys, {"k": 20}, record=False)
    assert not await r.exists(keys.config)
    await check_run_config(r, keys, {"k": 20, "loss_mode": "tail"})
    with pytest.raises(ConfigMismatch):  # refused: and the new field is not written either
        await check_run_config(r, keys, {"k": 16, "logprob_dtype": "float16"})
    assert set(await r.hkeys(keys.config)) == {b"k", b"loss_mode"}


def test_the_done_line_counts_a_resume_apart() -> None:
    from pipeline.train.trainer import TrainSettings, TrainSummary
    from workers.trainer import done_line

    s = TrainSettings(student="s", max_steps=100)
    ck = "/o/checkpoints/step-00000100"
    assert done_line(s, TrainSummary(steps=100, samples=0, checkpoint=ck, start_step=100)) == (
        "done: nothing to train, the checkpoint is at step 100 and --max-steps is 100 (raise --max-steps to "
        f"train on); latest checkpoint {ck}"
    )
    line = done_line(s, TrainSummary(steps=100, samples=640, checkpoint=ck, start_step=60))
    want = "done: step 100 (resumed at step 60), 40 steps and 640 samples in this run; latest checkpoint"
    assert line == f"{want} {ck}"
    assert done_line(s, TrainSummary(started=False)).startswith("stopped before starting")


def test_a_schedule_change_on_resume_is_said() -> None:
    from pipeline.train.startup import schedule_change, schedule_of
    from pipeline.train.trainer import TrainSettings

    old = schedule_of(TrainSettings(student="s", max_steps=200, lr=1e-3))
    assert schedule_change(old, TrainSettings(student="s", max_steps=200, lr=1e-3), 100, 5e-4) is None
    note = schedule_change(old, TrainSettings(student="s", max_steps=400, lr=1e-3), 100, 8e-4)
    assert note is not None and "--max-steps 200 -> 400" in note and "rebuilt to step 400" in note
    assert "continues at step 100 (LR now 0.0008)" in note


def test_the_demo_explains_what_is_left_and_how_to_inspect() -> None:
    from pipeline.local.demo import DemoSettings
    from workers.demo import inspect_hint, leftovers

    private = DemoSettings()
    assert "private Redis stopped with it" in inspect_hint(private)
    assert "gkd demo --redis redis://127.0.0.1:6379/0 --run demo-2" in inspect_hint(private)
    given = DemoSettings(redis_url="redis://:pw@127.0.0.1:6390/0")
    hint = inspect_hint(given)
    assert "gkd status --run demo --redis 'redis://:***@127.0.0.1:6390/0'" in hint and "pw@" not in hint
    assert "redis-cli -u 'redis://:***@127.0.0.1:6390/0' XLEN 'gkd:{demo}:ready'" in hint
    left = leftovers(private, {"queued_ready": 228, "queued_rollouts": 3})
    assert left is not None and "228 scored samples in ready, 3 rollouts" in left and "not lost" in left
    assert leftovers(private, {"queued_ready": 0, "queued_rollouts": 0}) is None


def test_model_sources_are_checked_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import SettingsError
    from pipeline.models import check_source

    check_source(str(tiny_models().student), "--student")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match="without one"):
        check_source(str(tmp_path / "empty"), "--student")
    check_source(str(tmp_path / "empty"), "--student-tokenizer", tokenizer_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SettingsError, match="no cached model of that id; fix the path, or download"):
        check_source("nobody/no-such-model-here", "--model")


def _scored(n: int, k: int, prompt_len: int = 3) -> list[Any]:
    """`n` corpus sentences with the tiny teacher's top-k of every completion token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.local.tiny_models import corpus
    from pipeline.wire.codec import ScoredSample

    path = tiny_models().teacher
    tok, teacher = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for i, text in enumerate(corpus(n, seed=5)):
        ids = [tok.bos_token_id, *tok(text)["input_ids"], tok.eos_token_id]
        with torch.no_grad():
            logp_TV = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        lp_RK, ids_RK = logp_TV[prompt_len - 1 : len(ids) - 1].topk(k, -1)
        ro = Rollout(id=f"s{i:03d}", input_ids=np.array(ids, dtype=np.int32), prompt_len=prompt_len)
        out.append(ScoredSample(ro, ids_RK.int().numpy(), lp_RK.numpy().astype(np.float16), "tiny", k))
    return out


def test_a_resume_says_how_its_schedule_changes_and_when_nothing_is_left(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import logging

    from pipeline.train.trainer import train
    from tests.test_trainer import K, fill, settings
    from workers.trainer import done_line

    keys = RunKeys.for_run("sched")
    student = str(tiny_models().student.resolve())
    fill(redis_url, keys, _scored(24, K))
    s = settings(redis_url, "sched", student, tmp_path, max_steps=3, warmup_steps=1)
    assert s.run.k == K and train(s).steps == 3
    caplog.set_level(logging.INFO, "gkd.train")
    again = dataclasses.replace(s, resume=True)
    summary = train(again)  # at --max-steps already
    assert (summary.start_step, summary.steps, summary.samples) == (3, 3, 0)
    assert done_line(again, summary).startswith("done: nothing to train, the checkpoint is at step 3")
    longer = train(dataclasses.replace(again, max_steps=5))
    assert (longer.start_step, longer.steps) == (3, 5)
    assert "--max-steps 3 -> 5: the schedule is rebuilt to step 5" in caplog.text.replace(")", "")


def test_a_student_of_another_vocabulary_is_refused_by_its_samples_when_nothing_is_recorded(
    redis_url: str, tmp_path: Path
) -> None:
    """A teacher server without /tokenize records no fingerprint: the samples themselves give it away."""
    import dataclasses

    from tests.test_trainer import K, fill

    beyond = [dataclasses.replace(x, topk_ids=x.topk_ids + 1000) for x in _scored(20, K)]
    fill(redis_url, RunKeys.for_run("alien"), beyond)
    student = str(tiny_models().student)
    args = ["train", "--redis", redis_url, "--run", "alien", "--student", student, "--k", str(K),
            "--output-dir", str(tmp_path)]  # fmt: skip
    proc = run_inline(args)
    assert_refused(
        proc, "train", "the last 20 samples of run 'alien'", "vocabulary of 320 tokens", "expected a"
    )
    assert redis.Redis.from_url(redis_url).xlen(RunKeys("alien").dead.key) == 20  # one read of all 20


async def test_the_teacher_server_says_what_it_served_and_when_it_is_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    import aiohttp

    from pipeline.serve.server import TeacherServerSettings, log_summaries, start_server

    settings = TeacherServerSettings(model=str(tiny_models().teacher), port=0, max_logprobs=8)
    running = await start_server(settings)
    caplog.set_level(logging.INFO, "gkd.teacher.server")
    summaries = asyncio.create_task(log_summaries(running.server, running.url, every_s=0.5))
    try:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": [1, 2, 3, 4], "max_tokens": 1, "prompt_logprobs": 4}
            for _ in range(3):
                async with session.post(running.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
        deadline = time.monotonic() + 10
        while "no requests in the last" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        summaries.cancel()
        await running.stop()
    served = re.findall(r"(\d+) requests \((\d+) prompts, (\d+) positions", caplog.text)
    assert [sum(int(x[i]) for x in served) for i in range(3)] == [3, 3, 12], caplog.text  # may span summaries
    assert re.search(
        rf"no requests in the last \d+ s; serving {re.escape(settings.model)} on {running.url}", caplog.text
    )
