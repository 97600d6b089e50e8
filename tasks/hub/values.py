"""hub_values: a zero-to-jupyterhub values file offering every pushed image.

``doit hub_values`` writes ``hub.values_file`` (default ``hub-values.yaml``), for
``helm upgrade --install <release> jupyterhub/jupyterhub --values hub-values.yaml``.
``singleuser.profileList`` (KubeSpawner's ``profile_list``) has one profile per image in
``images/``: its name, its content-hash tag and internal packages in the description, and
``kubespawner_override.image`` set to that tag; ``hub.default_image`` (else the first image)
is the default and also ``singleuser.image``. The tags are the ones the channel gives now,
and each must be in the registry (``images.push``) or, without push, in the local engine:
a missing one fails the task by name instead of offering users an image that cannot start.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from ..core.errors import HubworksError, reports_errors
from ..core.fsutil import atomic_write_bytes
from ..core.reporter import print_line
from ..core.settings import Settings
from ..core.workspace import current_settings

if TYPE_CHECKING:
    from ..images.registry import ImageStatus

HEADER = ("# zero-to-jupyterhub values written by `doit hub_values` (hubworks) from images/\n"
          "# and the registry; re-run it rather than editing. Use with:\n"
          "#   helm upgrade --install <release> jupyterhub/jupyterhub --values <this file>\n")


def _describe(tag: str, packages: list[dict]) -> str:
    internal = ", ".join(f"{p['name']} {p['version']}" for p in packages) or "none"
    return f"{tag} | internal packages: {internal}"


def hub_values(settings: Settings) -> dict:
    """The values: a profile per image, the default one marked and set as the image."""
    from ..images.discovery import discover_images
    from ..images.registry import image_status

    images = discover_images(settings.images_dir)
    default = _default_image(settings, images)
    statuses = [image_status(settings, image) for image in images.values()]
    _require_present(settings, statuses)
    repository, _, tag = next(s.tag for s in statuses if s.name == default).rpartition(":")
    return {"singleuser": {
        "image": {"name": repository, "tag": tag},
        "uid": settings.images.user_id,
        "profileList": [_profile(status, default) for status in statuses],
    }}


def _default_image(settings: Settings, images: dict) -> str:
    """hub.default_image, else the first image; refused when it is not an image."""
    if not images:
        raise HubworksError(f"{settings.images_dir} holds no images to offer.",
                            fix="add an image folder to images/ and build it")
    default = settings.hub.default_image or next(iter(images))
    if default not in images:
        raise HubworksError(
            f"hub.default_image is {default!r}, which is not an image in "
            f"{settings.images_dir}.", fix=f"use one of: {', '.join(images)}")
    return default


def _require_present(settings: Settings, statuses: list[ImageStatus]) -> None:
    """Every current tag exists where users' servers pull it from."""
    missing = [s for s in statuses if not s.present]
    if missing:
        where = "the registry" if settings.images.push else "the local engine"
        raise HubworksError(
            f"{where} lacks the current tag of: "
            + ", ".join(f"{s.name} ({s.tag})" for s in missing) + ".",
            fix="build and push them first (doit build_images; in CI, doit image_matrix lists "
                "them), then run hub_values again")


def _profile(status: ImageStatus, default: str) -> dict:
    """KubeSpawner's profile of one image."""
    profile = {"display_name": status.name, "slug": status.name,
               "description": _describe(status.tag, status.packages),
               "kubespawner_override": {"image": status.tag}}
    if status.name == default:
        profile["default"] = True
    return profile


def _quoted_for_yaml_1_1(value):
    """``value`` with every string that a YAML 1.1 reader would take for another type
    (``on``, ``no``, ``010``, ``1:20``, ``2024-01-01``) in double quotes. Helm's reader
    follows YAML 1.1; ruamel writes YAML 1.2 and quotes only what 1.2 would misread."""
    from ruamel.yaml.nodes import ScalarNode
    from ruamel.yaml.resolver import VersionedResolver
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, dict):
        return {key: _quoted_for_yaml_1_1(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_quoted_for_yaml_1_1(item) for item in value]
    if isinstance(value, str):
        tag = VersionedResolver(version=(1, 1)).resolve(ScalarNode, value, (True, False))
        if tag != "tag:yaml.org,2002:str":
            return DoubleQuotedScalarString(value)
    return value


def render_values(values: dict) -> str:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 4096  # one line per description
    buffer = io.StringIO()
    yaml.dump(_quoted_for_yaml_1_1(values), buffer)
    return HEADER + buffer.getvalue()


@reports_errors
def write_hub_values(settings: Settings) -> None:
    values = hub_values(settings)
    target = settings.hub.values_file
    text = render_values(values)
    profiles = values["singleuser"]["profileList"]
    default = next(p["display_name"] for p in profiles if p.get("default"))
    if target.is_file() and target.read_text() == text:
        print_line(f"   {target} is up to date ({len(profiles)} images, default {default})")
        return
    atomic_write_bytes(target, text.encode())
    print_line(f"   wrote {target}: {len(profiles)} images, default {default}")


def task_hub_values():
    """Write hub.values_file: zero-to-jupyterhub values offering every pushed image."""
    settings = current_settings()
    return {"actions": [(write_hub_values, [settings])], "uptodate": [False], "verbosity": 2}
