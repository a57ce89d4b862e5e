"""Parsing of teacher bodies (vLLM prompt_logprobs, SGLang nested and flat/base64) and error bodies."""

from __future__ import annotations

import base64
import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import MalformedResponse, TeacherBadRequest, TeacherOverloaded, TeacherServerError
from pipeline.teacher import binary, http, protocol, sglang, vllm


def make_topk(T: int, k: int, V: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [T, k], logprobs [T, k] sorted descending and normalized, actual ids [T])."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (T, V))
    lp_full = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp_full, axis=1, kind="stable")[:, :k]
    lp = np.take_along_axis(lp_full, ids, axis=1)
    actual = np.where(rng.random(T) < 0.4, ids[:, rng.integers(0, k)], rng.integers(0, V, T))
    return ids, lp, actual


def vllm_rows(raw: bytes) -> list:
    return orjson.loads(raw)["choices"][0]["prompt_logprobs"]


def with_rows(raw: bytes, rows: list) -> bytes:
    doc = orjson.loads(raw)
    doc["choices"][0]["prompt_logprobs"] = rows
    return json.dumps(doc).encode()


@pytest.mark.parametrize("prompt_len", [1, 3, 11])
def test_vllm_round_trip_with_extra_entries_and_shuffled_keys(prompt_len: int) -> None:
    T, k = 12, 5
    ids, lp, actual = make_topk(T, k)
    raw = vllm.render_prompt_logprobs_body(ids, lp, actual, shuffle_seed=7)
    rows = vllm_rows(raw)
    assert rows[0] is None and len(rows) == T
    assert {len(r) for r in rows[1:]} == {k, k + 1}  # both shapes are present in this vector
    got_ids, got_lp = vllm.parse_response(raw, T, prompt_len, k)
    assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32
    assert got_ids.shape == (T - prompt_len, k)
    np.testing.assert_array_equal(got_ids, ids[prompt_len:])
    np.testing.assert_allclose(got_lp, lp[prompt_len:], rtol=0, atol=1e-6)


def test_vllm_actual_token_first_like_the_real_server() -> None:
    """vLLM puts the actual token first, then the top-k by rank; the order must not matter."""
    row = {"7": {"logprob": -9.0, "rank": 40, "decoded_token": "x"}}
    row.update({str(i): {"logprob": -1.0 * (i + 1), "rank": i + 1, "decoded_token": "t"} for i in range(3)})
    body = {"choices": [{"prompt_logprobs": [None, row]}]}
    got_ids, got_lp = vllm.parse_response(orjson.dumps(body), 2, 1, 3)
    assert got_ids.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(got_lp, [[-1.0, -2.0, -3.0]])


def test_vllm_extra_entry_that_belongs_to_the_top_k_is_kept() -> None:
    """With k+1 entries the k best by logprob are kept, whichever entry is the 'extra' one."""
    row = {
        "1": {"logprob": -1.0, "rank": 1},
        "2": {"logprob": -3.0, "rank": 2},
        "9": {"logprob": -2.0, "rank": 3},
    }
    got_ids, _ = vllm.parse_response(orjson.dumps({"choices": [{"prompt_logprobs": [None, row]}]}), 2, 1, 2)
    assert got_ids.tolist() == [[1, 9]]


def test_vllm_minus_9999_is_minus_inf() -> None:
    T, k = 6, 4
    ids, lp, actual = make_topk(T, k)
    lp[3, 2:] = -np.inf
    raw = vllm.render_prompt_logprobs_body(ids, lp, actual)
    assert b"-9999.0" in raw
    _, got_lp = vllm.parse_response(raw, T, 1, k)
    assert np.isneginf(got_lp[2, 2:]).all() and np.isfinite(got_lp[2, :2]).all()


def test_vllm_row_count_must_match_the_prompt() -> None:
    ids, lp, actual = make_topk(8, 3)
    raw = vllm.render_prompt_logprobs_body(ids, lp, actual)
    with pytest.raises(MalformedResponse, match="expected 9 rows"):
        vllm.parse_response(raw, 9, 2, 3)


@pytest.mark.parametrize(
    ("value", "match"),
    [(float("nan"), "NaN"), (0.5, "expected logprobs <= 0"), (3.0, "raw logits")],
)
def test_vllm_bad_numbers_are_malformed(value: float, match: str) -> None:
    ids, lp, actual = make_topk(8, 3)
    rows = vllm_rows(vllm.render_prompt_logprobs_body(ids, lp, actual))
    next(iter(rows[5].values()))["logprob"] = value
    raw = with_rows(vllm.render_prompt_logprobs_body(ids, lp, actual), rows)
    with pytest.raises(MalformedResponse, match=match) as info:
        vllm.parse_response(raw, 8, 2, 3)
    assert "row 5" in str(info.value)


def test_vllm_tiny_positive_noise_is_clamped() -> None:
    row = {"1": {"logprob": 5e-5, "rank": 1}, "2": {"logprob": -12.0, "rank": 2}}
    _, got_lp = vllm.parse_response(orjson.dumps({"choices": [{"prompt_logprobs": [None, row]}]}), 2, 1, 2)
    assert got_lp[0, 0] == 0.0


def test_vllm_raw_logits_detected_by_logsumexp() -> None:
    """All entries negative but summing above probability 1: not logprobs (--logprobs-mode raw_logits)."""
    row = {str(i): {"logprob": float(np.log(0.3)), "rank": i + 1} for i in range(5)}
    with pytest.raises(MalformedResponse, match="logsumexp"):
        vllm.parse_response(orjson.dumps({"choices": [{"prompt_logprobs": [None, row]}]}), 2, 1, 5)


def test_vllm_short_and_null_rows_are_malformed() -> None:
    ids, lp, actual = make_topk(6, 4)
    rows = vllm_rows(vllm.render_prompt_logprobs_body(ids, lp, actual))
    short = [None, *rows[1:3], dict(list(rows[3].items())[:2]), *rows[4:]]
    with pytest.raises(MalformedResponse, match="at least k=4 entries"):
        vllm.parse_response(with_rows(b'{"choices":[{}]}', short), 6, 1, 4)
    nulled = [None, *rows[1:3], None, *rows[4:]]
    with pytest.raises(MalformedResponse, match="row 3"):
        vllm.parse_response(with_rows(b'{"choices":[{}]}', nulled), 6, 1, 4)
    # a null row before prompt_len is never looked at
    ids_got, _ = vllm.parse_response(with_rows(b'{"choices":[{}]}', nulled), 6, 4, 4)
    assert ids_got.shape == (2, 4)


@pytest.mark.parametrize(
    "raw", [b'{"choices": [{"prompt_logprobs": [null, {"1": {"logp', b"<html>502</html>", b""]
)
def test_vllm_truncated_or_not_json(raw: bytes) -> None:
    with pytest.raises(MalformedResponse, match="expected a JSON body"):
        vllm.parse_response(raw, 2, 1, 1)


def test_vllm_body_without_prompt_logprobs() -> None:
    with pytest.raises(MalformedResponse, match="prompt_logprobs to be a list"):
        vllm.parse_response(b'{"choices": [{"text": "x", "prompt_logprobs": null}]}', 2, 1, 1)
    with pytest.raises(MalformedResponse, match="choices"):
        vllm.parse_response(b'{"object": "error"}', 2, 1, 1)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 40), k=st.integers(1, 12), seed=st.integers(0, 10_000), data=st.data())
def test_vllm_property_round_trip(T: int, k: int, seed: int, data: st.DataObject) -> None:
    prompt_len = data.draw(st.integers(1, T - 1))
    ids, lp, actual = make_topk(T, k, V=64, seed=seed)
    raw = vllm.render_prompt_logprobs_body(ids, lp, actual, shuffle_seed=seed, decoded=seed % 2 == 0)
    got_ids, got_lp = vllm.parse_response(raw, T, prompt_len, k)
    np.testing.assert_array_equal(got_ids, ids[prompt_len:])
    np.testing.assert_allclose(got_lp, lp[prompt_len:], atol=1e-6)
    assert (np.diff(got_lp, axis=1) <= 0).all()


# ------------------------------------------------------------------------------------------------ SGLang


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("prompt_len", [1, 4])
def test_sglang_round_trip(flat: bool, prompt_len: int) -> None:
    T, k = 9, 4
    ids, lp, _ = make_topk(T, k)
    lp[-1, -1] = -np.inf  # nested form sends it as null (orjson), flat as a float32 -inf
    raw = sglang.render_generate_body(ids, lp, prompt_len, flat=flat)
    got_ids, got_lp = sglang.parse_response(raw, T, prompt_len, k)
    np.testing.assert_array_equal(got_ids, ids[prompt_len:])
    np.testing.assert_allclose(got_lp, lp[prompt_len:].astype(np.float32), atol=1e-6)


def test_sglang_request_asks_for_rows_from_prompt_len_minus_one() -> None:
    body = sglang.build_request([5, 6, 7, 8], 3, 20, flat=True)
    assert body["logprob_start_len"] == 2 and body["top_logprobs_num"] == 20 and body["return_logprob"]
    assert body["return_flat_raw_top_logprobs"] and body["return_flat_raw_top_logprobs_b64"]
    assert body["sampling_params"]["max_new_tokens"] == 1


def test_sglang_nested_alignment_starts_at_logprob_start_len() -> None:
    """input_top_logprobs[j] is the distribution over token logprob_start_len + j; entry 0 is null."""
    T, P = 6, 3
    rows = [None] + [[[-0.1 * (j + 1), 100 + j, None], [-5.0, 1, None]] for j in range(1, T - P + 1)]
    raw = orjson.dumps({"text": "", "meta_info": {"input_top_logprobs": rows}})
    got_ids, _ = sglang.parse_response(raw, T, P, 2)
    assert got_ids[:, 0].tolist() == [101, 102, 103]  # tokens 3, 4, 5
    older = orjson.dumps({"meta_info": {"input_top_logprobs": rows[1:]}})  # no null pad (older SGLang)
    assert sglang.parse_response(older, T, P, 2)[0][:, 0].tolist() == [101, 102, 103]
    with pytest.raises(MalformedResponse, match="expected 4 rows"):
        sglang.parse_response(orjson.dumps({"meta_info": {"input_top_logprobs": [*rows, rows[-1]]}}), T, P, 2)


def test_sglang_flat_errors() -> None:
    T, P, k = 7, 2, 3
    ids, lp, _ = make_topk(T, k)
    doc = sglang.build_generate_body(ids, lp, P, flat=True)
    doc["meta_info"]["input_top_logprobs_shape"] = [T - P, k]
    with pytest.raises(MalformedResponse, match="expected 6 rows"):
        sglang.parse_response(orjson.dumps(doc), T, P, k)
    doc = sglang.build_generate_body(ids, lp, P, flat=True)
    doc["meta_info"]["input_top_logprobs_val_flat_b64"] = "not base64!"
    with pytest.raises(MalformedResponse, match="base64"):
        sglang.parse_response(orjson.dumps(doc), T, P, k)
    doc = sglang.build_generate_body(ids, lp, P, flat=True)
    val = np.frombuffer(base64.b64decode(doc["meta_info"]["input_top_logprobs_val_flat_b64"]), "<f4").copy()
    val[4] = np.nan
    doc["meta_info"]["input_top_logprobs_val_flat_b64"] = base64.b64encode(val.tobytes()).decode()
    with pytest.raises(MalformedResponse, match="NaN in row 3"):
        sglang.parse_response(orjson.dumps(doc), T, P, k)


def test_sglang_body_without_logprobs() -> None:
    with pytest.raises(MalformedResponse, match="return_logprob"):
        sglang.parse_response(b'{"text": "x", "meta_info": {"id": "1"}}', 3, 1, 2)


# ----------------------------------------------------------------------------------------- error bodies


@pytest.mark.parametrize(
    "raw",
    [
        b'{"error": {"message": "Requested prompt logprobs of 30, which is greater than max allowed: 20",'
        b' "type": "BadRequestError", "param": null, "code": 400}}',
        b'{"object": "error", "message": "Requested prompt logprobs of 30, which is greater than max allowed:'
        b' 20",'
        b' "type": "BadRequestError", "param": null, "code": 400}',
    ],
)
def test_both_vllm_error_schemas(raw: bytes) -> None:
    err = http.error_for_status(400, raw, "http://t")
    assert isinstance(err, TeacherBadRequest)
    assert "greater than max allowed: 20" in str(err) and http.status_of(err) == 400


def test_status_classes_and_other_bodies() -> None:
    assert isinstance(http.error_for_status(429, b"{}", "u"), TeacherOverloaded)
    assert isinstance(http.error_for_status(503, b"upstream down", "u"), TeacherServerError)
    assert "upstream down" in str(http.error_for_status(503, b"upstream down", "u"))
    assert http.server_message(b'{"error": "Unauthorized"}') == "Unauthorized"
    assert http.server_message(b'{"detail": "Not Found"}') == "Not Found"


def test_binary_round_trip_and_errors() -> None:
    ids, lp, _ = make_topk(9, 4)
    lp[-1, -1] = -np.inf
    raw = binary.render(ids[3:], lp[3:], "m")
    got_ids, got_lp = binary.parse_response(raw, 9, 3, 4)
    np.testing.assert_array_equal(got_ids, ids[3:])
    np.testing.assert_allclose(got_lp, lp[3:].astype(np.float32))
    with pytest.raises(MalformedResponse, match=r"expected \[5, 4\] arrays"):
        binary.parse_response(raw, 9, 4, 4)
    with pytest.raises(MalformedResponse, match="binary top-k"):
        binary.parse_response(raw[:-3], 9, 3, 4)
    bad = lp[3:].copy()
    bad[0, 0] = 0.7
    with pytest.raises(MalformedResponse, match="expected logprobs <= 0"):
        binary.parse_response(binary.render(ids[3:], bad, "m"), 9, 3, 4)
    assert binary.advertised({"data": [{"id": "m", binary.ADVERT_FIELD: binary.MEDIA_TYPE}]})
    assert not binary.advertised({"data": [{"id": "m"}]}) and not binary.advertised([])


@pytest.mark.parametrize("name", ["vllm", "sglang"])
def test_protocol_objects_build_and_parse_their_own_bodies(name: str) -> None:
    """The client picks a protocol object by name; its request asks for k, and its parser reads what the
    same module renders for servers and test doubles."""
    proto = protocol.select(name)
    ids, lp, actual = make_topk(8, 3)
    body = proto.request(actual.tolist(), 3, 3, "m")
    assert body.get("prompt_logprobs", body.get("top_logprobs_num")) == 3
    if name == "vllm":
        raw = vllm.render_prompt_logprobs_body(ids, lp, actual)
    else:
        raw = sglang.render_generate_body(ids, lp, 3)
    got_ids, got_lp = proto.parse(raw, 8, 3, 3)
    np.testing.assert_array_equal(got_ids, ids[3:])
    np.testing.assert_allclose(got_lp, lp[3:], atol=1e-6)
    with pytest.raises(ValueError, match="expected one of"):
        protocol.select("openai")
