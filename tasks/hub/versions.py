"""Version numbers as programs print them, and npm ``engines`` ranges."""

from __future__ import annotations

import re
from typing import Sequence



def parse_version(text: str) -> tuple[int, ...]:
    """'v20.1.0' -> (20, 1, 0); pre-release suffixes are ignored."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def show_version(version: Sequence[int]) -> str:
    return ".".join(str(part) for part in version)


def satisfies(version: Sequence[int], spec: str) -> bool:
    """Whether ``version`` meets an npm ``engines`` range (>=, >, <, <=, =, x, ||)."""
    for alternative in spec.split("||"):
        words = re.findall(r"(>=|<=|>|<|=|\^|~)?\s*v?([\dx*]+(?:\.[\dx*]+)*)", alternative)
        if words and all(_meets(version, op, bound) for op, bound in words):
            return True
    return not spec.strip() or spec.strip() == "*"


def _meets(version: Sequence[int], op: str, bound: str) -> bool:
    parts = [p for p in bound.split(".") if p not in ("x", "*")]
    want = tuple(int(p) for p in parts)
    have = tuple(version[: len(want)]) if op in ("", "=", "^", "~") else tuple(version)
    if op == "^":
        return tuple(version) >= want and version[0] == want[0]
    if op == "~":
        return tuple(version) >= want and tuple(version[:2]) == want[:2]
    return {">=": have >= want, ">": have > want, "<=": have <= want, "<": have < want,
            "=": have == want, "": have == want}[op]
