"""Reading conda repodata: its two record sections, the records in them, the package names.

A channel's ``<subdir>/repodata.json`` keeps one record per package file, ``.tar.bz2`` files
under ``packages`` and ``.conda`` files under ``packages.conda``; whoever reads records reads
both, through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..core.fsutil import read_json

SECTIONS = ("packages", "packages.conda")


def section_records(repodata: dict, key: str) -> dict[str, dict]:
    """The records of one section (``key``, one of SECTIONS) by file name; {} when absent."""
    return repodata.get(key, {})


def records(repodata: dict) -> Iterator[tuple[str, dict]]:
    """(file name, record) of every package file, both sections."""
    for key in SECTIONS:
        yield from section_records(repodata, key).items()


def package_names(repodata: dict) -> set[str]:
    return {record["name"] for _, record in records(repodata)}


def read_repodata(path: Path) -> dict:
    """The repodata at ``path``; {} when it is missing or not JSON (a subdir not indexed yet,
    or an index cut short: the next index run writes it whole)."""
    return read_json(path, {}) or {}


def repodata_files(channel_dir: Path) -> list[Path]:
    """Every ``<subdir>/repodata.json`` of a channel folder, in subdir order."""
    return sorted(channel_dir.glob("*/repodata.json"))


def repodata_stamps(channel_dir: Path) -> list[list]:
    """Subdir, inode, size and mtime of each repodata.json: an index replaces the file whole
    (a new inode), so equal stamps mean the same repodata."""
    stamps = []
    for path in repodata_files(channel_dir):
        stat = path.stat()
        stamps.append([path.parent.name, stat.st_ino, stat.st_size, stat.st_mtime_ns])
    return stamps


_names_cache: dict[tuple, frozenset[str]] = {}


def internal_package_names(channel_dir: Path) -> frozenset[str]:
    """Every package name in the channel's repodata. Up-to-date checks and builds of every
    image ask for it; at 20,000 packages parsing the repodata costs 0.1 s, so it is read
    again only when a repodata.json changed."""
    stamps = repodata_stamps(channel_dir)
    key = (str(channel_dir), *(tuple(stamp) for stamp in stamps))
    if key not in _names_cache:
        names: set[str] = set()
        for subdir, *_ in stamps:
            names |= package_names(read_repodata(channel_dir / subdir / "repodata.json"))
        _names_cache.clear()
        _names_cache[key] = frozenset(names)
    return _names_cache[key]
