"""What a failed build's log says a user can act on, and the error that tells them."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.commands import failed_build_log
from ..core.errors import HubworksError
from ..core.settings import Settings

_UNREACHABLE = [
    re.compile(r"lookup ([A-Za-z0-9.-]+\.[A-Za-z]{2,})"),
    re.compile(r"[Cc]ould not resolve host:? ([A-Za-z0-9.-]+)"),
    re.compile(r"(?:pinging container registry|initializing source docker://) ?([A-Za-z0-9.-]+)"),
    re.compile(r"[Ff]ailed to connect to ([A-Za-z0-9.-]+)"),
    re.compile(r"error sending request for url \(https?://([A-Za-z0-9.-]+)"),
    re.compile(r"[Tt]emporary failure in name resolution.*?([A-Za-z0-9.-]+\.[A-Za-z]{2,})"),
    re.compile(r"https?://([A-Za-z0-9.-]+)[^\s]*: (?:dial tcp|connect|Network is unreachable)"),
]


def unreachable_hosts(log_text: str) -> list[str]:
    hosts: list[str] = []
    for pattern in _UNREACHABLE:
        for match in pattern.finditer(log_text):
            host = match.group(1).strip(".")
            if "." in host and host not in hosts and host != "127.0.0.1":
                hosts.append(host)
    return hosts


def diagnose(log_text: str) -> tuple[str, str]:
    """What a failed build's log says a user can act on: extra lines, and the fix."""
    short = re.search(r'short-name "([^"]+)" did not resolve', log_text)
    if short:
        name = short.group(1)
        full = f"docker.io/{name if '/' in name else 'library/' + name}"
        return (f"\n  podman cannot tell which registry the base image '{name}' comes from "
                f"(it has no unqualified-search registries configured).",
                f"name the base image with its registry in the FROM line, e.g. {full} "
                f"for Docker Hub")
    hosts = unreachable_hosts(log_text)
    if hosts:
        return (f"\n  the build could not reach: {', '.join(hosts)}. Builds pull base images "
                f"from registries, and environment.yml images conda-forge packages too.",
                "give this machine access to those hosts (directly or through a proxy in "
                "HTTPS_PROXY), or build where it has it; then run build_images again")
    if re.search(r"while running runtime|crun|runc|creating container for", log_text):
        return ("\n  the engine could not start the build's RUN containers here.",
                'with podman, set images.isolation = "chroot" (HUBWORKS_IMAGES_ISOLATION=chroot)')
    return "", "fix the cause the log names, then run build_images again"


def build_failure(settings: Settings, image_name: str, returncode: int, log: Path
                  ) -> HubworksError:
    """The error of a failed build: what its log says, its last lines, and where it is."""
    notes, fix = diagnose(log.read_text(errors="replace"))
    return HubworksError(
        f"image '{image_name}' failed to build (repo2docker exited with status "
        f"{returncode}).{notes}\n" + failed_build_log(log, settings.recipes.log_tail), fix=fix)
