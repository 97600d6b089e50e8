"""The staged copy of an image folder that repo2docker builds; ``images/`` is never modified.

In the copy the channel alias in every environment.yml is replaced by the channel URL for
builds, and a comment names the exact internal packages the build resolved. The image's tests
folder is left out: tests run against the image, they are not part of it, and changing them
then rebuilds no layer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .discovery import ENVIRONMENT_FILE, Image
from .image_tests import TESTS_FOLDER
from .solve import Resolution


def _tests_folder(root: Path):
    """shutil.copytree's ignore: the tests folder at the image folder's top only."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [TESTS_FOLDER] if Path(folder) == root and TESTS_FOLDER in names else []
    return ignore


def stage_image(image: Image, target: Path, alias: str, channel_url: str,
                resolution: Resolution) -> Path:
    """Copy the image folder, replacing the channel alias in every environment.yml.

    Each staged environment.yml also names the exact internal packages (with sha256) in a
    comment: the engine's layer cache keys on the file's bytes, so a rebuilt internal
    package invalidates exactly the layers that install it.
    """
    from ruamel.yaml import YAML

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(image.folder, target, symlinks=True, ignore=_tests_folder(image.folder))
    yaml = YAML()  # round-trip: comments and layout survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    for env_file in target.rglob(ENVIRONMENT_FILE):
        data = yaml.load(env_file.read_text())
        if not data:
            continue
        channels = data.get("channels") or []
        for i, channel in enumerate(channels):
            if str(channel) == alias:
                channels[i] = channel_url
        dependencies = data.get("dependencies") or []
        for i, entry in enumerate(dependencies):
            if isinstance(entry, str) and entry.startswith(f"{alias}::"):
                dependencies[i] = channel_url.rstrip("/") + "::" + entry[len(alias) + 2:]
        pins = "".join(f"#   {p['name']} {p['version']} {p['build']} sha256:{p['sha256']}\n"
                       for p in resolution.packages)
        with env_file.open("w") as handle:
            if pins:
                handle.write("# internal packages resolved for this build:\n" + pins)
            yaml.dump(data, handle)
    return target
