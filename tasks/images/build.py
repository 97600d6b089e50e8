"""One image build, as its steps: the channel it uses, preflight, the hash and tags, a staged
copy, repo2docker, the image's tests, then tagging, pushing and the build record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..channel.source import published_channel_url
from ..core.commands import log_path, run_logged
from ..core.errors import reports_errors
from ..core.reporter import print_line
from ..core.run_scope import RUN
from ..core.settings import Settings
from .diagnosis import build_failure
from .discovery import Image
from .engines import Engine, select_engine
from .hashing import image_hash, tags_for
from .image_tests import recorded_failures, run_image_tests, tests_failure
from .records import read_image_record, record_failed_tests, write_image_record
from .repo2docker_cli import repo2docker_command, repo2docker_environment, write_repo2docker_config
from .singleuser import singleuser_appendix
from .solve import Resolution, resolve_internal
from .staging import stage_image

if TYPE_CHECKING:
    from ..channel.server import ServedChannel


@dataclass
class BuildChannel:
    """Where a build fetches the internal packages, and where preflight solves them."""
    build_url: str
    preflight_url: str
    hidden_tokens: list[str] = field(default_factory=list)  # kept out of the build log


@reports_errors
def build_image(settings: Settings, image: Image) -> None:
    """Build ``image`` with repo2docker against the internal channel; run its tests; tag,
    push, record it."""
    started = time.monotonic()
    if image.problem:
        raise image.problem
    channel = build_channel(settings)
    resolution = resolve_internal(settings, image, channel.preflight_url)
    engine = select_engine(settings.images.engine)  # after preflight: spec errors need none
    content_hash = image_hash(settings, image, resolution)
    tag, latest = tags_for(settings, image, content_hash)
    print_line(f"   image {image.name} ({image.kind}): building {tag}; internal packages: "
               f"{resolution.describe()}")

    scratch = settings.state("images", image.name)
    stage = stage_image(image, scratch / "stage", settings.images.channel_alias,
                        channel.build_url, resolution)
    config = write_repo2docker_config(
        settings, scratch / "repo2docker_config.py",
        no_cache=skips_layer_cache(settings, image, resolution),
        # the hub's jupyterhub-singleuser, installed after everything else
        appendix=singleuser_appendix(image, settings.hub.jupyterhub_version))
    log = log_path(settings, "images", f"{image.name}.log")
    returncode = run_logged(
        repo2docker_command(settings, engine.repo2docker_engine, stage, tag, channel.build_url,
                            config, content_hash),
        log, cwd=scratch, env=repo2docker_environment(settings, engine),
        title=f"{engine.name} build of images/{image.name} ({engine.reason})",
        hide=channel.hidden_tokens).returncode
    if returncode != 0 or not engine.image_exists(tag):
        print_line(f"   image {image.name}: failed ({time.monotonic() - started:.1f} s)")
        raise build_failure(settings, image.name, returncode, log)

    tests = run_image_tests(settings, image, tag, engine.cli, log)
    if tests and not tests.ok:
        kept = record_failed_tests(settings, image.name, tag=tag, content_hash=content_hash,
                                   summary=tests.summary(), failures=recorded_failures(tests),
                                   log=str(log))
        print_line(f"   image {image.name}: tests failed ({tests.summary()}; "
                   f"{time.monotonic() - started:.1f} s)")
        raise tests_failure(image, tag, tests, log, kept.get("tag", ""), engine.cli)

    tag_and_push(settings, engine, tag, latest)
    write_image_record(settings, image.name, tag=tag, latest=latest, content_hash=content_hash,
                       engine=engine.name, internal_packages=resolution.packages,
                       tests=tests.as_record(log) if tests else None)
    tested = f"; tests: {tests.summary()}" if tests else ""
    print_line(f"   image {image.name}: built {tag}{tested} "
               f"({time.monotonic() - started:.1f} s)")


def build_channel(settings: Settings) -> BuildChannel:
    """channel.url when set (nothing served here), else the run's channel server, started
    on first use and shared by every image build of the run."""
    if published := published_channel_url(settings):
        return BuildChannel(published, published)
    served = RUN.shared("channel-server", lambda: _channel_server(settings))
    # local_url carries no token, so none reaches rattler's cache
    return BuildChannel(channel_url_for_builds(settings, served), served.local_url,
                        [served.token] if served.token else [])


def _channel_server(settings: Settings):
    from ..channel.server import channel_server_from_settings

    # access log under the state directory; a per-run token, never channel.token
    return channel_server_from_settings(settings, for_builds=True)


def channel_url_for_builds(settings: Settings, served: ServedChannel) -> str:
    """The channel URL a build uses: channel.public_url with the run's token when set (a
    remote engine); on the host network the loopback URL, which needs no token; else the
    served URL with the run's token."""
    if settings.channel.public_url:
        url = settings.channel.public_url.rstrip("/") + "/"
        return url + (f"t/{served.token}/" if served.token else "")
    if settings.images.network == "host":
        return served.local_url
    return served.url


def skips_layer_cache(settings: Settings, image: Image, resolution: Resolution) -> bool:
    """A Dockerfile's RUN steps fetch from CHANNEL_URL, which the layer cache cannot see:
    when the internal packages differ from the last build (or are unknown), skip it."""
    previous = read_image_record(settings, image.name)
    return bool(image.dockerfile and resolution.packages
                and previous.get("internal_packages") != resolution.packages)


def tag_and_push(settings: Settings, engine: Engine, tag: str, latest: str) -> None:
    """Tag the built image ``latest``; push both tags when images.push is set."""
    engine.tag(tag, latest)
    if settings.images.push:
        engine.push(tag)
        engine.push(latest)
