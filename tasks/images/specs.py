"""The internal package specs an image names, which the internal channel is to provide.

Which ones: the dependencies of every environment.yml in the image that lists the channel
alias (all of them when the alias is its only channel, ``internal::name`` always); for a
Dockerfile, also every internal package name its text mentions.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import HubworksError
from ..core.fsutil import folder_files
from ..recipes.recipe import spec_name
from .discovery import ENVIRONMENT_FILE, Image


def _load_yaml(path: Path):
    from ruamel.yaml import YAML

    try:
        return YAML(typ="safe").load(path.read_text()) or {}
    except Exception as exc:
        raise HubworksError(f"{path} is not valid YAML: {' '.join(str(exc).split())}",
                            fix="correct the file") from None


def _checked_spec(image: Image, env_file: Path, entry: str, spec: str) -> str:
    """``spec`` as the solver will read it; an invalid one is named with its file."""
    import rattler

    try:
        rattler.MatchSpec(spec)
    except Exception as exc:  # rattler's InvalidMatchSpecError
        where = env_file.relative_to(image.folder.parent.parent)  # images/<name>/...
        raise HubworksError(
            f"image '{image.name}': {where} lists {entry!r} under dependencies, which is not "
            f"a valid conda package spec ({' '.join(str(exc).split())}).",
            fix="write it as a name with an optional version, e.g. 'tool', 'tool >=1.2', "
                "'tool 1.2.*' or 'internal::tool =1.2'") from None
    return spec


def one_edit_apart(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with one letter added, dropped, changed or two swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diffs) == 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1
                                   and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _refuse_alias_typo(image: Image, env_file: Path, alias: str, channel: str) -> None:
    """A channel one edit away from the alias is a typo that would send the build to
    conda-forge for an internal package (or fail there much later, by another name)."""
    if one_edit_apart(alias, channel):
        where = env_file.relative_to(image.folder.parent.parent)
        raise HubworksError(
            f"image '{image.name}': {where} names the channel {channel!r}, one letter away "
            f"from the internal channel's alias {alias!r}: likely a typo.",
            fix=f"write {alias!r} (images.channel_alias), or, if {channel!r} is a real "
                f"channel, give it by its URL")


def internal_specs(image: Image, alias: str, internal_names: set[str]) -> list[str]:
    """The image's requirements that the internal channel is to provide."""
    specs: list[str] = []
    env_files = [p for p in folder_files(image.folder) if p.name == ENVIRONMENT_FILE]
    for env_file in env_files:
        data = _load_yaml(env_file)
        channels = [str(c) for c in data.get("channels") or []]
        for channel in channels:
            _refuse_alias_typo(image, env_file, alias, channel)
        for entry in data.get("dependencies") or []:
            if not isinstance(entry, str):
                continue  # a pip: section
            channel, _, spec = entry.rpartition("::")
            if channel:
                _refuse_alias_typo(image, env_file, alias, channel)
            if spec_name(spec) is None:
                continue  # not a package spec; the build's own solver will say so
            if channel == alias or (alias in channels and (
                    spec_name(spec) in internal_names or channels == [alias]
                    or set(channels) == {alias, "nodefaults"})):
                specs.append(_checked_spec(image, env_file, entry, spec.strip()))
    if image.dockerfile:
        text = image.dockerfile.read_text()
        for name in sorted(internal_names):
            # The name as a word, or as the start of a package file name (name-1.2-h0_0).
            if re.search(rf"(?<![\w.-]){re.escape(name)}(?=$|[^\w.-]|-\d)", text):
                specs.append(name)
    return sorted(set(specs))
