"""TeacherClient against scripted loopback teachers (tests/teacher_fakes.py): formats, faults, retries,
failover, circuit breakers, balancing, start-up checks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from pipeline.errors import (
    MalformedResponse,
    TeacherBadRequest,
    TeacherConnectionError,
    TeacherServerError,
    WireFormatError,
)
from pipeline.local.redis_server import free_port
from pipeline.teacher import TeacherClient, TeacherConfig, TeacherIncompatible
from tests.teacher_fakes import FakeTeacher

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "request_timeout_s": 5.0}
IDS = np.arange(3, 40, dtype=np.int32) % 64


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeTeacher] = []

    async def make(**kw: Any) -> FakeTeacher:
        fake = await FakeTeacher(**kw).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.seen.append((name, data))

    def names(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.seen if n == name]


def client(urls: list[str], events: Events | None = None, **kw: Any) -> TeacherClient:
    return TeacherClient(TeacherConfig(endpoints=urls, **{**FAST, **kw}), on_event=events)


def assert_scores(fake: FakeTeacher, got: Any, ids: np.ndarray, prompt_len: int, k: int) -> None:
    want_ids, want_lp = fake.expected(ids, prompt_len, k)
    finite = np.isfinite(want_lp)
    np.testing.assert_array_equal(np.isfinite(got.logprobs_RK), finite)
    np.testing.assert_allclose(got.logprobs_RK[finite], want_lp[finite], atol=1e-6)
    np.testing.assert_array_equal(got.ids_RK[finite], want_ids[finite])  # ties among -inf may reorder


@pytest.mark.parametrize("k", [4, 20, 63])
async def test_vllm_scores_match_the_teacher(fakes: Any, k: int) -> None:
    fake = await fakes(k_max=64)
    async with client([fake.url], k=k) as c:
        assert c.backend == "vllm" and c.model_id == "fake-teacher"
        got = await c.score(IDS, 5)
        assert got.ids_RK.shape == (len(IDS) - 5, k) and got.attempts == 1 and got.endpoint == fake.url
        assert_scores(fake, got, IDS, 5, k)
        if k == 63:  # -9999.0 rows were sent and came back as -inf
            assert np.isneginf(got.logprobs_RK).any()
    body = fake.requests[-1]["body"]
    assert body["prompt"] == IDS.tolist() and body["prompt_logprobs"] == k and body["max_tokens"] == 1


@pytest.mark.parametrize("flat", [True, False])
async def test_sglang_autodetected_nested_and_flat(fakes: Any, flat: bool) -> None:
    fake = await fakes(backend="sglang", sglang_flat=flat)
    async with client([fake.url], k=6) as c:
        assert c.backend == "sglang" and c.model_id == "fake-teacher"
        for prompt_len in (1, 9):
            got = await c.score(IDS, prompt_len)
            assert_scores(fake, got, IDS, prompt_len, 6)
    assert fake.requests[-1]["path"] == "/generate"


async def test_api_key_sent_as_bearer(fakes: Any) -> None:
    fake = await fakes(api_key="s3cret")
    async with client([fake.url], api_key="s3cret", k=3) as c:
        await c.score(IDS, 2)
    scoring = [r for r in fake.requests if r["path"] == "/v1/completions"]
    assert scoring and all(r["headers"]["Authorization"] == "Bearer s3cret" for r in scoring)
    with pytest.raises(TeacherBadRequest, match=r"401.*Unauthorized.*api-key"):
        await client([fake.url], api_key="wrong", k=3).__aenter__()


async def test_k_above_server_max_names_max_logprobs(fakes: Any) -> None:
    fake = await fakes(k_max=20)
    c = client([fake.url], k=30)
    with pytest.raises(TeacherBadRequest) as info:
        await c.start()
    await c.close()
    msg = str(info.value)
    assert "greater than max allowed: 20" in msg and "--max-logprobs" in msg and "30" in msg


@pytest.mark.parametrize("fault", ["500", "503", "429", "truncated", "disconnect"])
async def test_retryable_faults_are_retried(fakes: Any, fault: str) -> None:
    fake = await fakes()
    events = Events()
    async with client([fake.url], events, k=4) as c:
        fake.script(fault, fault)
        got = await c.score(IDS, 3)
    assert got.attempts == 3
    assert_scores(fake, got, IDS, 3, 4)
    assert len(events.names("retry")) == 2


async def test_slow_response_times_out_and_is_retried(fakes: Any) -> None:
    fake = await fakes(slow_s=3.0)
    events = Events()
    async with client([fake.url], events, k=4, request_timeout_s=0.3) as c:
        fake.script("slow")
        got = await c.score(IDS, 3)
    assert got.attempts == 2
    assert [e["error"] for e in events.names("retry")] == ["TeacherTimeout"]


async def test_500s_fail_over_to_the_second_endpoint(fakes: Any) -> None:
    bad, good = await fakes(), await fakes()
    async with client([bad.url, good.url], k=4, breaker_failures=100) as c:
        bad.mode = "500"
        results = [await c.score(IDS, 3) for _ in range(6)]
    assert all(r.endpoint == good.url for r in results)
    assert bad.scored >= 1  # some requests went to the bad one first and then failed over
    assert {r.attempts for r in results} <= {1, 2}


async def test_retries_exhausted_raise_the_retryable_error(fakes: Any) -> None:
    fake = await fakes()
    events = Events()
    async with client([fake.url], events, k=4, max_retries=2, breaker_failures=100) as c:
        fake.mode = "500"
        before = fake.scored  # start() probed once
        with pytest.raises(TeacherServerError, match="HTTP 500"):
            await c.score(IDS, 3)
    assert fake.scored - before == 3
    assert len(events.names("retry")) == 2 and events.names("error")[-1]["error"] == "TeacherServerError"


@pytest.mark.parametrize("backend", ["vllm", "sglang-flat", "sglang-nested"])
@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("truncated_json", "expected a JSON body"),
        ("malformed", "expected a JSON body"),
        ("wrong_rows", "rows"),
        ("nan", "NaN"),
        ("positive", "expected logprobs <= 0"),
        ("raw_logits", "raw"),
        ("unnormalized", "logsumexp"),
    ],
)
async def test_malformed_answers_are_permanent(fakes: Any, backend: str, fault: str, match: str) -> None:
    fake = await fakes(backend=backend.split("-")[0], sglang_flat=backend.endswith("flat"))
    async with client([fake.url], k=5) as c:
        fake.script(fault)
        scored_before = fake.scored
        with pytest.raises(MalformedResponse, match=match):
            await c.score(IDS, 4)
        assert fake.scored == scored_before + 1  # not retried
        assert (await c.score(IDS, 4)).attempts == 1  # the endpoint is still in use


@pytest.mark.parametrize("fault", ["bad_request", "bad_request_flat"])
async def test_bad_request_in_both_error_schemas(fakes: Any, fault: str) -> None:
    fake = await fakes()
    async with client([fake.url], k=4) as c:
        fake.script(fault)
        with pytest.raises(TeacherBadRequest, match="HTTP 400: fake bad request"):
            await c.score(IDS, 3)


async def test_circuit_breaker_opens_and_reprobes(fakes: Any, caplog: pytest.LogCaptureFixture) -> None:
    bad, good = await fakes(), await fakes()
    events = Events()
    caplog.set_level(logging.INFO, "gkd.teacher")
    async with client([bad.url, good.url], events, k=4, breaker_failures=2, breaker_reset_s=0.3) as c:
        bad.mode = "500"
        bad.scored = 0  # forget start()'s probe
        for _ in range(10):
            assert (await c.score(IDS, 3)).endpoint == good.url
        assert bad.scored == 2  # then the breaker kept requests away
        assert [e["endpoint"] for e in events.names("breaker_open")] == [bad.url]
        await asyncio.sleep(0.4)  # half-open: one probe goes through, fails, the breaker opens again
        for _ in range(4):
            await c.score(IDS, 3)
        assert bad.scored == 3
        bad.mode = "ok"
        await asyncio.sleep(0.4)
        for _ in range(6):
            await c.score(IDS, 3)
        assert bad.scored > 4  # the probe succeeded and the endpoint is back in rotation
    # one line when the outage starts and one when it ends (with its counts), not one per failed probe
    breaker_lines = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert len(breaker_lines) == 2, breaker_lines
    assert "open after 2 consecutive failures" in breaker_lines[0]
    assert "closed after" in breaker_lines[1] and "(1 failed probes, 3 failures in all)" in breaker_lines[1]
    assert [e["endpoint"] for e in events.names("breaker_open")] == [bad.url]
    assert [e["endpoint"] for e in events.names("breaker_closed")] == [bad.url]


async def test_all_breakers_open_fails_after_retries(fakes: Any) -> None:
    fake = await fakes()
    async with client([fake.url], k=4, breaker_failures=1, breaker_reset_s=30, max_retries=2) as c:
        fake.mode = "500"
        fake.scored = 0
        with pytest.raises(TeacherConnectionError, match=r"circuit breaker is open.*HTTP 500"):
            await c.score(IDS, 3)
        with pytest.raises(TeacherConnectionError, match="circuit breaker is open"):
            await c.score(IDS, 3)
    assert fake.scored == 1


async def test_least_outstanding_spreads_load_and_concurrency_is_bounded(fakes: Any) -> None:
    a, b = await fakes(delay_s=0.1), await fakes(delay_s=0.1)
    async with client([a.url, b.url], k=4, per_endpoint_concurrency=3) as c:
        tasks = [asyncio.create_task(c.score(IDS, 3)) for _ in range(20)]
        await asyncio.sleep(0)
        assert c.in_flight() == 20
        results = await asyncio.gather(*tasks)
        assert c.in_flight() == 0
    assert sum(r.endpoint == a.url for r in results) == 10
    assert a.max_inflight <= 3 and b.max_inflight <= 3


async def test_start_with_one_endpoint_down(fakes: Any) -> None:
    fake = await fakes()
    down = f"http://127.0.0.1:{free_port()}"
    events = Events()
    async with client([down, fake.url], events, k=4) as c:
        assert (await c.score(IDS, 3)).endpoint == fake.url
    assert events.names("breaker_open") == [{"endpoint": down}]
    with pytest.raises(TeacherConnectionError, match="expected at least one teacher endpoint"):
        await client([down], k=4).__aenter__()


async def test_model_checks(fakes: Any) -> None:
    fake = await fakes()
    async with client([fake.url], k=4, model="fake-teacher") as c:
        assert c.model_id == "fake-teacher"
    c = client([fake.url], k=4, model="other-model")
    with pytest.raises(TeacherIncompatible, match="other-model"):
        await c.start()
    await c.close()


async def test_tokenizer_mismatch_refuses_to_start(fakes: Any) -> None:
    from pipeline.local.tiny_models import tiny_models

    fake = await fakes()  # tokenizes bytes, unlike the tiny student
    c = client([fake.url], k=4, student_tokenizer=str(tiny_models().student))
    with pytest.raises(TeacherIncompatible, match="expected identical ids"):
        await c.start()
    await c.close()


async def test_bad_prompt_len_and_events(fakes: Any) -> None:
    fake = await fakes()
    events = Events()
    async with client([fake.url], events, k=4) as c:
        with pytest.raises(WireFormatError, match="prompt_len"):
            await c.score(IDS, len(IDS))
        await c.score(IDS, 1)
    assert events.names("request")[-1]["ok"] is True and events.names("request")[-1]["endpoint"] == fake.url


async def test_rollout_longer_than_max_model_len_fails_before_any_request(fakes: Any) -> None:
    """vLLM refuses T = max_model_len with a confusing "max_tokens must be at least 1, got 0": the
    client reads max_model_len from /v1/models and names the limit and the fix instead."""
    fake = await fakes(max_model_len=10)
    async with client([fake.url], k=4) as c:
        assert c.max_tokens == 9
        assert (await c.score(np.arange(9), 3)).ids_RK.shape == (6, 4)
        sent = fake.scored
        with pytest.raises(TeacherBadRequest, match=r"T=10 tokens .* max_model_len - 1 = 9.* >= 11"):
            await c.score(np.arange(10), 3)
        assert fake.scored == sent
