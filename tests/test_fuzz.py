"""Property-based fuzzing of every decoder of untrusted bytes: the wire records and the teacher parsers.

The property, for every input: it is either accepted as valid (and then the result satisfies every
documented invariant, and re-encoding a decoded record round-trips byte for byte) or rejected with the
project's own error class (`WireFormatError` for records, `MalformedResponse`/`PermanentError` for
teacher bodies). Any other exception, a hang (the per-test timeout) or an invalid accepted result fails.

Inputs: random bytes; valid messages mutated structurally (a field deleted, replaced by a random plain
msgpack/JSON value, a huge declared shape, an ext type) and then at the byte level (bit flips,
truncation, inserted and deleted spans). Messages are tiny so 10,000 cases per decoder stay fast.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import MalformedResponse, PermanentError, WireFormatError
from pipeline.teacher import binary, rows, sglang, vllm
from pipeline.teacher.http import server_message
from pipeline.wire import codec
from pipeline.wire.codec import Limits, Rollout, ScoredSample

#: Cases per fuzzed decoder: 10,000 in CI; raise it for a longer local hunt.
EXAMPLES = int(os.environ.get("GKD_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SMALL_LIMITS = Limits(max_tokens=16, max_k=4, max_message_bytes=600)
LIMITS = st.sampled_from([codec.DEFAULT_LIMITS, SMALL_LIMITS])


def _rollout(t: int, p: int, meta: dict[str, Any]) -> Rollout:
    ids = np.arange(3, 3 + t, dtype=np.int32)
    return Rollout(id=f"r{t}", input_ids=ids, prompt_len=p, policy_version=2, source="student", meta=meta)


def _scored(t: int, p: int, k: int, dtype: type) -> ScoredSample:
    rng = np.random.default_rng(t * 10 + k)
    ids = rng.integers(0, 50, size=(t - p, k), dtype=np.int32)
    lp: np.ndarray = -np.sort(rng.random((t - p, k)), axis=1).astype(dtype)
    return ScoredSample(_rollout(t, p, {"i": 1}), ids, lp, teacher="tiny", k=k, scored_ms=9)


BASE_ROLLOUTS = [
    codec.encode_rollout(_rollout(2, 1, {})),
    codec.encode_rollout(_rollout(5, 2, {"a": [1, "x", None], "b": b"\x00\x01"})),
]
BASE_SCORED = [
    codec.encode_scored(_scored(3, 1, 1, np.float16)),
    codec.encode_scored(_scored(4, 2, 3, np.float32)),
]

# ------------------------------------------------------------------------------------------- mutations
# Hypothesis draws a seed; the mutations below are driven by `random.Random(seed)`. Hypothesis's own
# value strategies cost ~3-6 ms per example on a busy 2-core machine; this keeps 10,000 cases per
# decoder within ~15 s. A failure message carries the exact input bytes, so it reproduces without the seed.

HUGE_INTS = (2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**53, 2**63 - 1, 2**64 - 1, -1, -(2**63))
BEYOND_FLOAT = (10**400, -(10**400), 2**70)  # JSON only: msgpack has no such ints, floats overflow
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, -1.5, 1e308, -1e308, 5e-324, -9999.0, 1e-3)
STRINGS = (
    "",
    "1",
    "-1",
    "1.5",
    " 7",
    "1,2",
    "0x10",
    "99999999999999999999",
    "AAAA",
    "==",
    "<i4",
    "\u00e9",
    "null",
)


class Mutator:
    """Random edits of decoded records/bodies (trees of dicts and lists) and of raw bytes."""

    def __init__(self, seed: int, *, json_only: bool) -> None:
        self.rng = random.Random(seed)
        self.json_only = json_only

    def scalar(self) -> Any:
        rng = self.rng
        kind = rng.randrange(9)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.randint(-3, 300)
        if kind == 3:
            return rng.choice(HUGE_INTS + (BEYOND_FLOAT if self.json_only else ()))
        if kind == 4:
            return rng.choice(SPECIAL_FLOATS)
        if kind == 5:
            return rng.uniform(-20, 1)
        if kind == 6:
            return rng.choice(STRINGS)
        if kind == 7 or self.json_only:
            return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(5)))
        if rng.random() < 0.5:
            return rng.randbytes(rng.randrange(9))
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(4)))

    def value(self, depth: int = 0) -> Any:
        roll = self.rng.random()
        if depth < 2 and roll < 0.15:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(4))]
        if depth < 2 and roll < 0.25:
            return {str(self.scalar()): self.value(depth + 1) for _ in range(self.rng.randrange(3))}
        if not self.json_only and roll < 0.27:
            return {1: 2}  # a non-string map key
        return self.scalar()

    def transform(self, old: Any) -> Any:
        """A systematic change a buggy server version could make to every value of one field."""
        rng = self.rng
        choice = rng.randrange(7)
        number = isinstance(old, (int, float)) and not isinstance(old, bool)
        try:
            if choice == 0:
                return [old, old]
            if choice == 1:
                return str(old)
            if choice == 2 and number:
                return rng.choice((10**400 if self.json_only else 2**64 - 1, -old, old * 1e300, old * 1.5))
            if choice == 3:
                return None
            if choice == 4 and number:
                return old + rng.choice((1, 0.5, 1e-7, 1000))
        except OverflowError:  # arithmetic on an earlier edit's huge int
            return old
        return self.value()

    def tree(self, obj: Any, max_ops: int = 3) -> Any:
        """0..max_ops edits: replace, delete, duplicate, replace-all-of-a-field, huge shape/dtype."""
        rng = self.rng
        for _ in range(rng.randrange(max_ops + 1)):
            paths = _paths(obj)
            if not paths:
                break
            path = rng.choice(paths)
            op = rng.randrange(6)
            if op == 0:
                obj = _set(obj, path, self.value())
            elif op == 1:
                obj = _set(obj, path, None, delete=True)
            elif op == 2:
                parent = _get(obj, path[:-1])
                if isinstance(parent, list):
                    parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
            elif op == 3:  # every value at the same depth under the same key: one field, all rows
                same = [q for q in paths if len(q) == len(path) and q[-1] == path[-1]]
                for q in same:
                    obj = _set(obj, q, self.transform(_get(obj, q)))
            elif op == 4 and isinstance(_get(obj, path), dict) and "shape" in _get(obj, path):
                shape = [rng.choice((*HUGE_INTS, 0, 1, 2, 3)) for _ in range(rng.randrange(4))]
                _get(obj, path)["shape"] = shape
            elif op == 5 and isinstance(obj, dict):
                obj[rng.choice(STRINGS)] = self.value()
            else:
                obj = _set(obj, path, rng.choice(SPECIAL_FLOATS + HUGE_INTS))
        return obj

    def bytes(self, raw: bytes, max_ops: int = 3) -> bytes:
        """0..max_ops byte edits: bit flip, truncation, inserted bytes, deleted span."""
        rng = self.rng
        buf = bytearray(raw)
        for _ in range(rng.randrange(max_ops + 1)):
            if not buf:
                break
            pos = rng.randrange(len(buf))
            op = rng.randrange(4)
            if op == 0:
                buf[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                del buf[pos:]
            elif op == 2:
                buf[pos:pos] = rng.randbytes(rng.randrange(1, 5))
            else:
                del buf[pos : pos + rng.randrange(1, 9)]
        return bytes(buf)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys/indices) into a nest of dicts and lists, the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = _get(obj, path[:-1])
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def mutated_record(bases: list[bytes], seed: int) -> bytes:
    """Random bytes, or a base record with tree edits (msgpack level) and/or byte edits."""
    m = Mutator(seed, json_only=False)
    mode = m.rng.randrange(8)
    if mode == 0:
        return m.rng.randbytes(m.rng.randrange(120))
    if mode == 1:
        return msgpack.packb(m.value(), use_bin_type=True)
    base = m.rng.choice(bases)
    if mode == 2:
        return m.bytes(base)
    try:
        raw = msgpack.packb(m.tree(msgpack.unpackb(base, raw=False)), use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        raw = base  # an edit msgpack cannot represent (such ints do not exist on the wire)
    return m.bytes(raw) if mode == 3 else raw


RECORD_INPUTS = st.one_of(st.binary(max_size=100), st.integers(0, 2**64))


def record_input(bases: list[bytes], drawn: bytes | int) -> bytes:
    return drawn if isinstance(drawn, bytes) else mutated_record(bases, drawn)


# ------------------------------------------------------------------------------------ record properties


def _check_rollout(r: Rollout, limits: Limits) -> None:
    ids = r.input_ids
    assert ids.dtype == np.int32 and ids.ndim == 1, (ids.dtype, ids.shape)
    assert 1 <= r.prompt_len < ids.shape[0] <= limits.max_tokens
    assert int(ids.min()) >= 0
    assert isinstance(r.id, str) and r.id and isinstance(r.source, str) and r.source
    assert type(r.policy_version) is int and r.policy_version >= 0
    assert type(r.created_ms) is int and r.created_ms >= 0
    assert isinstance(r.meta, dict)


def _same_rollout(a: Rollout, b: Rollout) -> None:
    assert (a.id, a.prompt_len, a.policy_version, a.source, a.created_ms) == (
        b.id,
        b.prompt_len,
        b.policy_version,
        b.source,
        b.created_ms,
    )
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


def _rollout_property(raw: bytes, limits: Limits) -> None:
    try:
        r = codec.decode_rollout(raw, limits)
    except WireFormatError:
        return
    _check_rollout(r, limits)
    again = codec.encode_rollout(r, limits)  # what a worker does with an accepted rollout
    back = codec.decode_rollout(again, limits)
    _same_rollout(r, back)
    assert codec.encode_rollout(back, limits) == again


def _scored_property(raw: bytes, limits: Limits) -> None:
    try:
        s = codec.decode_scored(raw, limits)
    except WireFormatError:
        return
    _check_rollout(s.rollout, limits)
    rows_ = s.rollout.num_tokens - s.rollout.prompt_len
    assert s.topk_ids.dtype == np.int32 and s.topk_logprobs.dtype in (np.float16, np.float32)
    assert s.topk_ids.shape == s.topk_logprobs.shape == (rows_, s.k) and 1 <= s.k <= limits.max_k
    assert int(s.topk_ids.min()) >= 0
    again = codec.encode_scored(s, limits)
    back = codec.decode_scored(again, limits)
    _same_rollout(s.rollout, back.rollout)
    np.testing.assert_array_equal(s.topk_ids, back.topk_ids)
    assert s.topk_logprobs.tobytes() == back.topk_logprobs.tobytes()  # bitwise: NaN payloads included
    assert (back.teacher, back.k, back.scored_ms) == (s.teacher, s.k, s.scored_ms)
    assert codec.encode_scored(back, limits) == again


def _holds(prop: Callable[..., None], raw: bytes, *args: Any) -> None:
    """Run a property; any failure names the exact input, so it reproduces without Hypothesis."""
    try:
        prop(raw, *args)
    except Exception as exc:
        raise AssertionError(f"{prop.__name__} failed for input {raw!r} {args}: {exc!r}") from exc


@FUZZ
@given(drawn=RECORD_INPUTS, limits=LIMITS)
def test_decode_rollout_accepts_valid_or_raises_wire_format_error(drawn: bytes | int, limits: Limits) -> None:
    _holds(_rollout_property, record_input(BASE_ROLLOUTS, drawn), limits)


@FUZZ
@given(drawn=RECORD_INPUTS, limits=LIMITS)
def test_decode_scored_accepts_valid_or_raises_wire_format_error(drawn: bytes | int, limits: Limits) -> None:
    _holds(_scored_property, record_input(BASE_SCORED, drawn), limits)


@pytest.mark.parametrize("n", [2**31, 2**32 + 2, 2**63 - 1, 2**64 - 1, 0])
def test_huge_declared_shapes_are_rejected(n: int) -> None:
    obj = msgpack.unpackb(BASE_ROLLOUTS[1], raw=False)
    obj["input_ids"]["shape"] = [n]
    with pytest.raises(WireFormatError) as info:
        codec.decode_rollout(msgpack.packb(obj, use_bin_type=True))
    assert info.value.field.startswith("input_ids")
    for shape in ([n, 3], [3, n], [n, n]):
        obj = msgpack.unpackb(BASE_SCORED[1], raw=False)
        obj["topk_logprobs"]["shape"] = shape
        with pytest.raises(WireFormatError) as info:
            codec.decode_scored(msgpack.packb(obj, use_bin_type=True))
        assert info.value.field.startswith("topk_logprobs")


@pytest.mark.parametrize(
    "header", [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"]
)
def test_huge_declared_container_lengths_are_rejected_early(header: bytes) -> None:
    """A header claiming 2**32-1 array/map entries or bytes in a tiny message is refused, not looped."""
    with pytest.raises(WireFormatError):
        codec.decode_rollout(header + b"\x00" * 16)


# -------------------------------------------------------------------------------------- teacher bodies

T, P, K = 5, 2, 3  # tokens, prompt_len, top-k of the base bodies; R = T - P = 3 rows


def _teacher_arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids_TK = np.stack([rng.permutation(20)[:K] for _ in range(T)]).astype(np.int32)
    lp_TK = np.log(np.sort(rng.dirichlet(np.ones(8), size=T), axis=1)[:, ::-1][:, :K])
    if seed == 1:
        lp_TK[3, -1] = -np.inf  # vLLM sends -inf as -9999.0, SGLang (orjson) as null
    actual_T = np.array([int(ids_TK[t, 0]) if t % 2 else 30 + t for t in range(T)], np.int32)
    return ids_TK, lp_TK, actual_T


def _vllm_base(seed: int) -> Any:
    ids_TK, lp_TK, actual_T = _teacher_arrays(seed)
    return vllm.build_prompt_logprobs_body(ids_TK, lp_TK, actual_T, shuffle_seed=seed, decoded=seed == 0)


def _sglang_base(seed: int, flat: bool) -> Any:
    ids_TK, lp_TK, _ = _teacher_arrays(seed)
    return sglang.build_generate_body(ids_TK, lp_TK, P, flat=flat)


def _binary_base(seed: int) -> bytes:
    ids_TK, lp_TK, _ = _teacher_arrays(seed)
    return binary.render(ids_TK[P:], lp_TK[P:], "m")


VLLM_BASES = [_vllm_base(0), _vllm_base(1)]
BINARY_BASES = [_binary_base(0), _binary_base(1)]
SGLANG_BASES = [_sglang_base(0, False), _sglang_base(1, False), _sglang_base(0, True), _sglang_base(1, True)]


def _dumps(obj: Any, m: Mutator) -> bytes:
    """Serialize like some server would: orjson (NaN -> null), or stdlib json (NaN literals, big ints)."""
    if m.rng.random() < 0.5:
        try:
            return orjson.dumps(obj)
        except TypeError:  # orjson refuses ints beyond 64 bits: the stdlib writes them
            pass
    return json.dumps(obj).encode()


def mutated_body(bases: list[Any], seed: int) -> bytes:
    """Random bytes or JSON, or a base body with JSON-level edits and/or byte edits."""
    m = Mutator(seed, json_only=True)
    mode = m.rng.randrange(8)
    if mode == 0:
        return m.rng.randbytes(m.rng.randrange(80))
    if mode == 1:
        return json.dumps(m.value()).encode()
    base = copy.deepcopy(m.rng.choice(bases))
    if mode == 2:
        return m.bytes(_dumps(base, m))
    raw = _dumps(m.tree(base), m)
    return m.bytes(raw) if mode == 3 else raw


def _check_scores(ids_RK: np.ndarray, lp_RK: np.ndarray, rows_: int, k: int) -> None:
    """The invariants the worker relies on for every accepted teacher answer."""
    assert ids_RK.dtype == np.int32 and lp_RK.dtype == np.float32, (ids_RK.dtype, lp_RK.dtype)
    assert ids_RK.shape == lp_RK.shape == (rows_, k), (ids_RK.shape, lp_RK.shape)
    assert int(ids_RK.min()) >= 0, ids_RK
    assert not np.isnan(lp_RK).any() and float(lp_RK.max()) <= 0.0, lp_RK
    assert bool(np.all((lp_RK[:, :-1] >= lp_RK[:, 1:]) | np.isneginf(lp_RK[:, 1:]))), lp_RK
    with np.errstate(divide="ignore"):
        lse_R = np.log(np.exp(lp_RK.astype(np.float64)).sum(axis=1))
    assert float(lse_R.max()) <= rows.LSE_SLACK + 1e-6, lse_R


def _parser_property(raw: bytes, parse: Callable[..., Any], shape: tuple[int, int, int]) -> None:
    t, p, k = shape
    try:
        ids_RK, lp_RK = parse(raw, t, p, k)
    except PermanentError:
        return
    _check_scores(ids_RK, lp_RK, t - p, k)


TEACHER_SHAPES = st.sampled_from(
    [(T, P, K), (T, P, K), (T, P, K - 1), (T, P, K + 1), (T, 1, K), (T + 1, P, K)]
)
BODY_INPUTS = st.one_of(st.binary(max_size=80), st.integers(0, 2**64))


def body_input(bases: list[Any], drawn: bytes | int) -> bytes:
    return drawn if isinstance(drawn, bytes) else mutated_body(bases, drawn)


@FUZZ
@given(drawn=BODY_INPUTS, shape=TEACHER_SHAPES)
def test_vllm_parser_accepts_valid_or_raises_malformed_response(
    drawn: bytes | int, shape: tuple[int, int, int]
) -> None:
    _holds(_parser_property, body_input(VLLM_BASES, drawn), vllm.parse_response, shape)


def _vllm_paths_agree(raw: bytes, shape: tuple[int, int, int]) -> None:
    """The typed fast path and the generic orjson path accept the same bodies with the same result."""
    t, p, k = shape
    results = []
    for parse in (vllm.parse_response, lambda *a: vllm._parse_generic(*a, "vLLM prompt_logprobs")):
        try:
            results.append(parse(raw, t, p, k))
        except PermanentError:
            results.append(None)
    fast, generic = results
    if fast is not None and generic is None:
        # the one known difference: msgspec does not check the UTF-8 of strings it skips (decoded_token)
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        return
    assert (fast is None) == (generic is None), (fast, generic)
    if fast is not None and generic is not None:
        np.testing.assert_array_equal(fast[0], generic[0])
        assert fast[1].tobytes() == generic[1].tobytes()


@FUZZ
@given(drawn=BODY_INPUTS, shape=TEACHER_SHAPES)
def test_vllm_typed_and_generic_parsers_agree(drawn: bytes | int, shape: tuple[int, int, int]) -> None:
    _holds(_vllm_paths_agree, body_input(VLLM_BASES, drawn), shape)


@FUZZ
@given(drawn=RECORD_INPUTS, shape=TEACHER_SHAPES)
def test_binary_parser_accepts_valid_or_raises_malformed_response(
    drawn: bytes | int, shape: tuple[int, int, int]
) -> None:
    _holds(_parser_property, record_input(BINARY_BASES, drawn), binary.parse_response, shape)


@FUZZ
@given(drawn=BODY_INPUTS, shape=TEACHER_SHAPES)
def test_sglang_parser_accepts_valid_or_raises_malformed_response(
    drawn: bytes | int, shape: tuple[int, int, int]
) -> None:
    _holds(_parser_property, body_input(SGLANG_BASES, drawn), sglang.parse_response, shape)


@settings(max_examples=2_000, deadline=None, database=None)
@given(drawn=BODY_INPUTS)
def test_error_body_message_never_raises(drawn: bytes | int) -> None:
    assert isinstance(server_message(body_input(VLLM_BASES, drawn)), str)


@pytest.mark.parametrize("seed", [0, 1])
def test_vllm_fuzz_bases_parse_to_the_built_arrays(seed: int) -> None:
    """The fuzz bases are valid (so the fuzzers explore near-valid inputs, not only rejections)."""
    ids_TK, lp_TK, _ = _teacher_arrays(seed)
    ids_RK, lp_RK = vllm.parse_response(orjson.dumps(VLLM_BASES[seed]), T, P, K)
    _check_scores(ids_RK, lp_RK, T - P, K)
    np.testing.assert_array_equal(ids_RK, ids_TK[P:])
    np.testing.assert_allclose(lp_RK, lp_TK[P:].astype(np.float32))


@pytest.mark.parametrize("base", SGLANG_BASES)
def test_sglang_fuzz_bases_parse_to_the_built_arrays(base: Any) -> None:
    ids_RK, lp_RK = sglang.parse_response(orjson.dumps(base), T, P, K)
    _check_scores(ids_RK, lp_RK, T - P, K)


# --------------------------------------------------------------------------- findings, one test each


def test_sglang_null_logprob_is_minus_inf() -> None:
    """SGLang (orjson) sends -inf as null: it must parse as -inf, not as NaN (then rejected)."""
    ids_TK, _, _ = _teacher_arrays(1)
    ids_RK, lp_RK = sglang.parse_response(orjson.dumps(SGLANG_BASES[1]), T, P, K)
    np.testing.assert_array_equal(ids_RK, ids_TK[P:])
    assert np.isneginf(lp_RK[3 - P, -1])


def _vllm_edit(edit: Callable[[dict[str, Any]], None]) -> bytes:
    body = copy.deepcopy(VLLM_BASES[0])
    for row in body["choices"][0]["prompt_logprobs"][1:]:
        edit(row)
    return json.dumps(body).encode()


def _sglang_edit(edit: Callable[[list[Any]], None], base: int = 0) -> bytes:
    body = copy.deepcopy(SGLANG_BASES[base])
    for row in body["meta_info"]["input_top_logprobs"][1:]:
        for triple in row:
            edit(triple)
    return json.dumps(body).encode()


# Found by the fuzzers above and fixed in pipeline/teacher (843bcc4); kept as regression tests:
# P1 OverflowError from a JSON int beyond float range as a logprob; P2 ids >= 2**31 wrapping to negative
# int32; P3 nested lists where numbers belong (2-D arrays); P4 junk in SGLang's plain flat lists.
# C1 (mpack wrote maps of 65536+ entries with a 16-bit length: struct.error) is fixed in 9279516.


def _first_logprob(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(row: dict[str, Any]) -> None:
        next(iter(row.values()))["logprob"] = value

    return edit


@pytest.mark.parametrize("which", ["vllm", "sglang"])
def test_bug_p1_logprob_beyond_float_range_is_malformed(which: str) -> None:
    if which == "vllm":
        raw = _vllm_edit(_first_logprob(-(10**400)))
        with pytest.raises(MalformedResponse):
            vllm.parse_response(raw, T, P, K)
    else:
        raw = _sglang_edit(lambda triple: triple.__setitem__(0, -(10**400)))
        with pytest.raises(MalformedResponse):
            sglang.parse_response(raw, T, P, K)


@pytest.mark.parametrize("which", ["vllm", "sglang"])
def test_bug_p2_token_id_beyond_int32_is_malformed(which: str) -> None:
    if which == "vllm":

        def edit(row: dict[str, Any]) -> None:
            best = max(row, key=lambda key: row[key]["logprob"])
            row[str(2**31)] = row.pop(best)

        raw, parse = _vllm_edit(edit), vllm.parse_response
    else:
        raw, parse = _sglang_edit(lambda triple: triple.__setitem__(1, 2**31)), sglang.parse_response
    try:
        ids_RK, _ = parse(raw, T, P, K)
    except MalformedResponse:
        return
    assert int(ids_RK.min()) >= 0, f"accepted token ids {ids_RK.tolist()}"


@pytest.mark.parametrize("which", ["vllm-logprobs", "sglang-ids"])
def test_bug_p3_nested_list_values_are_malformed(which: str) -> None:
    if which == "vllm-logprobs":

        def edit(row: dict[str, Any]) -> None:
            for entry in row.values():
                entry["logprob"] = [entry["logprob"], entry["logprob"]]

        raw, parse = _vllm_edit(edit), vllm.parse_response
    else:
        raw, parse = _sglang_edit(lambda tr: tr.__setitem__(1, [tr[1], tr[1]])), sglang.parse_response
    try:
        ids_RK, _ = parse(raw, T, P, K)
    except MalformedResponse:
        return
    assert ids_RK.shape == (T - P, K), f"accepted ids of shape {ids_RK.shape}, expected {(T - P, K)}"


@pytest.mark.parametrize("values", [["a"] * 9, [10**30] * 9])
def test_bug_p4_sglang_flat_plain_lists_of_junk_are_malformed(values: list[Any]) -> None:
    body = copy.deepcopy(SGLANG_BASES[2])
    meta = body["meta_info"]
    name = "input_top_logprobs_idx_flat" if isinstance(values[0], int) else "input_top_logprobs_val_flat"
    del meta[f"{name}_b64"]
    meta[name] = values
    with pytest.raises(MalformedResponse):
        sglang.parse_response(json.dumps(body).encode(), T, P, K)


def test_bug_c1_decoded_rollout_with_a_large_meta_map_re_encodes() -> None:
    """decode_rollout accepts a meta map of 70,000 entries (0.5 MB, under every limit); the worker then
    re-encodes it inside its ScoredSample. Either decode must refuse it or encode must work."""
    obj = msgpack.unpackb(BASE_ROLLOUTS[0], raw=False)
    obj["meta"] = {str(i): 0 for i in range(70_000)}
    try:
        r = codec.decode_rollout(msgpack.packb(obj, use_bin_type=True))
    except WireFormatError:
        return
    assert codec.decode_rollout(codec.encode_rollout(r)).meta == r.meta
