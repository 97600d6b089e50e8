"""How a build runs repo2docker: its command line, its config file and its environment."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.commands import build_environment
from ..core.settings import Settings
from .engines import Engine


def repo2docker_command(settings: Settings, engine_name: str, stage: Path, tag: str,
                        channel_url: str, config: Path, content_hash: str) -> list[str]:
    return [
        sys.executable, "-m", "repo2docker",
        "--engine", engine_name, "--no-run",
        "--config", str(config),
        "--user-name", settings.images.user_name, "--user-id", str(settings.images.user_id),
        "--image-name", tag,
        "--build-arg", f"CHANNEL_URL={channel_url}",
        "--label", f"org.hubworks.hash={content_hash}",
        str(stage),
    ]


def write_repo2docker_config(settings: Settings, path: Path, *, no_cache: bool,
                             appendix: str = "") -> Path:
    """repo2docker's config for one build: the engine's extra arguments, and ``appendix``
    (Dockerfile lines run after everything else) when there is one."""
    extra = [f"--network={settings.images.network}"] if settings.images.network else []
    if no_cache:
        extra.append("--no-cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    # repo2docker shells out to `<cli> buildx build`; these arguments go right before the
    # build context, which is how a loopback channel becomes reachable from RUN steps.
    text = f"c.DockerEngine.extra_buildx_build_args = {extra!r}\n"
    if appendix:
        text += f"c.Repo2Docker.appendix = {appendix!r}\n"
    path.write_text(text)
    return path


def repo2docker_environment(settings: Settings, engine: Engine) -> dict[str, str]:
    """The environment repo2docker runs in: the build's, with podman's isolation if set."""
    env = build_environment()
    if settings.images.isolation and engine.name == "podman":
        env["BUILDAH_ISOLATION"] = settings.images.isolation
    return env
