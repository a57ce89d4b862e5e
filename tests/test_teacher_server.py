"""The reference teacher server (`gkd teacher`): vLLM API shapes and errors, equality with the model run
directly in torch, batching, the official openai client, the TeacherClient, and the real subprocess."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch

from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.local.tiny_models import tiny_models
from pipeline.serve.server import RunningServer, TeacherServerSettings, load, start_server
from pipeline.teacher import TeacherClient, TeacherConfig, binary

K_MAX = 16


@pytest.fixture(scope="module")
def teacher_path() -> Path:
    return tiny_models().teacher


@pytest.fixture(scope="module")
def loaded(teacher_path: Path) -> tuple[Any, Any]:
    return load(TeacherServerSettings(model=str(teacher_path)))


@pytest.fixture
async def server(
    teacher_path: Path, loaded: tuple[Any, Any], request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    extra = getattr(request, "param", {})
    settings = TeacherServerSettings(model=str(teacher_path), port=0, max_logprobs=K_MAX, **extra)
    running = await start_server(settings, *loaded)
    yield running
    await running.stop()


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(trust_env=False, timeout=timeout) as s,
        s.post(url, json=body, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def direct(model: Any, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model run directly: top-k ids/logprobs per position [T, k] and the full log-softmax [T, V]."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        full = torch.log_softmax(logits, dim=-1)
        lp, top = full.topk(k, dim=-1)
    return top.numpy(), lp.numpy(), full.numpy()


def prompts(tok: Any) -> list[list[int]]:
    texts = ["The cat sees the ball today.", "A dog", "My student reads a new book before dinner. The robot"]
    return [tok(t)["input_ids"] for t in texts]


async def test_prompt_logprobs_equal_direct_torch(server: RunningServer, loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    k = 8
    batch = prompts(tok)
    bodies = [{"model": server.server.model_name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": k}
              for ids in batch]  # fmt: skip
    answers = await asyncio.gather(*(post(server.url + "/v1/completions", b) for b in bodies))
    for ids, (status, body) in zip(batch, answers, strict=True):
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == server.server.model_name
        assert body["usage"]["prompt_tokens"] == len(ids)
        choice = body["choices"][0]
        pl = choice["prompt_logprobs"]
        assert len(pl) == len(ids) and pl[0] is None
        top, lp, full = direct(model, ids, k)
        for i in range(1, len(ids)):
            row = pl[i]
            ranked = sorted((e["rank"], int(t), e["logprob"]) for t, e in row.items() if e["rank"] <= k)
            assert [t for _, t, _ in ranked] == top[i - 1].tolist()
            np.testing.assert_allclose([v for _, _, v in ranked], lp[i - 1], atol=1e-5)
            actual = row[str(ids[i])]
            np.testing.assert_allclose(actual["logprob"], full[i - 1, ids[i]], atol=1e-5)
            assert actual["rank"] == int((full[i - 1] > full[i - 1, ids[i]]).sum()) + 1
            assert len(row) == (k if ids[i] in top[i - 1] else k + 1)
        assert choice["text"] == tok.decode([int(full[-1].argmax())]) and choice["logprobs"] is None


@pytest.mark.parametrize("server", [{"max_wait_ms": 300.0}], indirect=True)
async def test_concurrent_requests_share_forward_passes(
    server: RunningServer, loaded: tuple[Any, Any]
) -> None:
    ids = prompts(loaded[1])[0]
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 4}
    answers = await asyncio.gather(*(post(server.url + "/v1/completions", body) for _ in range(8)))
    assert all(status == 200 for status, _ in answers)
    assert server.server.batcher.jobs == 8 and server.server.batcher.batches < 8
    first = answers[0][1]["choices"][0]["prompt_logprobs"]
    assert all(a[1]["choices"][0]["prompt_logprobs"] == first for a in answers)


@pytest.mark.parametrize("use_binary", [True, False])
async def test_client_scores_equal_direct_torch(
    server: RunningServer, loaded: tuple[Any, Any], use_binary: bool
) -> None:
    model, tok = loaded
    config = TeacherConfig(
        [server.url], k=K_MAX, student_tokenizer=str(tiny_models().student), binary=use_binary
    )
    async with TeacherClient(config) as client:
        assert client.backend == "vllm" and client.model_id == server.server.model_name
        assert client.endpoints.endpoints[0].binary is use_binary  # the server advertises the extension
        for ids in prompts(tok):
            prompt_len = max(1, len(ids) // 2)
            got = await client.score(np.asarray(ids, dtype=np.int32), prompt_len)
            top, lp, _ = direct(model, ids, K_MAX)
            # row r is the distribution over token prompt_len + r: the logits at position prompt_len - 1 + r
            np.testing.assert_array_equal(got.ids_RK, top[prompt_len - 1 : -1])
            np.testing.assert_allclose(got.logprobs_RK, lp[prompt_len - 1 : -1], atol=1e-5)


async def test_text_and_batched_prompts(server: RunningServer, loaded: tuple[Any, Any]) -> None:
    tok = loaded[1]
    texts = ["The cat", "A young girl finds"]
    status, body = await post(
        server.url + "/v1/completions", {"prompt": texts, "prompt_logprobs": 2, "logprobs": 3}
    )
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for text, choice in zip(texts, body["choices"], strict=True):
        assert len(choice["prompt_logprobs"]) == len(tok(text)["input_ids"])
        assert len(choice["logprobs"]["top_logprobs"][0]) == 3 and choice["finish_reason"] == "length"
    ids = prompts(tok)[:2]
    status, body = await post(server.url + "/v1/completions", {"prompt": ids, "prompt_logprobs": 1})
    assert status == 200 and [len(c["prompt_logprobs"]) for c in body["choices"]] == [len(x) for x in ids]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"prompt": [1, 2, 3], "prompt_logprobs": K_MAX + 1},
         400, f"Requested prompt logprobs of {K_MAX + 1}, which is greater than max allowed: {K_MAX}"),
        ({"prompt": [1, 2, 3], "logprobs": 99}, 400, "Requested sample logprobs of 99"),
        ({"prompt": [1, 2, 3], "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0."),
        ({"prompt": [1, 2, 100000]}, 400, "Token id 100000 is out of vocabulary"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [1] * 300}, 400, "maximum context length is 256 tokens"),
        ({"prompt": [1, 2], "model": "nope"}, 404, "The model `nope` does not exist."),
        ({"prompt_logprobs": 2}, 400, "prompt"),
    ],
)  # fmt: skip
async def test_vllm_errors(server: RunningServer, body: dict[str, Any], status: int, text: str) -> None:
    got_status, got = await post(server.url + "/v1/completions", body)
    assert got_status == status
    assert text in got["error"]["message"] and got["error"]["code"] == status
    assert got["error"]["type"] in ("BadRequestError", "NotFoundError")


async def test_invalid_json_and_routes(server: RunningServer, loaded: tuple[Any, Any]) -> None:
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.post(server.url + "/v1/completions", data=b"{not json") as resp:
            assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
        async with s.get(server.url + "/health") as resp:
            assert resp.status == 200
        async with s.get(server.url + "/v1/models") as resp:
            models = await resp.json()
        assert (
            models["data"][0]["id"] == server.server.model_name and models["data"][0]["max_model_len"] == 256
        )
        async with s.get(server.url + "/get_model_info") as resp:
            assert resp.status == 404  # so clients do not mistake it for SGLang
    status, tokens = await post(
        server.url + "/tokenize", {"prompt": "The cat sees", "add_special_tokens": False}
    )
    assert (
        status == 200 and tokens["tokens"] == loaded[1]("The cat sees", add_special_tokens=False)["input_ids"]
    )
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    status, text = await post(server.url + "/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == "The cat sees"


@pytest.mark.parametrize("server", [{"api_key": "k3y"}], indirect=True)
async def test_api_key_required_on_v1_routes(server: RunningServer) -> None:
    body = {"prompt": [1, 2, 3], "prompt_logprobs": 1}
    assert (await post(server.url + "/v1/completions", body))[0] == 401
    assert (await post(server.url + "/v1/completions", body, {"Authorization": "Bearer nope"}))[0] == 401
    assert (await post(server.url + "/v1/completions", body, {"Authorization": "Bearer k3y"}))[0] == 200
    async with TeacherClient(TeacherConfig([server.url], k=2, api_key="k3y")) as client:
        assert (await client.score(np.array([1, 2, 3, 4]), 2)).ids_RK.shape == (2, 2)


async def test_openai_client_reads_prompt_logprobs(server: RunningServer, loaded: tuple[Any, Any]) -> None:
    import openai

    try:  # openai >= 3 ships its HTTP client as httpx2; older releases use httpx
        import httpx2 as httpx
    except ImportError:
        import httpx  # type: ignore[no-redef]

    ids = prompts(loaded[1])[0]
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http_client:
        oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", http_client=http_client)
        result = await oai.completions.create(
            model=server.server.model_name, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 3}
        )
    choice = result.choices[0]
    pl = choice.prompt_logprobs  # type: ignore[attr-defined]
    assert len(pl) == len(ids) and pl[0] is None
    assert all(len(row) in (3, 4) for row in pl[1:])
    assert result.usage is not None and result.usage.prompt_tokens == len(ids)


def test_gkd_teacher_subprocess(teacher_path: Path, tmp_path: Path) -> None:
    port = free_port()
    env = env_without_proxy() | {"GKD_API_KEY": "sub-secret-key", "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "teacher.log"
    with open(log_path, "wb") as log:
        argv = ["teacher", "--model", str(teacher_path), "--port", str(port), "--max-logprobs", "8"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *argv],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                import requests

                if requests.get(url + "/health", timeout=2, proxies={"http": "", "https": ""}).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)

        async def score() -> tuple[np.ndarray, str]:
            async with TeacherClient(TeacherConfig([url], k=8, api_key="sub-secret-key")) as client:
                return (await client.score(np.arange(5, 25), 4)).ids_RK, client.model_id

        ids_RK, model_id = asyncio.run(score())
        assert ids_RK.shape == (16, 8) and model_id == str(teacher_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = log_path.read_text()
        assert "sub-secret-key" not in output and "serving" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_binary_extension_is_opt_in(server: RunningServer) -> None:
    ids = list(range(5, 30))
    body = {"prompt": ids, "prompt_logprobs": 4, binary.ROWS_FROM_FIELD: 10}
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=60)) as s:
        headers = {"Accept": binary.MEDIA_TYPE}
        async with s.post(server.url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200 and resp.content_type == binary.MEDIA_TYPE
            ids_RK, lp_RK = binary.parse_response(await resp.read(), len(ids), 10, 4)
        async with s.post(server.url + "/v1/completions", json=body) as resp:  # no Accept: plain JSON
            pl = (await resp.json())["choices"][0]["prompt_logprobs"]
    assert ids_RK.shape == (15, 4)
    for r in range(15):
        row = sorted((e["rank"], int(t), e["logprob"]) for t, e in pl[10 + r].items() if e["rank"] <= 4)
        assert [t for _, t, _ in row] == ids_RK[r].tolist()
        np.testing.assert_allclose([v for _, _, v in row], lp_RK[r], atol=1e-6)
    status, err = await post(server.url + "/v1/completions", {**body, binary.ROWS_FROM_FIELD: 25})
    assert status == 400 and binary.ROWS_FROM_FIELD in err["error"]["message"]


async def test_echo_with_max_tokens_0_scores_the_prompt_like_vllm(
    server: RunningServer, loaded: tuple[Any, Any]
) -> None:
    """lm-eval-harness scores a text with `echo: true, max_tokens: 0, logprobs: n`: vLLM answers 200
    with the prompt as the text and the logprobs of the prompt's own tokens (the first null)."""
    tok = loaded[1]
    ids = prompts(tok)[0]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2}
    status, got = await post(server.url + "/v1/completions", body)
    assert status == 200, got
    choice = got["choices"][0]
    assert choice["text"] == tok.decode(ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    rows = choice["prompt_logprobs"]  # asked implicitly at the width of `logprobs`, like vLLM
    assert len(rows) == len(ids) and all(len(r) in (2, 3) for r in rows[1:])
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == rows[i][str(ids[i])]["logprob"]
        assert 1 <= len(lp["top_logprobs"][i]) <= 3
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    status, err = await post(server.url + "/v1/completions", {"prompt": ids, "max_tokens": 0})
    assert status == 400 and "max_tokens must be at least 1, got 0." in err["error"]["message"]
    status, got = await post(server.url + "/v1/completions", {**body, "max_tokens": 1})
    assert status == 200 and got["choices"][0]["text"].startswith(tok.decode(ids))
    assert len(got["choices"][0]["logprobs"]["tokens"]) == len(ids) + 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_exits_2_naming_the_install(teacher_path: Path) -> None:
    argv = ["teacher", "--engine", "vllm", "--model", str(teacher_path), "--port", str(free_port())]
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv], env=env_without_proxy(), capture_output=True, text=True,
        cwd=Path(__file__).resolve().parents[1], timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'gkd-pipeline[vllm]'" in proc.stderr and "Traceback" not in proc.stderr
