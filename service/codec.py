"""Strict RFC 8259 JSON, both ways, with one parser.

orjson parses every message. It holds integers from -2**63 to 2**64-1
exactly and turns wider ones into floats, which would change a client's
value silently; such an integer is refused instead (`WideInteger`), so a
value either comes back exactly as it was sent or is refused. Finding one
costs a byte scan (a digit run of 19 or more can be one) and, only when a
run is there, a walk of the parsed value for integral floats at or beyond
2**63 whose mantissa the text does not hold (see _find_wide): parsing stays
linear and never switches to a slower parser.

The serializer falls back to the standard library on what orjson refuses
(deep nesting, and wide integers from values stored before this rule).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

Fragment = orjson.Fragment

# Every byte that is a digit maps to b"0", every other byte to b"x": a long
# digit run then shows as a run of b"0", which `in` finds with memmem. This is
# about 20x cheaper than a regular expression scan of the same bytes.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))
_LONG_RUN = b"0" * 19  # the shortest integer orjson may not hold exactly
_WIDE = float(2**63)


class JSONError(ValueError):
    """The bytes are not strict JSON, or the value cannot be written as JSON."""


class WideInteger(JSONError):
    """An integer outside -2**63 .. 2**64-1: refused, not rounded."""

    def __init__(self, path: str, value: Any) -> None:
        super().__init__(
            f"integers beyond 64 bits are not supported{f' (at {path})' if path else ''}; "
            "send such numbers as strings"
        )
        self.path = path
        self.value = value  # as orjson read it (the wide integer a float): for the reply's id


# Distinct suspicious floats checked against the text at most; beyond that
# the message is refused (each check is one memmem over the message).
_MAX_CHECKS = 64


def _find_wide(value: Any, data: bytes) -> str | None:
    """The path (dotted, as pydantic names fields) of the first number that
    orjson read as a float but the text wrote as an integer beyond 64 bits,
    or None. Such a float is integral and at least 2**63 in magnitude; a
    float literal of that size shows its mantissa in the text (1.5e19 holds
    "1.5"), an integer literal does not."""
    stack: list[tuple[str, Any]] = [("", value)]
    checked: dict[str, bool] = {}
    while stack:
        path, item = stack.pop()
        if isinstance(item, float):
            if abs(item) >= _WIDE and item.is_integer():
                mantissa = repr(abs(item)).split("e")[0]
                if mantissa not in checked:
                    if len(checked) >= _MAX_CHECKS:
                        return path
                    # A bare mantissa ("1" of 1e+20) stands before an exponent.
                    marks = (mantissa,) if "." in mantissa else (mantissa + "e", mantissa + "E")
                    checked[mantissa] = any(m.encode() in data for m in marks)
                if not checked[mantissa]:
                    return path
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}.{n}" if path else str(n), v) for n, v in enumerate(item))
    return None


def loads(data: bytes) -> Any:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JSONError(str(exc)) from None
    if _LONG_RUN in data.translate(_DIGITS_AS_ZERO):
        path = _find_wide(value, data)
        if path is not None:
            raise WideInteger(path, value)
    return value


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
