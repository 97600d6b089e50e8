"""The doit task creator ``task_build_images``: one subtask per folder of images/."""

from __future__ import annotations

from ..core.errors import HubworksError
from ..core.settings import Settings
from ..core.workspace import current_settings
from ..recipes.build import package_makers
from ..recipes.recipe import spec_name
from .build import build_image
from .current import image_is_current
from .discovery import Image, discover_images
from .specs import internal_specs


def recipes_needed(settings: Settings, image: Image, makers: dict[str, str]) -> list[str]:
    """The recipes that make the internal packages ``image`` names (``makers``: package
    name -> recipe). Their packages' own dependencies follow from the recipes' graph."""
    if image.problem:
        return []
    try:
        specs = internal_specs(image, settings.images.channel_alias, set(makers))
    except HubworksError:
        return []  # an unreadable environment.yml: the image's build names it
    return sorted({makers[name] for name in map(spec_name, specs) if name in makers})


def task_build_images():
    """Build the images in images/ with repo2docker, serving the channel meanwhile."""
    settings = current_settings()
    images = discover_images(settings.images_dir)
    # With channel.url the packages come from a published channel: no local recipes or
    # index to wait for (an image runner has neither).
    local = not settings.channel.url
    makers = package_makers(settings) if images and local else {}
    # Every recipe first, so `doit build_images` fails at its end when one failed; an image
    # waits only for the recipes it uses, so under --continue the others still build.
    yield {"name": None, "doc": task_build_images.__doc__,
           "task_dep": ["build_recipes"] if local else []}
    for name, image in images.items():
        task = {
            "name": name,
            "doc": f"build images/{name} ({image.kind})",
            "actions": [(build_image, [settings, image])],
            "task_dep": ["index_channel"] + [f"build_recipes:{recipe}" for recipe
                                             in recipes_needed(settings, image, makers)]
                        if local else [],
            "uptodate": [lambda task, values, image=image: image_is_current(settings, image)],
            "meta": {"what": f"image '{name}'",
                     "interrupted": "nothing is tagged or recorded; the next run builds it "
                                    "again"},
        }
        yield task
