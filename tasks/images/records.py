"""What a build records: ``<state>/images/<name>.json`` (tags, hash, engine, packages, time).

The hub reads these records to offer the built images, so this module imports nothing beyond
the standard library, ``fsutil`` and ``settings``.

A record describes the last build that reached users (``tag``, ``hash``, ``built``, ...) and
the image's ``state``:

- ``built``: that build is the latest; ``tests`` sums up its image tests (``summary``, the
  counts, ``log``), ``{}`` when the image has none;
- ``tests failed``: a later build's tests failed, so it was not tagged latest, pushed or
  offered; ``tests_failed`` has its ``tag``, ``hash``, time (``at``), ``summary``, each failed
  test with its output (``failures``: ``test``, ``when``, ``output``) and the ``log``. An image
  whose tests never passed has no ``tag``: the hub offers nothing of it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from ..core.fsutil import atomic_write_json, read_json
from ..core.settings import Settings


def image_records_dir(settings: Settings) -> Path:
    return settings.state("images")


def image_record_path(settings: Settings, name: str) -> Path:
    """The build record of the image ``name``."""
    return image_records_dir(settings) / f"{name}.json"


def read_image_record(settings: Settings, name: str) -> dict:
    """The image's last build record, or {} when it has none."""
    return read_json(image_record_path(settings, name), {}) or {}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_image_record(settings: Settings, name: str, *, tag: str, latest: str,
                       content_hash: str, engine: str, internal_packages: list[dict],
                       tests: dict | None = None) -> None:
    atomic_write_json(image_record_path(settings, name), {
        "name": name, "tag": tag, "latest": latest, "hash": content_hash,
        "engine": engine, "internal_packages": internal_packages,
        "built": _now(), "state": "built", "tests": tests or {},
    })


def record_failed_tests(settings: Settings, name: str, *, tag: str, content_hash: str,
                        summary: str, failures: list[dict], log: str) -> dict:
    """Say that the build ``tag`` failed its tests; the rest of the record (the build users
    keep) stays as it was. The record as it was before."""
    previous = read_image_record(settings, name)
    atomic_write_json(image_record_path(settings, name), {
        **previous, "name": name, "state": "tests failed",
        "tests_failed": {"tag": tag, "hash": content_hash, "at": _now(), "summary": summary,
                         "failures": failures, "log": log},
    })
    return previous


def built_image_tags(settings: Settings) -> list[str]:
    """Content-hash tags of the images build_images produced, by image name."""
    folder = image_records_dir(settings)
    if not folder.is_dir():
        return []
    records = (read_json(p, {}) for p in sorted(folder.glob("*.json")))
    return [record["tag"] for record in records if record.get("tag")]
