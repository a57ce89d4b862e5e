"""The sampled teacher (RS-KD) on the reference server: draws per position with counts and the teacher's
exact log-probabilities (compared with the model run directly in torch), seeded, opt-in and advertised;
the TeacherClient in sampled mode; refusals (too many draws, no rows, bad seed, a teacher without it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch

from pipeline.errors import MalformedResponse, TeacherIncompatible
from pipeline.local.tiny_models import tiny_models
from pipeline.serve.server import RunningServer, TeacherServerSettings, load, start_server
from pipeline.teacher import TeacherClient, TeacherConfig, binary, sampled

N = 16


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    return load(TeacherServerSettings(model=str(tiny_models().teacher)))


@pytest.fixture
async def server(loaded: tuple[Any, Any], request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    extra = getattr(request, "param", {})
    settings = TeacherServerSettings(
        model=str(tiny_models().teacher), port=0, **{"max_samples": 256, **extra}
    )
    running = await start_server(settings, *loaded)
    yield running
    await running.stop()


def full_logprobs(model: Any, ids: list[int]) -> np.ndarray:
    """[T, V] log-softmax of the model run directly; row p is the distribution over token p + 1."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1).numpy()


async def ask(
    server: RunningServer, ids: list[int], rows_from: int, n: int, seed: Any = 0
) -> tuple[int, Any]:
    body = {"prompt": ids, "prompt_logprobs": 1, binary.ROWS_FROM_FIELD: rows_from, sampled.SAMPLES_FIELD: n}
    body[sampled.SEED_FIELD] = seed
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as s:
        headers = {"Accept": sampled.MEDIA_TYPE}
        async with s.post(server.url + "/v1/completions", json=body, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return resp.status, await resp.json(content_type=None)
            assert resp.content_type == sampled.MEDIA_TYPE
            return 200, sampled.parse_response(raw, len(ids), rows_from, n)


def prompt(tok: Any) -> list[int]:
    return tok("My student reads a new book before dinner. The robot sees the ball")["input_ids"]


async def test_draws_carry_counts_and_the_teachers_exact_logprobs(
    server: RunningServer, loaded: tuple[Any, Any]
) -> None:
    model, tok = loaded
    ids, rows_from = prompt(tok), 4
    status, (ids_RN, lp_RN, counts_RN) = await ask(server, ids, rows_from, N, seed=7)
    assert status == 200
    R, vocab = len(ids) - rows_from, int(model.config.vocab_size)
    assert ids_RN.shape == counts_RN.shape == (R, N)
    assert (counts_RN.sum(1) == N).all()  # n draws per position
    full = full_logprobs(model, ids)
    for r in range(R):
        drawn = counts_RN[r] > 0
        assert drawn[: drawn.sum()].all() and not drawn[drawn.sum() :].any()  # drawn first, then padding
        row_ids = ids_RN[r, drawn]
        assert len(set(row_ids.tolist())) == row_ids.size and ((row_ids >= 0) & (row_ids < vocab)).all()
        # row r is the distribution over token rows_from + r: the logits at position rows_from - 1 + r
        np.testing.assert_allclose(lp_RN[r, drawn], full[rows_from - 1 + r, row_ids], atol=1e-5)
        assert (np.diff(lp_RN[r, drawn]) <= 0).all()  # sorted by logprob, descending
        assert np.isneginf(lp_RN[r, ~drawn]).all()
    # Seeded: the same seed gives the same draws, another seed other draws.
    _, again = await ask(server, ids, rows_from, N, seed=7)
    _, other = await ask(server, ids, rows_from, N, seed=8)
    for a, b in zip((ids_RN, lp_RN, counts_RN), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (np.array_equal(other[0], ids_RN) and np.array_equal(other[2], counts_RN))


async def test_draws_follow_the_teachers_distribution(server: RunningServer, loaded: tuple[Any, Any]) -> None:
    """256 draws per position: the share of every likely token is its teacher probability within 5 sigma."""
    model, tok = loaded
    ids = prompt(tok)
    n = 256
    status, (ids_RN, _, counts_RN) = await ask(server, ids, 1, n, seed=3)
    assert status == 200
    full = np.exp(full_logprobs(model, ids).astype(np.float64))
    checked = 0
    for r in range(len(ids) - 1):
        share = np.zeros(full.shape[1])
        share[ids_RN[r]] += counts_RN[r] / n  # padding adds 0
        likely = np.flatnonzero(full[r] > 0.05)  # every token of probability > 5 %, drawn or not
        p = full[r, likely]
        sigma = np.sqrt(p * (1 - p) / n)
        assert (np.abs(share[likely] - p) <= 5 * sigma).all(), (r, share[likely], p)
        checked += likely.size
    assert checked >= len(ids) - 1


async def test_models_card_advertises_and_requests_are_validated(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession(trust_env=False) as s,
        s.get(server.url + "/v1/models") as resp,
    ):
        assert sampled.max_samples(await resp.json()) == 256
    ids = list(range(5, 30))
    for n, rows_from, seed, param in [
        (257, 4, 0, sampled.SAMPLES_FIELD),
        (0, 4, 0, sampled.SAMPLES_FIELD),
        (8, 4, -1, sampled.SEED_FIELD),
        (8, 4, "1", sampled.SEED_FIELD),
    ]:
        status, err = await ask(server, ids, rows_from, n, seed)
        assert status == 400 and err["error"]["param"] == param, err
        assert "expected an int" in err["error"]["message"]


@pytest.mark.parametrize("server", [{"max_samples": 0}], indirect=True)
async def test_a_server_without_draws_refuses_and_a_sampled_client_refuses_it(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession(trust_env=False) as s,
        s.get(server.url + "/v1/models") as resp,
    ):
        assert sampled.max_samples(await resp.json()) == 0  # not advertised
    status, err = await ask(server, list(range(5, 30)), 4, 8)
    assert status == 400 and "top-k prompt logprobs only" in err["error"]["message"]
    with pytest.raises(TeacherIncompatible, match="cannot draw 8 samples per position"):
        async with TeacherClient(TeacherConfig([server.url], k=8, sampled=True)):
            pass


async def test_client_in_sampled_mode(server: RunningServer, loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    ids = prompt(tok)
    async with TeacherClient(TeacherConfig([server.url], k=N, sampled=True)) as client:
        assert client.endpoints.endpoints[0].max_samples == 256
        got = await client.score(np.asarray(ids, dtype=np.int32), 5, seed=11)
        again = await client.score(np.asarray(ids, dtype=np.int32), 5, seed=11)
    assert got.counts_RK is not None and again.counts_RK is not None
    np.testing.assert_array_equal(got.counts_RK, again.counts_RK)
    np.testing.assert_array_equal(got.ids_RK, again.ids_RK)
    assert (got.counts_RK.sum(1) == N).all() and got.ids_RK.shape == (len(ids) - 5, N)
    full = full_logprobs(model, ids)
    for r in range(len(ids) - 5):
        live = got.counts_RK[r] > 0
        np.testing.assert_allclose(got.logprobs_RK[r, live], full[4 + r, got.ids_RK[r, live]], atol=1e-5)
    # A top-k client of the same server gets no counts.
    async with TeacherClient(TeacherConfig([server.url], k=4)) as client:
        assert (await client.score(np.asarray(ids, dtype=np.int32), 5)).counts_RK is None


def test_parse_refuses_invalid_draws() -> None:
    ids_RN = np.array([[3, 5, 0], [2, 0, 0]], dtype=np.int32)
    counts_RN = np.array([[2, 1, 0], [3, 0, 0]], dtype=np.int32)
    lp_RN = np.array([[-0.5, -1.5, 0.0], [-0.1, 0.0, 0.0]], dtype=np.float32)
    good = sampled.render(ids_RN, counts_RN, lp_RN, "m")
    _, lp, counts = sampled.parse_response(good, 5, 3, 3)
    assert np.isneginf(lp[1, 1:]).all() and (counts == counts_RN).all()
    cases: list[tuple[Any, Any, Any, str]] = [
        (ids_RN, [[2, 2, 0], [3, 0, 0]], lp_RN, "expected 3 draws"),
        (ids_RN, [[2, 0, 1], [3, 0, 0]], lp_RN, "drawn entries first"),
        ([[3, 3, 0], [2, 0, 0]], counts_RN, lp_RN, "distinct drawn ids"),
        (ids_RN, counts_RN, [[2.0, 1.0, 0.0], [-0.1, 0.0, 0.0]], "logprobs <= 0"),
        (ids_RN, counts_RN, [[-0.1, -0.2, 0.0], [-0.1, 0.0, 0.0]], "sum to at most 1"),
        (ids_RN, counts_RN, [[np.nan, -0.2, 0.0], [-0.1, 0.0, 0.0]], "finite"),
    ]
    for ids_, counts_, lp_, text in cases:
        body = sampled.render(np.asarray(ids_), np.asarray(counts_), np.asarray(lp_, dtype=np.float32), "m")
        with pytest.raises(MalformedResponse, match=text):
            sampled.parse_response(body, 5, 3, 3)
    with pytest.raises(MalformedResponse, match=r"expected \[2, 4\] arrays"):
        sampled.parse_response(good, 5, 3, 4)


def test_draw_seed_is_a_function_of_the_rollout_id() -> None:
    seeds = [sampled.draw_seed(f"r-{i}") for i in range(1000)]
    assert seeds == [sampled.draw_seed(f"r-{i}") for i in range(1000)]  # every process, every run
    assert len(set(seeds)) == 1000 and all(0 <= s < sampled.SEED_LIMIT for s in seeds)
