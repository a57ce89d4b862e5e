"""A zero-copy msgpack reader and a single-copy writer for plain msgpack types.

`msgpack.unpackb` copies every bin payload into a new bytes object and `msgpack.packb` copies the
message twice (into its buffer, then into the result). Tensor payloads dominate our messages, so:
- `loads(buf)` returns bins as memoryview slices of `buf` (numpy.frombuffer views them without copying);
- `dumps(obj)` writes each large buffer once, with one `b"".join`.
Only plain types exist here: nil, bool, int, float, str, bin, array, map. Ext types, trailing bytes,
truncation, non-UTF-8 strings, non-string map keys and nesting deeper than `max_depth` raise ValueError.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_FIXED = {
    0xCC: struct.Struct(">B"),
    0xCD: _U16,
    0xCE: _U32,
    0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"),
    0xD1: struct.Struct(">h"),
    0xD2: struct.Struct(">i"),
    0xD3: struct.Struct(">q"),
    0xCA: struct.Struct(">f"),
    0xCB: struct.Struct(">d"),
}
_LEN = {
    0xD9: (1, "str"),
    0xDA: (2, "str"),
    0xDB: (4, "str"),
    0xC4: (1, "bin"),
    0xC5: (2, "bin"),
    0xC6: (4, "bin"),
    0xDC: (2, "array"),
    0xDD: (4, "array"),
    0xDE: (2, "map"),
    0xDF: (4, "map"),
}


class _Reader:
    __slots__ = ("buf", "max_depth", "pos")

    def __init__(self, buf: memoryview, max_depth: int) -> None:
        self.buf = buf
        self.pos = 0
        self.max_depth = max_depth

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"truncated: needed {n} bytes at offset {self.pos}, message has {len(self.buf)}")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def _len(self, width: int) -> int:
        raw = self._take(width)
        return raw[0] if width == 1 else (_U16 if width == 2 else _U32).unpack(raw)[0]

    def value(self, depth: int = 0) -> Any:
        if depth > self.max_depth:
            raise ValueError(f"nesting deeper than {self.max_depth}")
        b = self._take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        if 0x90 <= b <= 0x9F:
            return [self.value(depth + 1) for _ in range(b & 0x0F)]
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        fixed = _FIXED.get(b)
        if fixed is not None:
            return fixed.unpack(self._take(fixed.size))[0]
        if b in _LEN:
            width, kind = _LEN[b]
            n = self._len(width)
            if kind == "str":
                return self._str(n)
            if kind == "bin":
                return self._take(n)
            if kind == "array":
                if n > len(self.buf) - self.pos:  # each element takes >= 1 byte: refuse huge claims early
                    raise ValueError(f"array of {n} elements cannot fit in the message")
                return [self.value(depth + 1) for _ in range(n)]
            return self._map(n, depth)
        raise ValueError(
            f"unsupported msgpack type byte 0x{b:02x} at offset {self.pos - 1} (ext or reserved)"
        )

    def _str(self, n: int) -> str:
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"string is not UTF-8: {exc}") from None

    def _map(self, n: int, depth: int) -> dict[str, Any]:
        if 2 * n > len(self.buf) - self.pos:
            raise ValueError(f"map of {n} entries cannot fit in the message")
        out: dict[str, Any] = {}
        for _ in range(n):
            key = self.value(depth + 1)
            if not isinstance(key, str):
                raise ValueError(f"map key must be a string, got {type(key).__name__}")
            out[key] = self.value(depth + 1)
        return out


def loads(buf: bytes | bytearray | memoryview, max_depth: int = 32) -> Any:
    """Decode one msgpack object; bins come back as read-only memoryviews into `buf` (no copy)."""
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    if not view.readonly:
        view = view.toreadonly()
    reader = _Reader(view, max_depth)
    obj = reader.value()
    if reader.pos != len(view):
        raise ValueError(f"{len(view) - reader.pos} trailing bytes after the msgpack object")
    return obj


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + _U16.pack(n)
    return b"\xc6" + _U32.pack(n)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    return b"\xde" + _U16.pack(n) if n < 0x10000 else b"\xdf" + _U32.pack(n)


def _parts(obj: Any, out: list[Any]) -> None:
    if isinstance(obj, memoryview):
        out.append(_bin_header(obj.nbytes))
        out.append(obj)
    elif isinstance(obj, dict):
        out.append(_map_header(len(obj)))
        for k, v in obj.items():
            out.append(msgpack.packb(k))
            _parts(v, out)
    else:
        out.append(msgpack.packb(obj, use_bin_type=True))


def dumps(obj: Any) -> bytes:
    """Encode a map whose large values are memoryviews, copying each of them exactly once.

    Dicts are walked here (so a memoryview nested in a dict is not copied twice); every other value
    is packed by msgpack with bin types.
    """
    parts: list[Any] = []
    _parts(obj, parts)
    return b"".join(parts)
