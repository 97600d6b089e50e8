"""Container engines for image builds: Docker with buildx, or podman 4.x and later.

``select_engine()`` picks one (setting ``images.engine``: auto, docker or podman) and returns
an ``Engine``: the CLI to call for image housekeeping (exists, id, tag, push, remove) and the
name of the repo2docker engine that builds with it.

``tasks.images.podman_engine.PodmanEngine`` is the repo2docker engine for podman, registered as
``hubworks-podman`` under the ``repo2docker.engines`` entry point; only repo2docker loads it
(importing repo2docker takes a fifth of a second, which a no-op build never spends).

Podman stores short names under ``localhost/`` (``hubworks/foo:1`` is
``localhost/hubworks/foo:1``); podman resolves the short form itself, so both forms work.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from ..core.errors import HubworksError
from ..core.settings import declared

PROBE_SECONDS = 5  # a Docker daemon that does not answer within this counts as absent
PODMAN_FIX = "install podman from the package manager (e.g. apt-get install podman)"
CHOICE_FIX = "or set images.engine (HUBWORKS_IMAGES_ENGINE) to an engine that works here"

_probes: dict[tuple, str] = {}


def _probe(*cmd: str) -> str:
    """Why ``cmd`` fails here ('' when it works); asked once per process and environment."""
    key = (cmd, os.environ.get("PATH"), os.environ.get("DOCKER_HOST"))
    if key not in _probes:
        _probes[key] = _run_probe(cmd)
    return _probes[key]


def _run_probe(cmd: tuple[str, ...]) -> str:
    shown = "`" + " ".join(cmd) + "`"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_SECONDS,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"`{cmd[0]}` is not on PATH"
    except subprocess.TimeoutExpired:
        return f"{shown} did not answer within {PROBE_SECONDS} s"
    if proc.returncode == 0:
        return ""
    return f"{shown} failed: {output_line(proc.stderr or proc.stdout)}"


def output_line(text: str, index: int = 0) -> str:
    """One line of a command's output: the first names the problem, or the last for pushes."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[index] if lines else "no output"


def docker_problem() -> str:
    """Why Docker cannot build images here, or ''."""
    if "podman" in os.environ.get("DOCKER_HOST", ""):
        # repo2docker's docker engine would then drive podman and fail its buildx check
        return "DOCKER_HOST names podman, which the hubworks-podman engine drives"
    return _probe("docker", "info") or _probe("docker", "buildx", "version")


def podman_problem() -> str:
    """Why podman cannot build images here, or ''."""
    return _probe("podman", "version")


def _registry(ref: str) -> str:
    """The registry a push of ``ref`` goes to: its first part when that names a host."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


@dataclass
class Engine:
    name: str  # "docker" or "podman"
    cli: str  # the executable
    repo2docker_engine: str  # what repo2docker's --engine takes
    reason: str = ""  # why this engine was chosen, for the build log

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.cli, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)

    def image_id(self, ref: str) -> str | None:
        """The image's id (hex digits, no ``sha256:``), or None when there is no such image."""
        proc = self._run("image", "inspect", "--format", "{{.Id}}", ref)
        if proc.returncode != 0:
            return None
        return proc.stdout.strip().removeprefix("sha256:")

    def image_exists(self, ref: str) -> bool:
        return self.image_id(ref) is not None

    def images_exist(self, refs: tuple[str, ...] | list[str]) -> bool:
        """True when the engine has every one of ``refs`` (one call for all of them)."""
        return self._run("image", "inspect", "--format", "{{.Id}}", *refs).returncode == 0

    def tag(self, source: str, target: str) -> None:
        proc = self._run("tag", source, target)
        if proc.returncode != 0:
            raise HubworksError(
                f"{self.name} could not tag {source} as {target}: {output_line(proc.stderr)}",
                fix=f"check that {source} exists (`{self.cli} images`)")

    def push(self, ref: str) -> None:
        registry = _registry(ref)
        proc = self._run("push", ref)
        if proc.returncode != 0:
            raise HubworksError(
                f"{self.name} could not push {ref} to the registry {registry}: "
                f"{output_line(proc.stderr or proc.stdout, -1)}",
                fix=f"check that {registry} is reachable, log in with `{self.cli} login "
                    f"{registry}`, and that images.prefix starts with the registry's host")

    def remove(self, ref: str) -> None:
        """Remove the tag ``ref``; nothing to do when it does not exist."""
        proc = self._run("image", "rm", ref)
        if proc.returncode != 0 and self.image_exists(ref):
            raise HubworksError(
                f"{self.name} could not remove {ref}: {output_line(proc.stderr)}",
                fix=f"remove what uses it first, e.g. `{self.cli} ps -a`")


def _docker(reason: str) -> Engine:
    return Engine("docker", "docker", "docker", reason)


def _podman(reason: str) -> Engine:
    return Engine("podman", "podman", "hubworks-podman", reason)


def select_engine(choice: str = "auto") -> Engine:
    """The engine that builds images: ``choice`` is one of images.engine's choices."""
    choices = declared("images", "engine").choices
    if choice not in choices:
        raise HubworksError(f"images.engine is {choice!r}, which is not an engine hubworks knows.",
                            fix=f"set images.engine to one of: {', '.join(choices)}")
    if choice == "docker":
        if problem := docker_problem():
            raise HubworksError(f"Docker cannot build images here: {problem}.",
                                fix=f"start the Docker daemon and install its buildx plugin, "
                                    f"{CHOICE_FIX}")
        return _docker("images.engine is docker")
    if choice == "podman":
        if problem := podman_problem():
            raise HubworksError(f"podman cannot build images here: {problem}.",
                                fix=f"{PODMAN_FIX}, {CHOICE_FIX}")
        return _podman("images.engine is podman")
    if not (docker := docker_problem()):
        return _docker("auto: the Docker daemon answers and buildx is installed")
    if not (podman := podman_problem()):
        return _podman(f"auto: Docker not used, {docker}")
    raise HubworksError(f"No container engine can build images here: tried Docker ({docker}) "
                        f"and podman ({podman}).",
                        fix=f"{PODMAN_FIX}, or start Docker with the buildx plugin; {CHOICE_FIX}")
