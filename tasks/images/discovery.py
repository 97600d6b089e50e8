"""What an image folder holds: the folders of images/ and what repo2docker builds each from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HubworksError

# What repo2docker can build from (any one is enough); see its buildpacks.
REPO2DOCKER_FILES = (
    "environment.yml", "requirements.txt", "Pipfile", "Pipfile.lock", "setup.py",
    "pyproject.toml", "Project.toml", "REQUIRE", "install.R", "DESCRIPTION", "apt.txt",
    "postBuild", "start", "runtime.txt", "Dockerfile", "default.nix", "manifest.xml",
)
ENVIRONMENT_FILE = "environment.yml"
# A folder's name becomes the last part of its tags (<prefix>/<name>:<hash>): the container
# reference grammar's path component, which Docker and podman both enforce.
IMAGE_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
IMAGE_NAME_RULE = ("lowercase letters and digits, joined by single '.' or '_', '__', or "
                   "dashes; starting and ending with a letter or digit")


@dataclass
class Image:
    name: str
    folder: Path
    config_dir: Path | None = None    # where repo2docker looks: binder/, .binder/ or the root
    env_file: Path | None = None
    dockerfile: Path | None = None
    problem: HubworksError | None = None  # why it cannot be built

    @property
    def kind(self) -> str:
        return "Dockerfile" if self.dockerfile else "environment.yml" if self.env_file else \
            "repo2docker"


def read_image(folder: Path) -> Image:
    image = Image(folder.name, folder)
    if not IMAGE_NAME.fullmatch(folder.name) or len(folder.name) > 128:
        suggestion = re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("._-") or "image"
        image.problem = HubworksError(
            f"image folder {folder.parent.name}/{folder.name}/ cannot name an image: its name "
            f"becomes the image's tag, which allows only {IMAGE_NAME_RULE} (at most 128).",
            fix=f"rename the folder, e.g. to {folder.parent.name}/{suggestion}/")
        return image
    # repo2docker reads binder/ (or .binder/) instead of the root when it exists.
    image.config_dir = next(
        (c for c in (folder / "binder", folder / ".binder") if c.is_dir()), folder)
    found = [f for f in REPO2DOCKER_FILES if (image.config_dir / f).is_file()]
    if not found:
        where = Path(folder.parent.name, image.config_dir.relative_to(folder.parent))
        image.problem = HubworksError(
            f"image '{image.name}': {where}/ has nothing repo2docker can build from.",
            fix=f"add an environment.yml (conda packages), a requirements.txt, or a "
                f"Dockerfile to {where}/")
    if "Dockerfile" in found:
        image.dockerfile = image.config_dir / "Dockerfile"
    if ENVIRONMENT_FILE in found:
        image.env_file = image.config_dir / ENVIRONMENT_FILE
    return image


def discover_images(images_dir: Path) -> dict[str, Image]:
    if not images_dir.is_dir():
        return {}
    return {p.name: read_image(p) for p in sorted(images_dir.iterdir())
            if p.is_dir() and not p.name.startswith(".")}
