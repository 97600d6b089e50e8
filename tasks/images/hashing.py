"""The content hash of an image, and the tags named by it.

The hash covers the image folder (its tests folder too: changed tests run again, against a
new tag), the exact internal packages it resolves to, the settings that shape the build and
repo2docker's version: a rebuilt internal package rebuilds exactly the images that use it, and
repo2docker's reuse of an existing tag never serves a stale image.
"""

from __future__ import annotations

import functools
import hashlib
import json

from ..core.fsutil import folder_files, tree_digest
from ..core.settings import Settings
from .discovery import Image
from .singleuser import singleuser_appendix
from .solve import Resolution


@functools.cache
def _repo2docker_version() -> str:
    # From its metadata: importing repo2docker to read __version__ takes a quarter second.
    from importlib.metadata import version

    return version("jupyter-repo2docker")


def image_hash(settings: Settings, image: Image, resolution: Resolution) -> str:
    digest = hashlib.sha256()
    files = [path for path in folder_files(image.folder)
             if ".pytest_cache" not in path.relative_to(image.folder).parts]  # pytest by hand
    digest.update(tree_digest(image.folder, files).encode())
    digest.update(json.dumps({
        "internal": resolution.packages,
        "alias": settings.images.channel_alias,
        "user": [settings.images.user_name, settings.images.user_id],
        "repo2docker": _repo2docker_version(),
    }, sort_keys=True).encode())
    appendix = singleuser_appendix(image, settings.hub.jupyterhub_version)
    if appendix:  # environment.yml images follow the hub's JupyterHub release
        digest.update(appendix.encode())
    return digest.hexdigest()[:16]


def tags_for(settings: Settings, image: Image, content_hash: str) -> tuple[str, str]:
    """The image's content-hash tag and its ``latest`` tag."""
    repository = f"{settings.images.prefix.rstrip('/')}/{image.name}"
    return f"{repository}:{content_hash}", f"{repository}:latest"
