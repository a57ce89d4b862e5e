"""The zero-copy msgpack reader agrees with msgpack itself on every plain object, and refuses the rest."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire import mpack

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)


def normalize(obj: object) -> object:
    if isinstance(obj, memoryview):
        return bytes(obj)
    if isinstance(obj, list):
        return [normalize(x) for x in obj]
    if isinstance(obj, dict):
        return {k: normalize(v) for k, v in obj.items()}
    return obj


@settings(max_examples=1500, deadline=None)
@given(plain)
def test_reader_matches_msgpack(obj: object) -> None:
    buf = msgpack.packb(obj, use_bin_type=True)
    assert normalize(mpack.loads(buf)) == msgpack.unpackb(buf, raw=False, strict_map_key=False)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_reader_never_fails_other_than_value_error(buf: bytes) -> None:
    try:
        mpack.loads(buf)
    except ValueError:
        pass


def test_float32_and_all_int_widths() -> None:
    for v in [0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -32, -33, -128, -129, -(2**63)]:
        assert mpack.loads(msgpack.packb(v)) == v
    assert mpack.loads(b"\xca" + struct.pack(">f", 1.5)) == 1.5
    assert math.isinf(mpack.loads(msgpack.packb(float("inf"))))


def test_bins_are_views_of_the_input() -> None:
    payload = bytes(range(256)) * 10
    buf = msgpack.packb({"data": payload}, use_bin_type=True)
    view = mpack.loads(buf)["data"]
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == payload
    assert view.obj is buf  # a slice of the message, not a copy


def test_dumps_round_trips_and_copies_each_buffer_once() -> None:
    arr = np.arange(1000, dtype=np.int32)
    obj = {
        "v": 1,
        "t": {"dtype": "<i4", "shape": [1000], "data": memoryview(arr).cast("B")},
        "m": {"a": [1, None]},
    }
    buf = mpack.dumps(obj)
    back = msgpack.unpackb(buf, raw=False)
    assert back["t"]["data"] == arr.tobytes() and back["m"] == {"a": [1, None]} and back["v"] == 1


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (b"\xc7\x01\x05x", "ext or reserved"),
        (b"\xd6\xff\x00\x00\x00\x00", "ext or reserved"),
        (b"\xc1", "ext or reserved"),
        (b"\xa5abc", "truncated"),
        (b"\x01\x02", "trailing bytes"),
        (b"\x81\x01\x02", "map key must be a string"),
        (b"\xa2\xff\xfe", "not UTF-8"),
        (b"\xdd\xff\xff\xff\xff", "cannot fit"),
        (b"\xdf\xff\xff\xff\xff", "cannot fit"),
        (b"\x91" * 100 + b"\xc0", "nesting deeper"),
    ],
)
def test_reader_rejects_with_reason(buf: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mpack.loads(buf)


def test_dumps_writes_maps_of_every_size() -> None:
    for n in (15, 16, 65535, 65536):
        obj = {"m": {str(i): 0 for i in range(n)}}
        assert msgpack.unpackb(mpack.dumps(obj), raw=False) == obj
