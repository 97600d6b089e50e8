"""What a build records: ``<state>/images/<name>.json`` (tags, hash, engine, packages, time).

The hub reads these records to offer the built images, so this module imports nothing beyond
the standard library, ``fsutil`` and ``settings``.
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


def write_image_record(settings: Settings, name: str, *, tag: str, latest: str,
                       content_hash: str, engine: str, internal_packages: list[dict]) -> None:
    atomic_write_json(image_record_path(settings, name), {
        "name": name, "tag": tag, "latest": latest, "hash": content_hash,
        "engine": engine, "internal_packages": internal_packages,
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })


def built_image_tags(settings: Settings) -> list[str]:
    """Content-hash tags of the images build_images produced, by image name."""
    folder = image_records_dir(settings)
    if not folder.is_dir():
        return []
    records = (read_json(p, {}) for p in sorted(folder.glob("*.json")))
    return [record["tag"] for record in records if record.get("tag")]
