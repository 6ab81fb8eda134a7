"""Redis' `cmsgpack` Lua library for fakeredis, whose Lua has none: the
subset the checkpoint scripts use (arrays, strings, whole numbers), written
in Python and handed to fakeredis' Lua runtime. Real Redis runs its own C
cmsgpack; tests/test_checkpoints.py checks what it writes against
service/layout.py's reader."""

from __future__ import annotations

import struct
from typing import Any

import fakeredis


def _pack_one(x: Any, out: list[bytes]) -> None:
    if isinstance(x, bytes):
        n = len(x)
        if n < 32:
            out.append(bytes([0xA0 | n]))
        elif n <= 0xFF:
            out.append(b"\xd9" + struct.pack(">B", n))
        elif n <= 0xFFFF:
            out.append(b"\xda" + struct.pack(">H", n))
        else:
            out.append(b"\xdb" + struct.pack(">I", n))
        out.append(x)
    elif isinstance(x, int | float) and not isinstance(x, bool):
        if x != int(x) or x < 0:
            raise ValueError("this fake packs whole non-negative numbers only")
        n = int(x)
        out.append(bytes([n]) if n < 0x80 else b"\xcf" + struct.pack(">Q", n))
    elif hasattr(x, "values"):  # a Lua table, as an array
        items = [x[i] for i in range(1, len(x) + 1)]
        n = len(items)
        out.append(bytes([0x90 | n]) if n < 16 else b"\xdd" + struct.pack(">I", n))
        for item in items:
            _pack_one(item, out)
    else:
        raise ValueError(f"this fake cannot pack {type(x).__name__}")


def _unpack_one(data: bytes, pos: int, runtime: Any) -> tuple[Any, int]:
    code = data[pos]
    pos += 1
    if code < 0x80:
        return code, pos
    if 0xCC <= code <= 0xCF:
        width = 1 << (code - 0xCC)
        return int.from_bytes(data[pos : pos + width], "big"), pos + width
    if 0xA0 <= code <= 0xBF or 0xD9 <= code <= 0xDB:
        if code <= 0xBF:
            n = code & 0x1F
        else:
            width = 1 << (code - 0xD9)
            n, pos = int.from_bytes(data[pos : pos + width], "big"), pos + width
        return data[pos : pos + n], pos + n
    if 0x90 <= code <= 0x9F or code in (0xDC, 0xDD):
        if code <= 0x9F:
            n = code & 0x0F
        else:
            width = 2 if code == 0xDC else 4
            n, pos = int.from_bytes(data[pos : pos + width], "big"), pos + width
        items = []
        for _ in range(n):
            item, pos = _unpack_one(data, pos, runtime)
            items.append(item)
        return runtime.table_from(items), pos
    raise ValueError(f"this fake cannot unpack type byte {code:#x}")


def install(server: fakeredis.FakeServer) -> None:
    """Gives the server's Lua a cmsgpack global (made on first use, so one
    script call first)."""
    fakeredis.FakeRedis(server=server).eval("return 1", 0)
    runtime: Any = server._lua_runtime  # type: ignore[attr-defined]

    def pack(*args: Any) -> bytes:
        out: list[bytes] = []
        for arg in args:
            _pack_one(arg, out)
        return b"".join(out)

    def unpack(data: bytes) -> tuple[Any, ...]:
        values, pos = [], 0
        while pos < len(data):
            value, pos = _unpack_one(data, pos, runtime)
            values.append(value)
        return tuple(values)

    library = runtime.table_from({b"pack": pack, b"unpack": unpack})
    runtime.eval("function(t) cmsgpack = t end")(library)
    server._lua_expected_globals.add(b"cmsgpack")  # type: ignore[attr-defined]


def fake_redis() -> fakeredis.FakeRedis:
    server = fakeredis.FakeServer()
    install(server)
    return fakeredis.FakeRedis(server=server)
