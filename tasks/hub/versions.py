"""Version numbers as programs print them, and npm ``engines`` ranges (semantic_version)."""

from __future__ import annotations

import re
from typing import Sequence

# npm's semver reads ">= 20", ">=v20" and runs of spaces as ">=20"; NpmSpec only the tight form
_OPERATOR_GAP = re.compile(r"([<>=^~]+)\s*v?(?=[\dxX*])")
_LEADING_V = re.compile(r"(?<![\w.+-])v(?=\d)")


def parse_version(text: str) -> tuple[int, ...]:
    """'v20.1.0' -> (20, 1, 0); pre-release suffixes are ignored."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def show_version(version: Sequence[int]) -> str:
    return ".".join(str(part) for part in version)


def satisfies(version: Sequence[int], spec: str) -> bool:
    """Whether the release ``version`` meets an npm ``engines`` range as npm reads it:
    comparators, ``^``, ``~``, ``x``, hyphen ranges, ``||``, and bounds that name a
    pre-release (``>=22.0.0-rc.1``). A range npm cannot read is met by no version, as in
    npm's own check. (Versions are read as releases: ``parse_version`` drops pre-release
    tags, and npm's install with --engine-strict has the last word.)
    """
    from semantic_version import NpmSpec, Version

    text = " ".join(spec.split())
    if not text:
        return True
    try:
        wanted = NpmSpec(_LEADING_V.sub("", _OPERATOR_GAP.sub(r"\1", text)))
    except ValueError:
        return False
    major, minor, patch = (list(version[:3]) + [0, 0, 0])[:3]
    return wanted.match(Version(major=major, minor=minor, patch=patch))
