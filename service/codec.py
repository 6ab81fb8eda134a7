"""Strict RFC 8259 JSON, both ways.

orjson is the fast path. It has two gaps that would lose data, both closed here:
it turns integers wider than 64 bits into floats when parsing, and it refuses
to serialize them. A message holding a run of 19 or more digits therefore takes
the standard library's parser, which keeps integers exact; the serializer falls
back to the standard library on anything orjson refuses.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

Fragment = orjson.Fragment

# Every byte that is a digit maps to b"0", every other byte to b"x": a long
# digit run then shows as a run of b"0", which `in` finds with memmem. This is
# about 20x cheaper than a regular expression scan of the same bytes.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))
_LONG_RUN = b"0" * 19  # the shortest integer orjson may not hold exactly


class JSONError(ValueError):
    """The bytes are not strict JSON, or the value cannot be written as JSON."""


def _reject_constant(name: str) -> Any:
    raise JSONError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JSONError("number out of range")
    return value


def _exact_loads(data: bytes) -> Any:
    try:
        value = json.loads(
            data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
        # The standard parser accepts lone surrogate escapes, which cannot be
        # written back as UTF-8: find them now rather than at reply time.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, RecursionError, ValueError) as exc:
        raise JSONError(str(exc)) from None
    return value


def loads(data: bytes) -> Any:
    if _LONG_RUN in data.translate(_DIGITS_AS_ZERO):
        return _exact_loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JSONError(str(exc)) from None


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        pass  # wide integers or deep nesting: the standard library handles both
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8"
        )
    except (RecursionError, ValueError, TypeError, UnicodeError) as exc:
        raise JSONError(f"value cannot be written as JSON: {exc}") from None


def dumps_sorted(value: Any) -> bytes:
    """Canonical form (sorted keys) for fingerprints."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        pass
    try:
        return json.dumps(
            value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True
        ).encode("utf-8")
    except (RecursionError, ValueError, TypeError, UnicodeError) as exc:
        raise JSONError(f"value cannot be written as JSON: {exc}") from None
