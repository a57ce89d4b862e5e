"""`gkd rollouts`: the three JSONL forms, line errors, backpressure, policy reloads (in process, server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch
from aiohttp import web

from pipeline.errors import RedisUnavailable
from pipeline.local.redis_server import free_port
from pipeline.local.tiny_models import prompts as tiny_prompts
from pipeline.local.tiny_models import tiny_models
from pipeline.produce.producer import RolloutSettings, produce
from pipeline.produce.prompts import PromptFileError, load_prompts
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import publish_policy
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import ensure_groups
from pipeline.sections import FlowSettings, RunSettings
from pipeline.teacher import vllm
from pipeline.wire.codec import Rollout, decode_rollout


@pytest.fixture(scope="module")
def student() -> str:
    return str(tiny_models().student.resolve())


@pytest.fixture(scope="module")
def tok(student: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student)


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def settings(url: str, run: str, prompts: str, student: str, **kw: Any) -> RolloutSettings:
    marks = {k: kw.pop(k) for k in list(kw) if k in ("high_water", "low_water")}
    base: dict[str, Any] = {
        "run": RunSettings(name=run, redis_url=url),
        "flow": FlowSettings(**marks),
        "prompts": prompts,
        "student": student,
        "max_new_tokens": 6,
        "device": "cpu",
        "shuffle": False,
        "policy_poll_s": 0.0,
    }
    base.update(kw)
    return RolloutSettings(**base)


async def stream(r: aioredis.Redis, keys: RunKeys) -> list[Rollout]:
    out = []
    entries: Any = await r.xrange(keys.rollouts.key)
    for _, fields in entries:
        ro = decode_rollout(fields[b"data"])
        assert fields[b"id"].decode() == ro.id
        out.append(ro)
    return out


async def until(pred: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60.0) -> None:
    async def poll() -> None:
        while not await pred():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


@pytest.fixture
async def running() -> AsyncIterator[Callable[[RolloutSettings], tuple[asyncio.Event, asyncio.Task[Any]]]]:
    """Start producers as tasks; whatever happens in the test, they are stopped and awaited after it."""
    tasks: list[tuple[asyncio.Event, asyncio.Task[Any]]] = []

    def start(s: RolloutSettings) -> tuple[asyncio.Event, asyncio.Task[Any]]:
        stop = asyncio.Event()
        tasks.append((stop, asyncio.create_task(produce(s, stop))))
        return tasks[-1]

    yield start
    for stop, task in tasks:
        stop.set()
        await asyncio.wait([task], timeout=60)


def greedy(model: Any, prompt: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
    ids = out[0, len(prompt) :].tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def perturbed_checkpoint(student: str, path: Path, seed: int) -> Path:
    """The student with noise added to every weight, saved as a published checkpoint would be."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- tests


CHAT = [{"role": "user", "content": "The robot"}]
ROWS = [
    {"prompt": "The cat sees"},
    {"prompt": "A dog likes", "completion": " the ball today."},
    {"messages": CHAT},
    {
        "messages": [
            {"role": "user", "content": "Our team"},
            {"role": "assistant", "content": "builds a box."},
        ]
    },
]


async def test_three_jsonl_forms_make_valid_rollouts(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, student: str, tok: Any
) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    summary = await produce(settings(redis_url, "forms", path, student, lmbda=0.0, batch_size=3))
    assert summary.produced == 4 and summary.sources == {"student": 2, "dataset": 2}
    got = {ro.meta["prompt_index"]: ro for ro in await stream(r, RunKeys.for_run("forms"))}
    eos = tok.eos_token_id
    chat = tok(
        tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    team = [{"role": "user", "content": "Our team"}]
    team_ids = tok(
        tok.apply_chat_template(team, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    want_prompts = {
        0: tok("The cat sees")["input_ids"],
        1: tok("A dog likes")["input_ids"],
        2: chat,
        3: team_ids,
    }
    for i, ro in got.items():
        p = ro.prompt_len
        assert ro.input_ids[:p].tolist() == want_prompts[i]
        assert ro.num_tokens - p >= 1 and ro.policy_version == 0 and ro.created_ms > 0
        assert ro.meta["line"] == i + 1 and ro.id.startswith("forms-")
    # No dataset completion: the student generates (at most max_new_tokens); with one, lmbda=0 uses it.
    assert got[0].source == got[2].source == "student"
    assert all(got[i].num_tokens - got[i].prompt_len <= 6 for i in (0, 2))
    assert got[1].source == got[3].source == "dataset"
    assert got[1].input_ids[got[1].prompt_len :].tolist() == [
        *tok(" the ball today.", add_special_tokens=False)["input_ids"],
        eos,
    ]
    assert got[3].input_ids[got[3].prompt_len :].tolist() == [
        *tok("builds a box.", add_special_tokens=False)["input_ids"],
        eos,
    ]
    assert len({ro.id for ro in got.values()}) == 4

    on_policy = await produce(settings(redis_url, "all-student", path, student, lmbda=1.0))
    assert on_policy.sources == {"student": 4}


def test_a_bad_prompt_line_is_named(tmp_path: Path, tok: Any) -> None:
    cases: list[tuple[list[Any], str]] = [
        (['{"prompt": "ok"}', "", '{"text": "x"}'], r"line 3: expected .*\"prompt\".*got keys \['text'\]"),
        (["{not json"], r"line 1: expected one JSON object .*got invalid JSON"),
        ([{"prompt": "x", "completion": 5}], r"line 1: expected \"completion\" as a non-empty string, got 5"),
        ([{"messages": "hi"}], r"line 1: expected \"messages\" as a non-empty list"),
        ([[1, 2]], r"line 1: expected .* got list"),
    ]
    for rows, pattern in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(PromptFileError, match=pattern):
            load_prompts(path, tok)
    assert len(load_prompts(write_jsonl(tmp_path / "ok.jsonl", ROWS), tok)) == 4


async def test_producer_pauses_at_the_high_water_mark(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, student: str, running: Any
) -> None:
    keys = RunKeys.for_run("bp")
    rows = [{"prompt": p, "completion": " again."} for p in tiny_prompts(20)]
    s = settings(
        redis_url,
        "bp",
        write_jsonl(tmp_path / "p.jsonl", rows),
        student,
        lmbda=0.0,
        batch_size=2,
        high_water=6,
        low_water=2,
        num_rollouts=20,
    )
    _, task = running(s)

    async def paused() -> bool:
        return await r.hget(keys.worker("rollouts"), "paused") == b"1"

    await until(paused, "the producer to pause")
    assert 6 <= await r.xlen(keys.rollouts.key) <= 6 + 2 - 1  # overshoot below one batch
    teachers = StreamConsumer(r, keys.rollouts, "teacher")
    consumed, highest = 0, 0
    while consumed < 20:
        got = await teachers.read(1, block_ms=2000)
        assert got, "the producer did not resume below the low-water mark"
        await teachers.ack(got)
        consumed += len(got)
        highest = max(highest, await r.xlen(keys.rollouts.key))
    summary = await asyncio.wait_for(task, 60)
    assert summary.produced == 20 and highest <= 7 and await r.xlen(keys.rollouts.key) == 0


async def test_producer_carries_on_through_a_redis_restart(
    redis_url: str, redis_server: Any, r: aioredis.Redis, tmp_path: Path, student: str, running: Any
) -> None:
    keys = RunKeys.for_run("restart")
    rows = [{"prompt": p, "completion": " again."} for p in tiny_prompts(10)]
    s = settings(
        redis_url,
        "restart",
        write_jsonl(tmp_path / "p.jsonl", rows),
        student,
        lmbda=0.0,
        batch_size=2,
        high_water=4,
        low_water=0,
        num_rollouts=30,
        epochs=0,
    )
    _, task = running(s)

    async def paused() -> bool:
        return await r.hget(keys.worker("rollouts"), "paused") == b"1"

    await until(paused, "the producer to pause")
    redis_server.stop(kill=True)  # no persistence: what the stream held is lost with it
    await asyncio.sleep(0.5)
    redis_server.start()
    for _ in range(3):  # our own client's pooled connection died with the server: one failed call
        try:
            await r.ping()
            break
        except RedisUnavailable:
            pass
    await ensure_groups(r, keys)
    teachers = StreamConsumer(r, keys.rollouts, "teacher")
    consumed = 0
    while not task.done():
        got = await teachers.read(10, block_ms=200)
        await teachers.ack(got)
        consumed += len(got)
    summary = await task
    assert (
        summary.produced == 30
        and 30 - (4 + 2 - 1) <= consumed + len(await teachers.read(10, block_ms=10)) <= 30
    )


async def test_reload_on_a_new_policy_version(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, student: str, tok: Any, running: Any
) -> None:
    from transformers import AutoModelForCausalLM

    keys = RunKeys.for_run("reload")
    rows = [{"prompt": p} for p in tiny_prompts(6, seed=3)]
    s = settings(
        redis_url,
        "reload",
        write_jsonl(tmp_path / "p.jsonl", rows),
        student,
        lmbda=1.0,
        temperature=0.0,
        batch_size=1,
        epochs=0,
        high_water=2,
        low_water=1,
    )
    new = perturbed_checkpoint(student, tmp_path / "step-7", seed=0)
    stop, task = running(s)
    await ensure_groups(r, keys)  # the test may read before the producer has started
    teachers = StreamConsumer(r, keys.rollouts, "teacher")
    seen: list[Rollout] = []
    while sum(ro.policy_version == 7 for ro in seen) < 4:
        got = await teachers.read(1, block_ms=5000)
        assert got, "no rollout within 5 s"
        seen += [decode_rollout(e.data) for e in got]
        await teachers.ack(got)
        if len(seen) == 3:
            await publish_policy(r, keys, 7, str(new))
    stop.set()
    summary = await asyncio.wait_for(task, 60)
    versions = [ro.policy_version for ro in seen]
    assert versions[:3] == [0, 0, 0] and versions == sorted(versions) and set(versions) == {0, 7}
    assert summary.versions == [0, 7]
    # Greedy completions come from the weights of the version they carry.
    models = {0: AutoModelForCausalLM.from_pretrained(student), 7: AutoModelForCausalLM.from_pretrained(new)}
    for ro in seen:
        prompt = ro.input_ids[: ro.prompt_len].tolist()
        want = greedy(models[ro.policy_version], prompt, 6, tok.eos_token_id)
        assert ro.input_ids[ro.prompt_len :].tolist() == want
    v7 = [ro for ro in seen if ro.policy_version == 7]
    old = [greedy(models[0], ro.input_ids[: ro.prompt_len].tolist(), 6, tok.eos_token_id) for ro in v7]
    assert old != [ro.input_ids[ro.prompt_len :].tolist() for ro in v7]


@pytest.fixture
async def student_server(student: str) -> AsyncIterator[dict[str, Any]]:
    """A loopback OpenAI-compatible /v1/completions server generating greedily with the tiny student."""
    from transformers import AutoModelForCausalLM

    state: dict[str, Any] = {
        "model": AutoModelForCausalLM.from_pretrained(student),
        "loaded": [],
        "served": [],
    }

    async def completions(req: web.Request) -> web.Response:
        body = await req.json()
        if body.get("model") != "served-student":  # what vLLM does with an id it does not serve
            error = vllm.error_body(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            return web.json_response(error, status=404)
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            ids = await asyncio.to_thread(greedy, state["model"], prompt, body["max_tokens"], 2)
            state["served"].append((prompt, ids))
            choices.append({"index": i, "text": "...", "token_ids": ids, "finish_reason": "stop"})
        return web.json_response({"object": "text_completion", "choices": choices})

    async def update(req: web.Request) -> web.Response:
        path = (await req.json())["model_path"]
        state["model"] = await asyncio.to_thread(AutoModelForCausalLM.from_pretrained, path)
        state["loaded"].append(path)
        return web.json_response({"success": True})

    async def models(req: web.Request) -> web.Response:  # served under another id than --student
        return web.json_response(vllm.models_body("served-student"))

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/update_weights_from_disk", update)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state["url"] = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def test_student_server_generates_and_reloads(
    redis_url: str,
    r: aioredis.Redis,
    tmp_path: Path,
    student: str,
    student_server: dict[str, Any],
    running: Any,
) -> None:
    keys = RunKeys.for_run("server")
    rows = [{"prompt": p} for p in tiny_prompts(4, seed=5)]
    s = settings(
        redis_url,
        "server",
        write_jsonl(tmp_path / "p.jsonl", rows),
        student,
        lmbda=1.0,
        temperature=0.0,
        batch_size=2,
        epochs=0,
        high_water=2,
        low_water=0,
        student_server=student_server["url"],
        student_server_reload="/update_weights_from_disk",
    )
    new = perturbed_checkpoint(student, tmp_path / "step-3", seed=1)
    stop, task = running(s)
    await ensure_groups(r, keys)  # the test may read before the producer has started
    teachers = StreamConsumer(r, keys.rollouts, "teacher")
    seen: list[Rollout] = []
    while sum(ro.policy_version == 3 for ro in seen) < 2:
        got = await teachers.read(2, block_ms=5000)
        assert got, "no rollout within 5 s"
        seen += [decode_rollout(e.data) for e in got]
        await teachers.ack(got)
        if len(seen) >= 2 and not student_server["loaded"]:
            await publish_policy(r, keys, 3, str(new))
    stop.set()
    await asyncio.wait_for(task, 60)
    assert student_server["loaded"] == [str(new)]
    # Rollouts carry exactly the ids the server returned, in the order it served them.
    for ro, (prompt, ids) in zip(seen, student_server["served"], strict=False):
        assert ro.source == "student"
        assert (
            ro.input_ids[: ro.prompt_len].tolist() == prompt and ro.input_ids[ro.prompt_len :].tolist() == ids
        )
    versions = [ro.policy_version for ro in seen]
    assert versions[:2] == [0, 0] and versions == sorted(versions) and versions[-1] == 3
