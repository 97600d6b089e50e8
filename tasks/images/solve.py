"""Preflight: an image's internal specs solved against the channel with rattler's solver.

A missing package or version fails in seconds, by name, before any engine runs. For
channel/ itself a solve is kept (``<state>/images/<name>/resolved.json``) and reused by
up-to-date checks while neither the specs nor the repodata changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..channel.repodata import repodata_stamps
from ..channel.source import channel_package_names, published_channel_url
from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_json, read_json
from ..core.settings import Settings
from ..recipes.recipe import spec_name
from .discovery import Image
from .specs import internal_specs


@dataclass
class Resolution:
    specs: list[str]
    packages: list[dict] = field(default_factory=list)  # name, version, build, sha256

    def describe(self) -> str:
        return ", ".join(f"{p['name']} {p['version']}" for p in self.packages) or "none"


async def _resolve(specs: list[str], channel_url: str, cache_dir: Path,
                   internal_names: set[str]) -> Resolution:
    import rattler

    platform = str(rattler.Subdir.current())
    gateway = rattler.Gateway(cache_dir=cache_dir)
    channel = rattler.Channel(channel_url)
    names = sorted({spec_name(s) for s in specs})
    found = await gateway.query([channel], [platform, "noarch"], names, recursive=False)
    available: dict[str, list] = {}
    for records in found:
        for record in records:
            available.setdefault(record.name.normalized, []).append(record)
    for spec in specs:
        name, match = spec_name(spec), rattler.MatchSpec(spec)
        candidates = available.get(name, [])
        if not candidates:
            have = ", ".join(sorted(internal_names)) or "no packages"
            raise HubworksError(f"the internal channel has no package '{name}' "
                                f"(it has: {have})")
        if not any(match.matches(r) for r in candidates):
            versions = ", ".join(sorted({str(r.version) for r in candidates}, reverse=True))
            raise HubworksError(f"no version of {name} in the internal channel matches "
                                f"'{spec}' (it has {versions})")
    try:
        solved = await rattler.solve(
            [channel], specs, gateway=gateway, platforms=[platform, "noarch"],
            virtual_packages=rattler.VirtualPackage.detect())
    except Exception as exc:
        raise HubworksError("the internal packages cannot be installed together: "
                            + " ".join(str(exc).split())) from None
    packages = sorted(({"name": r.name.normalized, "version": str(r.version),
                        "build": str(r.build), "sha256": r.sha256.hex() if r.sha256 else ""}
                       for r in solved), key=lambda p: p["name"])
    return Resolution(specs, packages)


def resolve_internal(settings: Settings, image: Image, channel_url: str,
                     internal_names: set[str] | None = None, *, reuse: bool = False
                     ) -> Resolution:
    """Solve the image's internal requirements against the channel at ``channel_url``.

    With ``reuse`` (up-to-date checks), an earlier solve of the same specs against the same
    channel/ repodata is used again instead; builds always solve against what they use.
    """
    if internal_names is None:
        internal_names = channel_package_names(settings)  # channel/, or channel.url's
    specs = internal_specs(image, settings.images.channel_alias, internal_names)
    if not specs:
        return Resolution([])
    # channel/ itself: the same specs against the same repodata solve the same way, so an
    # up-to-date check needs no solver while neither changed. A published channel is asked.
    key = None if published_channel_url(settings) else _resolution_key(settings, specs)
    solved = settings.state("images", image.name, "resolved.json")
    if key is not None and reuse:
        known = read_json(solved, {})
        if isinstance(known, dict) and known.get("key") == key:
            return Resolution(specs, known["packages"])
    import asyncio  # here, not at the top: a no-op run does not need it

    try:
        resolution = asyncio.run(_resolve(specs, channel_url, settings.state("rattler-cache"),
                                          internal_names))
    except HubworksError as exc:
        raise HubworksError(
            f"image '{image.name}': {exc.message}.",
            fix=f"build the package (add or fix its recipe in recipes/), or change the "
                f"requirement in {image.env_file or image.dockerfile}") from None
    if key is not None:
        atomic_write_json(solved, {"key": key, "packages": resolution.packages})
    return resolution


def _resolution_key(settings: Settings, specs: list[str]) -> str:
    """What solving ``specs`` against channel/ depends on: the specs, every repodata.json
    (replaced whole on each index, so its inode, size and time tell one from another) and
    the platform the solver assumes."""
    repodata = repodata_stamps(settings.channel_dir)
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names \
        else ""
    return hashlib.sha256(json.dumps([specs, repodata, sys.platform, platform.machine(), libc])
                          .encode()).hexdigest()

