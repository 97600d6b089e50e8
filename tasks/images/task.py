"""The doit task creator ``task_build_images``: one subtask per folder of images/."""

from __future__ import annotations

import hashlib
from contextlib import suppress

from ..core.deferred import deferred
from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_json, folder_files, read_json
from ..core.settings import Settings
from ..core.workspace import current_settings
from ..recipes.build import package_makers
from ..recipes.recipe import spec_name
from .discovery import ENVIRONMENT_FILE, Image, discover_images

NEEDED_FILE = "images-recipes-needed.json"  # in the state folder: what the last load found
NEEDED_FORMAT = 1  # raise when what recipes_needed() finds in the same files changes


def recipes_needed(settings: Settings, image: Image, makers: dict[str, str]) -> list[str]:
    """The recipes that make the internal packages ``image`` names (``makers``: package
    name -> recipe). Their packages' own dependencies follow from the recipes' graph."""
    if image.problem:
        return []
    from .specs import internal_specs  # YAML and rattler: only when the files changed

    try:
        specs = internal_specs(image, settings.images.channel_alias, set(makers))
    except HubworksError:
        return []  # an unreadable environment.yml: the image's build names it
    return sorted({makers[name] for name in map(spec_name, specs) if name in makers})


def kept_recipes_needed(settings: Settings, images: dict[str, Image],
                        makers: dict[str, str]) -> dict[str, list[str]]:
    """recipes_needed() of every image, read again only for an image whose environment
    files or Dockerfile, or the recipes' outputs, changed since the last load."""
    path = settings.state(NEEDED_FILE)
    kept = read_json(path, {}) or {}
    found = {}
    for name, image in images.items():
        digest = hashlib.sha256(repr((NEEDED_FORMAT, settings.images.channel_alias,
                                      sorted(makers.items()), str(image.problem or ""))
                                     ).encode())
        files = [p for p in folder_files(image.folder) if p.name == ENVIRONMENT_FILE]
        try:
            for file in files + ([image.dockerfile] if image.dockerfile else []):
                digest.update(f"|{file}|".encode() + file.read_bytes())
        except OSError:  # unreadable: not kept; the image's build names the file
            digest.update(b"|unreadable")
        key = digest.hexdigest()
        entry = kept.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == key):
            entry = [key, recipes_needed(settings, image, makers)]
        found[name] = entry
    if found != kept:
        with suppress(OSError):  # unwritten, it is only read again next time
            atomic_write_json(path, found)
    return {name: entry[1] for name, entry in found.items()}


def task_build_images():
    """Build the images in images/ with repo2docker, serving the channel meanwhile."""
    settings = current_settings()
    images = discover_images(settings.images_dir)
    # With channel.url the packages come from a published channel: no local recipes or
    # index to wait for (an image runner has neither).
    local = not settings.channel.url
    makers = package_makers(settings) if images and local else {}
    needed = kept_recipes_needed(settings, images, makers) if local else {}
    # Every recipe first, so `doit build_images` fails at its end when one failed; an image
    # waits only for the recipes it uses, so under --continue the others still build.
    yield {"name": None, "doc": task_build_images.__doc__,
           "task_dep": ["build_recipes"] if local else []}
    for name, image in images.items():
        task = {
            "name": name,
            "doc": f"build images/{name} ({image.kind})",
            "actions": [(deferred("tasks.images.build", "build_image"), [settings, image])],
            "task_dep": ["index_channel"] + [f"build_recipes:{recipe}" for recipe
                                             in needed[name]]
                        if local else [],
            "uptodate": [(deferred("tasks.images.current", "image_is_current"),
                          [settings, image])],
            "meta": {"what": f"image '{name}'",
                     "interrupted": "nothing is tagged or recorded; the next run builds it "
                                    "again"},
        }
        yield task
