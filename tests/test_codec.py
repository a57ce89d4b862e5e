"""The wire format (ARCHITECTURE.md): round trips, zero-copy decode, an error naming the bad field."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from pipeline.errors import PermanentError, WireFormatError
from pipeline.wire.codec import (
    Limits,
    Rollout,
    ScoredSample,
    check_version,
    decode_rollout,
    decode_scored,
    encode_rollout,
    encode_scored,
    pack_tensor,
)


def make_rollout(t: int = 12, p: int = 4, rid: str = "r1") -> Rollout:
    ids = np.arange(100, 100 + t, dtype=np.int32)
    return Rollout(
        id=rid,
        input_ids=ids,
        prompt_len=p,
        policy_version=3,
        source="student",
        created_ms=1_700_000_000_000,
        meta={"prompt_idx": 7},
    )


def make_scored(t: int = 12, p: int = 4, k: int = 5, dtype: type = np.float16) -> ScoredSample:
    r = make_rollout(t, p)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(t - p, k), dtype=np.int32)
    lp = -np.sort(rng.random((t - p, k)), axis=1).astype(dtype)
    return ScoredSample(rollout=r, topk_ids=ids, topk_logprobs=lp, teacher="tiny", k=k, scored_ms=5)


def raw_map(sample: ScoredSample) -> dict:
    return msgpack.unpackb(encode_scored(sample), raw=False)


def test_rollout_round_trip() -> None:
    r = make_rollout()
    back = decode_rollout(encode_rollout(r))
    assert back.id == "r1" and back.prompt_len == 4 and back.policy_version == 3
    assert (
        back.source == "student" and back.created_ms == 1_700_000_000_000 and back.meta == {"prompt_idx": 7}
    )
    assert back.input_ids.dtype == np.int32
    np.testing.assert_array_equal(back.input_ids, r.input_ids)


def test_rollout_ids_of_other_int_dtype_are_sent_as_int32() -> None:
    r = make_rollout()
    r.input_ids = r.input_ids.astype(np.int64)
    assert decode_rollout(encode_rollout(r)).input_ids.dtype == np.int32


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_scored_round_trip_every_logprob_dtype(dtype: type) -> None:
    s = make_scored(dtype=dtype)
    back = decode_scored(encode_scored(s))
    assert back.topk_logprobs.dtype == dtype and back.k == 5 and back.teacher == "tiny"
    np.testing.assert_array_equal(back.topk_ids, s.topk_ids)
    np.testing.assert_array_equal(back.topk_logprobs, s.topk_logprobs)
    np.testing.assert_array_equal(back.rollout.input_ids, s.rollout.input_ids)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.float32])
def test_tensor_map_layout(dtype: type) -> None:
    a = np.arange(6, dtype=dtype).reshape(2, 3)
    m = pack_tensor(a)
    assert m["dtype"] == np.dtype(dtype).newbyteorder("<").str and m["shape"] == [2, 3]
    assert bytes(m["data"]) == a.tobytes()


def test_decoded_arrays_are_views_of_the_message_bytes() -> None:
    back = decode_scored(encode_scored(make_scored()))
    # frombuffer views are read-only and do not own their memory: no copy was made
    assert not back.topk_ids.flags.owndata and not back.topk_ids.flags.writeable


def test_bytes_per_token_is_six_k_plus_small_header() -> None:
    t, p, k = 4096, 1, 64
    buf = encode_scored(make_scored(t=t, p=p, k=k))
    per_token = len(buf) / (t - p)
    assert 6 * k <= per_token < 6 * k + 5  # 4 B int32 id, 2 B fp16 logprob, + input_ids and header


def expect_error(field: str, buf: bytes, decoder=decode_scored, limits: Limits | None = None) -> str:
    with pytest.raises(WireFormatError) as info:
        decoder(buf, limits) if limits else decoder(buf)
    assert info.value.field == field, str(info.value)
    assert isinstance(info.value, PermanentError)
    return str(info.value)


def test_unknown_dtype_is_rejected() -> None:
    m = raw_map(make_scored())
    m["topk_logprobs"]["dtype"] = "<f8"
    msg = expect_error("topk_logprobs.dtype", msgpack.packb(m))
    assert "'<f8'" in msg and "<f2" in msg


def test_big_endian_dtype_is_rejected() -> None:
    m = raw_map(make_scored())
    m["topk_ids"]["dtype"] = ">i4"
    assert "'>i4'" in expect_error("topk_ids.dtype", msgpack.packb(m))


def test_big_endian_array_cannot_be_encoded() -> None:
    with pytest.raises(WireFormatError, match=">i4"):
        pack_tensor(np.arange(3, dtype=">i4"), "x")


def test_shape_not_matching_data_length() -> None:
    m = raw_map(make_scored())
    m["topk_ids"]["shape"] = [8, 6]
    msg = expect_error("topk_ids.data", msgpack.packb(m))
    assert "needs 192 bytes, got 160" in msg


def test_huge_declared_shape_is_rejected_without_allocating() -> None:
    m = raw_map(make_scored())
    m["topk_ids"]["shape"] = [2**40, 2**20]
    expect_error("topk_ids.data", msgpack.packb(m))


@pytest.mark.parametrize("prompt_len", [0, 12, 13, -1])
def test_prompt_len_out_of_range(prompt_len: int) -> None:
    m = msgpack.unpackb(encode_rollout(make_rollout()), raw=False)
    m["prompt_len"] = prompt_len
    msg = expect_error("prompt_len", msgpack.packb(m), decode_rollout)
    assert f"got {prompt_len}" in msg and "T = 12" in msg


def test_negative_ids() -> None:
    r = make_rollout()
    r.input_ids = r.input_ids.copy()
    r.input_ids[2] = -5
    with pytest.raises(WireFormatError, match="got -5") as info:
        encode_rollout(r)
    assert info.value.field == "input_ids"
    m = msgpack.unpackb(encode_rollout(make_rollout()), raw=False)
    m["input_ids"] = pack_tensor(r.input_ids)
    m["input_ids"]["data"] = bytes(m["input_ids"]["data"])
    expect_error("input_ids", msgpack.packb(m), decode_rollout)


def test_rows_must_equal_t_minus_prompt_len() -> None:
    m = raw_map(make_scored())
    m["prompt_len"] = 3  # T - prompt_len = 9 but 8 rows were sent
    msg = expect_error("topk_ids.shape", msgpack.packb(m))
    assert "R=9" in msg and "[8, 5]" in msg


def test_k_mismatch_between_ids_and_logprobs() -> None:
    s = make_scored()
    m = raw_map(s)
    m["topk_logprobs"] = pack_tensor(s.topk_logprobs[:, :4].copy())
    m["topk_logprobs"]["data"] = bytes(m["topk_logprobs"]["data"])
    assert "[8, 4]" in expect_error("topk_logprobs.shape", msgpack.packb(m))


def test_k_field_must_match_columns() -> None:
    m = raw_map(make_scored())
    m["k"] = 6
    expect_error("topk_ids.shape", msgpack.packb(m))


@pytest.mark.parametrize("v", [0, 3, "1", None, True])
def test_unsupported_version(v: object) -> None:
    m = raw_map(make_scored())
    m["v"] = v
    assert "expected version 1 or 2" in expect_error("v", msgpack.packb(m))


def make_sampled(t: int = 12, p: int = 4, n: int = 6) -> ScoredSample:
    """A sampled teacher's sample: per row the distinct ids of n draws, their counts, then padding."""
    s = make_scored(t, p, k=n, dtype=np.float32)
    rng = np.random.default_rng(1)
    counts = np.zeros((t - p, n), dtype=np.int32)
    for r in range(t - p):
        drawn = np.bincount(rng.integers(0, 3, size=n), minlength=n)[:n]
        live = np.sort(drawn[drawn > 0])[::-1]
        counts[r, : live.size] = live
    s.teacher_counts = counts
    return s


def test_sampled_round_trip_is_version_2_and_top_k_stays_version_1() -> None:
    topk = make_scored()
    assert raw_map(topk)["v"] == 1 and "teacher_counts" not in raw_map(topk)
    s = make_sampled()
    m = raw_map(s)
    assert m["v"] == 2
    back = decode_scored(encode_scored(s))
    assert back.sampled and not decode_scored(encode_scored(topk)).sampled
    assert back.teacher_counts is not None and back.teacher_counts.dtype == np.int32
    np.testing.assert_array_equal(back.teacher_counts, s.teacher_counts)
    np.testing.assert_array_equal(back.topk_ids, s.topk_ids)
    assert (back.teacher_counts.sum(1) == s.k).all()


def test_a_version_1_reader_refuses_a_sampled_record() -> None:
    """A reader that knows version 1 only (the check every pre-sampling decoder made, and what
    decode_rollout still accepts) refuses a sampled record by its version, before reading any field."""
    buf = encode_scored(make_sampled())
    with pytest.raises(WireFormatError) as info:
        check_version(msgpack.unpackb(buf)["v"], (1,))
    assert info.value.field == "v" and "expected version 1, got 2" in str(info.value)
    assert "newer gkd-pipeline" in str(info.value)
    msg = expect_error("v", buf, decoder=decode_rollout)
    assert "expected version 1, got 2" in msg


def test_sampled_counts_are_validated() -> None:
    m = raw_map(make_sampled())
    del m["teacher_counts"]
    expect_error("teacher_counts", msgpack.packb(m))  # version 2 without counts
    m = raw_map(make_sampled())
    m["v"] = 1  # counts in a version-1 record: never silently dropped
    expect_error("teacher_counts", msgpack.packb(m))
    s = make_sampled()
    assert s.teacher_counts is not None
    s.teacher_counts[0, 0] += 1
    with pytest.raises(WireFormatError, match="sum to k = 6 draws, got 7 in row 0"):
        encode_scored(s)
    s = make_sampled()
    s.teacher_counts = s.teacher_counts[:, :5].copy()  # type: ignore[index]
    with pytest.raises(WireFormatError, match="as topk_ids"):
        encode_scored(s)
    m = raw_map(make_sampled())
    counts = np.frombuffer(m["teacher_counts"]["data"], dtype="<i4").copy()
    counts[0], counts[1] = -1, counts[1] + counts[0] + 1
    m["teacher_counts"]["data"] = counts.tobytes()
    assert "non-negative" in expect_error("teacher_counts", msgpack.packb(m))


def test_message_over_size_limit() -> None:
    buf = encode_scored(make_scored())
    msg = expect_error("scored", buf, limits=Limits(max_message_bytes=100))
    assert "at most 100 bytes" in msg


def test_token_and_k_limits() -> None:
    buf = encode_scored(make_scored(t=12, k=5))
    expect_error("input_ids.shape", buf, limits=Limits(max_tokens=10))
    expect_error("k", buf, limits=Limits(max_k=4))


def test_not_msgpack_and_not_a_map() -> None:
    expect_error("scored", b"\xc1\xc1garbage")
    expect_error("scored", msgpack.packb([1, 2, 3]))


def test_ext_types_are_rejected() -> None:
    m = raw_map(make_scored())
    m["meta"] = msgpack.ExtType(42, b"payload")
    assert "ext or reserved" in expect_error("scored", msgpack.packb(m))


def test_missing_and_mistyped_fields() -> None:
    m = raw_map(make_scored())
    del m["teacher"]
    expect_error("teacher", msgpack.packb(m))
    m = raw_map(make_scored())
    m["policy_version"] = 1.5
    assert "expected an int" in expect_error("policy_version", msgpack.packb(m))
    m = raw_map(make_scored())
    m["topk_ids"] = b"not a tensor"
    expect_error("topk_ids", msgpack.packb(m))
