"""build_images' up-to-date rule: the image's hash is unchanged and the engine still has it.

With ``images.push`` the registry decides instead (a fresh CI runner has no records and an
empty engine). The first question of a run asks the engine for every recorded tag at once.
"""

from __future__ import annotations

from ..channel.source import preflight_channel_url
from ..core.settings import Settings
from .discovery import Image
from .engines import Engine, select_engine
from .hashing import image_hash
from .records import built_image_tags, read_image_record
from .solve import resolve_internal


def image_is_current(settings: Settings, image: Image) -> bool:
    """Up to date: same hash as the last build, and the engine still has that image."""
    if settings.images.push and not image.problem:
        # A fresh CI runner has no records and an empty engine: the registry decides.
        from .registry import image_in_registry

        return image_in_registry(settings, image)
    record = read_image_record(settings, image.name)
    # after failed tests the record is of the build users keep: build (or reuse) and test again
    if not record or image.problem or record.get("state", "built") != "built":
        return False
    try:
        resolution = resolve_internal(settings, image, preflight_channel_url(settings),
                                      reuse=True)
        if image_hash(settings, image, resolution) != record["hash"]:
            return False
        return _engine_has(select_engine(settings.images.engine), record["tag"], settings)
    except Exception:  # anything unclear: build, and let the build say what is wrong
        return False


_confirmed: dict[tuple, frozenset[str]] = {}


def _engine_has(engine: Engine, tag: str, settings: Settings) -> bool:
    """Whether the engine has the image ``tag``. The first question of a run asks for every
    recorded tag at once, one engine call instead of one per image; a tag that call did not
    confirm is asked alone."""
    tags = tuple(built_image_tags(settings))
    key = (engine.cli, tags)
    if key not in _confirmed:
        _confirmed[key] = frozenset(tags) if tags and engine.images_exist(tags) else frozenset()
    return tag in _confirmed[key] or engine.image_exists(tag)
