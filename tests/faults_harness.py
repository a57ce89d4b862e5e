"""Shared machinery of the fault suite (tests/test_faults_*.py): real processes, a fault-injecting teacher,
rollouts whose index the teacher reads back from their tokens, a producer, and the ledger.

The ledger is the suite's judge. Every produced rollout id must end in exactly one place:
- `ready` (worker-side scenarios: nothing consumes it, so a duplicate handoff shows as two entries), or
- one optimizer step of the trainer's `--sample-log` (full-pipeline scenarios; steps a killed trainer
  took after its last checkpoint are discarded, as the resumed run retrains them), or
- the `dead` stream, with a stage and a reason.
Losses (ids nowhere), duplicates (an id twice) and strays (ids never produced) are counted explicitly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.queue.backpressure import Backpressure, WaterMarks
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.wire.codec import Rollout, decode_scored, encode_rollout
from tests.teacher_fakes import FakeTeacher

ROOT = Path(__file__).resolve().parents[1]
K = 4
#: Rollout i carries i in its first two tokens (base SPAN), so a teacher knows which rollout it scores.
SPAN = 300
#: Rollouts have at least this many tokens; shorter prompts are clients' start-up probes.
MIN_TOKENS = 6
#: Vocabulary of the tiny student (pipeline.local.tiny_models): every token id in these tests is below it.
STUDENT_VOCAB = 320

# ------------------------------------------------------------------------------------------- rollouts


def rollout_id(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}"


def rollout_of(prefix: str, i: int, seed: int = 0, tail: tuple[int, int] = (4, 12)) -> Rollout:
    """Rollout i: tokens [i // SPAN, i % SPAN, then tail[0]..tail[1]-1 more below 64], prompt_len 2..4."""
    rng = np.random.default_rng(seed * 1_000_003 + i)
    tail_ids = rng.integers(0, 64, size=int(rng.integers(*tail)))
    ids = np.concatenate([[i // SPAN, i % SPAN], tail_ids]).astype(np.int32)
    return Rollout(
        id=rollout_id(prefix, i), input_ids=ids, prompt_len=int(rng.integers(2, 5)), source="dataset"
    )


def rollouts(
    n: int, prefix: str = "r", start: int = 0, seed: int = 0, tail: tuple[int, int] = (4, 12)
) -> list[tuple[str, bytes]]:
    """(id, payload) of rollouts start..start+n-1."""
    out = []
    for i in range(start, start + n):
        ro = rollout_of(prefix, i, seed, tail)
        out.append((ro.id, encode_rollout(ro)))
    return out


def index_of(prompt: Sequence[int]) -> int:
    return int(prompt[0]) * SPAN + int(prompt[1])


async def produce(
    r: aioredis.Redis,
    keys: RunKeys,
    items: Sequence[tuple[str, bytes]],
    *,
    batch: int = 25,
    marks: WaterMarks | None = None,
    stop: asyncio.Event | None = None,
    partitions: int = 1,
) -> int:
    """Add `items` to the rollouts stream in batches, waiting for room above the high-water mark like
    `gkd rollouts` does (each batch to the least filled partition). Returns how many were acknowledged."""
    await ensure_groups(r, keys, partitions)
    parts = keys.parts(partitions)
    bp = Backpressure(r, keys.rollouts, marks or WaterMarks(), parts=parts)
    done = 0
    for i in range(0, len(items), batch):
        if stop is not None and stop.is_set():
            break
        await bp.wait_for_room(stop)
        await add_rollouts(r, parts[await bp.least_filled()], items[i : i + batch])
        done += len(items[i : i + batch])
    return done


# ------------------------------------------------------------------------------------------ processes


class Procs:
    """Processes started by one test, by name; every one is killed at teardown (no leaks)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.by_name: dict[str, subprocess.Popen[bytes]] = {}
        self.all: list[subprocess.Popen[bytes]] = []
        self.spawns: collections.Counter[str] = collections.Counter()
        self.offsets: dict[str, int] = {}  # log size when each name was last spawned
        self.groups: set[int] = set()  # pids of processes spawned with group=True

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, *, group: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start `args` with the proxy-free environment; output appends to <log_dir>/<name>.log.

        `group`: a process that starts others (torchrun and its ranks): `kill9` kills them all."""
        path = self.log(name)
        self.offsets[name] = path.stat().st_size if path.exists() else 0
        full = env_without_proxy()
        full.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})})
        with open(self.log(name), "ab") as fh:
            proc = subprocess.Popen(args, cwd=ROOT, env=full, stdout=fh, stderr=subprocess.STDOUT)
        if group:
            self.groups.add(proc.pid)
        self.by_name[name] = proc
        self.all.append(proc)
        self.spawns[name] += 1
        return proc

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def signal(self, name: str, sig: int) -> None:
        proc = self.by_name[name]
        if proc.poll() is None:
            proc.send_signal(sig)

    def kill9(self, name: str) -> int:
        """SIGKILL `name` (with every process it started if spawned as a group) and reap it; returns its
        exit status."""
        proc = self.by_name[name]
        if proc.pid in self.groups:
            self._kill_group(proc.pid)
        elif proc.poll() is None:
            proc.kill()
        return proc.wait(30)

    def _kill_group(self, pid: int) -> None:
        """SIGKILL `pid` and all its descendants, all at once (torchrun starts each rank in a session of
        its own, so a process group is not enough; a rank outliving its agent would go on training)."""
        doomed = [pid, *_descendants(pid)]
        for p in doomed:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def wait(self, name: str, timeout_s: float) -> int:
        proc = self.by_name[name]
        rc = await asyncio.to_thread(proc.wait, timeout_s)
        return int(rc)

    def started(self, name: str, marker: str) -> int:
        """How many times `marker` appears in the log of `name` (e.g. a worker's start-up line)."""
        return self.tail(name, 10**8).count(marker)

    def since_spawn(self, name: str) -> str:
        """What the current process of `name` has logged (its log from its latest spawn on)."""
        path = self.log(name)
        with open(path, "rb") as fh:
            fh.seek(self.offsets.get(name, 0))
            return fh.read().decode(errors="replace")

    def alive(self, name: str) -> bool:
        return self.by_name[name].poll() is None

    def close(self) -> None:
        for pid in self.groups:  # ranks outlive a torchrun that is gone
            self._kill_group(pid)
        for proc in self.all:
            if proc.poll() is None:
                proc.kill()  # SIGKILL ends a SIGSTOPped process too
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command may hold spaces and parentheses
        children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """The test's processes; logs in tmp_path; all killed at teardown."""
    group = Procs(tmp_path)
    yield group
    group.close()


def gkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "workers.cli", *args]


def worker_cmd(
    redis_url: str,
    run: str,
    teachers: Sequence[str],
    name: str,
    *,
    k: int = K,
    lease_ms: int = 1500,
    max_deliveries: int = 3,
    concurrency: int = 8,
    extra: Sequence[str] = (),
) -> list[str]:
    """`gkd workers` with fault-test timings: short leases, quick heartbeats, short teacher timeouts."""
    return gkd(
        "workers", "--run", run, "--redis", redis_url, "--teacher", ",".join(teachers), "--name", name,
        "--k", str(k), "--lease-ms", str(lease_ms), "--max-deliveries", str(max_deliveries),
        "--concurrency", str(concurrency), "--heartbeat-ttl-ms", "1000", "--grace-s", "5",
        "--request-timeout-s", "2", "--max-retries", "2", "--logprob-dtype", "float32", *extra,
    )  # fmt: skip


def trainer_cmd(
    redis_url: str,
    run: str,
    student: str,
    out: Path,
    sample_log: Path,
    *,
    k: int = K,
    checkpoint_every: int = 4,
    idle_exit_s: float = 4.0,
    extra: Sequence[str] = (),
) -> list[str]:
    """`gkd train` on the tiny student, small batches, frequent checkpoints, the sample log on, a 3 s lease.

    It exits by itself (final checkpoint, status 0) after `idle_exit_s` without data, so a test can wait
    for its exit status (SIGTERM is tested on its own)."""
    return gkd(
        "train", "--run", run, "--redis", redis_url, "--student", student, "--output-dir", str(out),
        "--sample-log", str(sample_log), "--k", str(k), "--batch-tokens", "160", "--lr", "1e-3",
        "--warmup-steps", "2", "--checkpoint-every", str(checkpoint_every), "--device", "cpu",
        "--num-threads", "1", "--lease-ms", "3000", "--log-every", "5", "--idle-exit-s", str(idle_exit_s),
        *extra,
    )  # fmt: skip


def torchrun_cmd(nproc: int, train: list[str]) -> list[str]:
    """`train` (a `trainer_cmd`) as `nproc` ranks under torchrun (gloo on the CPU); spawn it with
    `group=True`. torchrun takes `--run` for its own --run-path: the run is spelled --run-name."""
    rest = ["--run-name" if a == "--run" else a for a in train[train.index("train") + 1 :]]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), "-m", "workers.cli", "train", *rest,
    ]  # fmt: skip


def rollouts_cmd(
    redis_url: str, run: str, student: str, prompts: Path, n: int, *, extra: Sequence[str] = ()
) -> list[str]:
    """`gkd rollouts` writing `n` dataset-completion rollouts (lmbda 0: no generation, fast)."""
    return gkd(
        "rollouts", "--run", run, "--redis", redis_url, "--student", student, "--prompts", str(prompts),
        "--lmbda", "0", "--num-rollouts", str(n), "--epochs", "0", "--batch-size", "8",
        "--policy-poll-s", "1", *extra,
    )  # fmt: skip


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """`n` JSONL {prompt, completion} lines from the tiny models' corpus (the student's vocabulary)."""
    from pipeline.local.tiny_models import corpus

    with open(path, "w") as fh:
        for text in corpus(n, seed=seed):
            words = text.split()
            fh.write(json.dumps({"prompt": " ".join(words[:2]), "completion": " " + " ".join(words[2:])}))
            fh.write("\n")
    return path


def student_path() -> str:
    from pipeline.local.tiny_models import tiny_models

    return str(tiny_models().student.resolve())


async def wait_until(
    pred: Callable[[], Awaitable[bool] | bool],
    timeout_s: float,
    what: str,
    *,
    procs: Procs | None = None,
    alive: Sequence[str] = (),
    poll_s: float = 0.05,
) -> None:
    """Poll `pred` (sync or async) until it holds; fail after `timeout_s`, or at once if a process in
    `alive` exits."""
    deadline = time.monotonic() + timeout_s
    while not await _truth(pred()):
        if procs is not None:
            for name in alive:
                if not procs.alive(name):
                    rc = procs.by_name[name].returncode
                    raise AssertionError(f"{name} exited ({rc}) waiting for {what}:\n{procs.tail(name)}")
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {n}:\n{procs.tail(n, 1500)}" for n in alive) if procs else ""
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}{tails}")
        await asyncio.sleep(poll_s)


async def _truth(value: Awaitable[bool] | bool) -> bool:
    return bool(await value) if inspect.isawaitable(value) else bool(value)


# ----------------------------------------------------------------------------------- faulty teacher

_FAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("fault", default=None)
#: plan(rollout index, attempt number from 0) -> a tests.teacher_fakes fault name, "hang" (never answers),
#: "trickle" (a correct body in slow pieces), or None (ok).
Plan = Callable[[int, int], str | None]


@functools.cache
def student_tokenizer() -> Any:
    """The tiny student's tokenizer (pipeline.local.tiny_models), loaded once."""
    from transformers import AutoTokenizer

    from pipeline.local.tiny_models import tiny_models

    return AutoTokenizer.from_pretrained(tiny_models().student)


class FaultyTeacher(FakeTeacher):
    """FakeTeacher (vLLM) whose faults follow a plan per rollout (by the index in its tokens), that can hold
    requests (`gate`), hang on chosen rollouts forever, and restart on the same port."""

    def __init__(self, plan: Plan | None = None, **kw: Any) -> None:
        kw.setdefault("backend", "vllm")
        kw.setdefault("k_max", 20)
        # The student's vocabulary: the fake aliases ids >= vocab (id % vocab), which would put one
        # token's mass twice into a row (vLLM's extra actual-token entry) and get the row rejected.
        kw.setdefault("vocab", STUDENT_VOCAB)
        kw.setdefault("tokenizer", student_tokenizer())  # the trainers check it against their student's
        super().__init__(**kw)
        self.plan = plan
        self.attempts: collections.Counter[int] = collections.Counter()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0  # requests held at the gate or hanging
        self.port = 0
        self.trickle_s = 4.0  # how long a "trickle" body takes

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body.get("prompt") or []
        if len(prompt) < MIN_TOKENS:  # a client's start-up probe, not a rollout: never held or faulted
            return await super()._completions(request)
        idx = index_of(prompt)
        n = self.attempts[idx]
        self.attempts[idx] += 1
        fault = self.plan(idx, n) if self.plan is not None else None
        self.waiting += 1
        try:
            await self.gate.wait()
            if fault == "hang":
                await asyncio.sleep(3600)  # cancelled when the client goes away
        finally:
            self.waiting -= 1
        if fault == "trickle":  # a correct body sent in slow pieces, past the client's timeout
            _FAULT.set("ok")
            return await self._trickle(request, await super()._completions(request))
        _FAULT.set(fault)
        return await super()._completions(request)

    async def _trickle(self, request: web.Request, full: web.StreamResponse) -> web.StreamResponse:
        body = bytes(getattr(full, "body", b"") or b"")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        step = max(1, len(body) // 8)
        for i in range(0, len(body), step):
            await resp.write(body[i : i + step])
            await asyncio.sleep(self.trickle_s / 8)
        return resp

    def _next_fault(self) -> str:
        fault = _FAULT.get()
        return fault if fault is not None else super()._next_fault()

    async def start(self, port: int = 0) -> FaultyTeacher:  # type: ignore[override]
        """Serve on 127.0.0.1:`port` (0: a free one; a restart passes the old `self.port`)."""
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._record])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True).start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{self.port}"
        return self


def check_scores(fake: FakeTeacher, payload: bytes) -> str:
    """Decode a ready payload and check its top-k equal the fake teacher's for that rollout; returns the id.

    Catches a corrupted or misaligned sample (e.g. a failed call turned into -inf or zero rows)."""
    s = decode_scored(payload)
    ro = s.rollout
    ids_RK, lp_RK = fake.expected(ro.input_ids, ro.prompt_len, s.k)
    np.testing.assert_array_equal(s.topk_ids, ids_RK, err_msg=f"top-k ids of {ro.id}")
    np.testing.assert_allclose(s.topk_logprobs, lp_RK, rtol=0, atol=1e-5, err_msg=f"logprobs of {ro.id}")
    return ro.id


# ------------------------------------------------------------------------------------------- ledger


@dataclass
class Outcome:
    """Where every rollout ended. Counters count occurrences, so a duplicate shows as 2."""

    produced: list[str]
    ready: collections.Counter[str] = field(default_factory=collections.Counter)
    trained: collections.Counter[str] = field(default_factory=collections.Counter)
    dead: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def places(self, via: str) -> collections.Counter[str]:
        out = collections.Counter(self.ready if via == "ready" else self.trained)
        for rid, records in self.dead.items():
            out[rid] += len(records)
        return out

    def lost(self, via: str) -> list[str]:
        seen = self.places(via)
        return [rid for rid in self.produced if seen[rid] == 0]

    def duplicated(self, via: str) -> dict[str, int]:
        return {rid: n for rid, n in self.places(via).items() if n > 1}

    def strays(self, via: str) -> list[str]:
        known = set(self.produced)
        return [rid for rid in self.places(via) if rid not in known]

    def summary(self, via: str) -> str:
        return (f"{len(self.produced)} produced, {sum(self.ready.values())} in ready, "
                f"{sum(self.trained.values())} trained, {sum(map(len, self.dead.values()))} dead; "
                f"{len(self.lost(via))} lost, {len(self.duplicated(via))} duplicated, "
                f"{len(self.strays(via))} strays")  # fmt: skip

    def assert_exactly_once(self, via: str) -> None:
        """Each produced id in exactly one place (ready or trained, or dead); nothing else anywhere."""
        lost, dup, strays = self.lost(via), self.duplicated(via), self.strays(via)
        assert not (lost or dup or strays), (
            f"{self.summary(via)}: lost {lost[:10]}, duplicated {dict(list(dup.items())[:10])}, "
            f"strays {strays[:10]}"
        )


async def stream_entries(r: aioredis.Redis, stream: str) -> list[dict[str, bytes]]:
    """Every entry of a stream (fields decoded to str keys), in order."""
    out: list[dict[str, bytes]] = []
    last = "-"
    while True:
        page: Any = await r.xrange(stream, min=last, max="+", count=1000)
        if last != "-":
            page = page[1:]
        if not page:
            return out
        out += [{k.decode(): v for k, v in fields.items()} for _, fields in page]
        last = page[-1][0].decode()


async def dead_letters(r: aioredis.Redis, keys: RunKeys) -> dict[str, list[tuple[str, str]]]:
    """rollout id -> [(stage, reason)] of the dead stream."""
    out: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for e in await stream_entries(r, keys.dead.key):
        out[e["id"].decode()].append((e["stage"].decode(), e["reason"].decode(errors="replace")))
    return dict(out)


async def ready_ids(r: aioredis.Redis, keys: RunKeys) -> collections.Counter[str]:
    return collections.Counter(e["id"].decode() for e in await stream_entries(r, keys.ready.key))


def trained_steps(sample_log: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> sample ids of the steps the checkpoint lineage kept, from one sample log that any
    number of jobs appended to (each line names its job).

    A job resumed from the checkpoint of step S (any number of ranks, any names) starts at step S + 1:
    the steps above S that earlier jobs took after that checkpoint are in no checkpoint the run continues
    from (their samples went back to be trained again). So when a job's first line has step n, every
    earlier line of other jobs with step >= n is discarded. A torn last line (kill -9) is ignored.
    """
    kept: dict[tuple[int, int], list[str]] = {}
    jobs: set[str] = set()
    if not sample_log.exists():
        return kept
    for line in sample_log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        job, rank, step = str(rec.get("job")), int(rec["rank"]), int(rec["step"])
        if job not in jobs:
            jobs.add(job)
            kept = {key: ids for key, ids in kept.items() if key[1] < step}
        kept[(rank, step)] = list(rec["ids"])
    return kept


def sample_log_jobs(sample_log: Path) -> list[str]:
    """The jobs that wrote to a sample log, in the order they started."""
    jobs: list[str] = []
    for line in sample_log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            job = str(json.loads(line).get("job"))
            if job not in jobs:
                jobs.append(job)
    return jobs


def lineage_steps(sample_logs: Sequence[Path]) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> sample ids of the steps the continuing run kept, from one sample log per process
    (or per torchrun job) in the order they ran, whatever their world sizes.

    Each run after the first resumed from a checkpoint: its first step is that checkpoint's step + 1,
    so every step >= it of the earlier runs (all ranks) was lost with its process and is discarded.
    """
    kept: dict[tuple[int, int], list[str]] = {}
    for path in sample_logs:
        run = trained_steps(path)
        if not run:
            continue
        first = min(step for _, step in run)
        kept = {key: ids for key, ids in kept.items() if key[1] < first}
        kept.update(run)
    return kept


async def outcome(
    r: aioredis.Redis,
    keys: RunKeys,
    produced: Sequence[str],
    sample_log: Path | None = None,
    partitions: int = 1,
) -> Outcome:
    out = Outcome(list(produced))
    for part in keys.parts(partitions):
        out.ready.update(await ready_ids(r, part))
        for rid, records in (await dead_letters(r, part)).items():
            out.dead.setdefault(rid, []).extend(records)
    if sample_log is not None:
        for ids in trained_steps(sample_log).values():
            out.trained.update(ids)
    return out


async def used_memory(r: aioredis.Redis) -> int:
    info = await r.info("memory")
    return int(info["used_memory"])


def sample_log_count(sample_log: Path) -> int:
    return sum(len(ids) for ids in trained_steps(sample_log).values())
