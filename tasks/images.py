"""build_images: repo2docker images from images/* against the served internal channel.

Each folder of images/ is a repo2docker repository; ``build_images:<name>`` builds one.
For every image that is out of date:

1. the channel server starts (once per doit run, shared by all image builds, stopped when
   the run ends: see ``workspace.RUN``);
2. preflight: the image's internal packages are resolved against the served channel with
   rattler's solver, so a missing package or version fails in seconds, by name;
3. a staged copy of the folder is made in which the channel alias (``internal``) in every
   environment.yml is replaced by the channel URL for builds; ``images/`` itself is never
   modified;
4. repo2docker builds it (Docker with buildx, or podman), with ``CHANNEL_URL`` as a build
   argument for Dockerfile images and the host network so a loopback channel is reachable;
5. the image is tagged ``<prefix>/<name>:<hash>`` and ``:latest`` (and pushed if asked).

Tokens: on the host network (the default) builds reach the server on loopback and carry no
token (the build server lets this machine in without one). A token reaches a build only
for a remote engine or another network (``channel.public_url``): then it is the server's
per-run token, dead when the run ends; the fixed ``channel.token`` never does. Build logs
have every token replaced by ``<token>``.

The hash covers the image folder and the exact internal packages it resolves to, so a
rebuilt internal package rebuilds exactly the images that use it, and repo2docker's reuse
of an existing tag can never serve a stale image. An image is up to date when its hash is
unchanged and the engine still has it.

Which internal packages an image uses: the dependencies of every environment.yml in it
that lists the alias (all of them when the alias is its only channel, ``internal::name``
always); for a Dockerfile, also every internal package name its text mentions.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HubworksError, reports_errors
from .fsutil import atomic_write_json, folder_files, read_json, tree_digest
from .recipes import package_makers, spec_name
from .settings import Settings
from .commands import build_environment, log_path, log_tail, run_logged
from .reporter import print_line
from .run_scope import RUN
from .workspace import current_settings

if TYPE_CHECKING:
    from .engines import Engine
    from .server import ServedChannel

# What repo2docker can build from (any one is enough); see its buildpacks.
REPO2DOCKER_FILES = (
    "environment.yml", "requirements.txt", "Pipfile", "Pipfile.lock", "setup.py",
    "pyproject.toml", "Project.toml", "REQUIRE", "install.R", "DESCRIPTION", "apt.txt",
    "postBuild", "start", "runtime.txt", "Dockerfile", "default.nix", "manifest.xml",
)
ENVIRONMENT_FILE = "environment.yml"


# ---------------------------------------------------------------- what an image folder holds

@dataclass
class Image:
    name: str
    folder: Path
    config_dir: Path | None = None    # where repo2docker looks: binder/, .binder/ or the root
    env_file: Path | None = None
    dockerfile: Path | None = None
    problem: str = ""

    @property
    def kind(self) -> str:
        return "Dockerfile" if self.dockerfile else "environment.yml" if self.env_file else \
            "repo2docker"


def read_image(folder: Path) -> Image:
    image = Image(folder.name, folder)
    # repo2docker reads binder/ (or .binder/) instead of the root when it exists.
    image.config_dir = next(
        (c for c in (folder / "binder", folder / ".binder") if c.is_dir()), folder)
    found = [f for f in REPO2DOCKER_FILES if (image.config_dir / f).is_file()]
    if not found:
        where = Path(folder.parent.name, image.config_dir.relative_to(folder.parent))
        image.problem = (
            f"image '{image.name}': {where}/ has nothing repo2docker can build from.\n"
            f"  fix: add an environment.yml (conda packages), a requirements.txt, or a "
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


def internal_specs(image: Image, alias: str, internal_names: set[str]) -> list[str]:
    """The image's requirements that the internal channel is to provide."""
    specs: list[str] = []
    env_files = [p for p in folder_files(image.folder) if p.name == ENVIRONMENT_FILE]
    for env_file in env_files:
        data = _load_yaml(env_file)
        channels = [str(c) for c in data.get("channels") or []]
        for entry in data.get("dependencies") or []:
            if not isinstance(entry, str):
                continue  # a pip: section
            channel, _, spec = entry.rpartition("::")
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


# ---------------------------------------------------------------- resolving internal packages

@dataclass
class Resolution:
    specs: list[str]
    packages: list[dict] = field(default_factory=list)  # name, version, build, sha256

    def describe(self) -> str:
        return ", ".join(f"{p['name']} {p['version']}" for p in self.packages) or "none"


_names_cache: dict[tuple, frozenset[str]] = {}


def internal_package_names(channel_dir: Path) -> frozenset[str]:
    """Every package name in the channel's repodata. Up-to-date checks and builds of every
    image ask for it; at 20,000 packages parsing the repodata costs 0.1 s, so it is read
    again only when a repodata.json changed."""
    files = sorted(channel_dir.glob("*/repodata.json"))
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if key not in _names_cache:
        names: set[str] = set()
        for repodata in files:
            data = read_json(repodata, {})
            for section in ("packages", "packages.conda"):
                names.update(record["name"] for record in data.get(section, {}).values())
        _names_cache.clear()
        _names_cache[key] = frozenset(names)
    return _names_cache[key]


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
        from .channel_source import channel_package_names

        internal_names = channel_package_names(settings)  # channel/, or channel.url's
    from .channel_source import published_channel_url

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
    repodata = []
    for path in sorted(settings.channel_dir.glob("*/repodata.json")):
        stat = path.stat()
        repodata.append([path.parent.name, stat.st_ino, stat.st_size, stat.st_mtime_ns])
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names \
        else ""
    return hashlib.sha256(json.dumps([specs, repodata, sys.platform, platform.machine(), libc])
                          .encode()).hexdigest()


@functools.cache
def _repo2docker_version() -> str:
    # From its metadata: importing repo2docker to read __version__ takes a quarter second.
    from importlib.metadata import version

    return version("jupyter-repo2docker")


def image_hash(settings: Settings, image: Image, resolution: Resolution) -> str:
    digest = hashlib.sha256()
    digest.update(tree_digest(image.folder).encode())
    digest.update(json.dumps({
        "internal": resolution.packages,
        "alias": settings.images.channel_alias,
        "user": [settings.images.user_name, settings.images.user_id],
        "repo2docker": _repo2docker_version(),
    }, sort_keys=True).encode())
    appendix = hub_singleuser_appendix(settings, image)
    if appendix:  # environment.yml images follow the hub's JupyterHub release
        digest.update(appendix.encode())
    return digest.hexdigest()[:16]


def hub_singleuser_appendix(settings: Settings, image: Image) -> str:
    """What repo2docker appends to the image's build so that it serves the hub's users."""
    from .singleuser import singleuser_appendix

    return singleuser_appendix(image, settings.hub.jupyterhub_version)


# ---------------------------------------------------------------- records

def image_records_dir(settings: Settings) -> Path:
    return settings.state("images")


def record_path(settings: Settings, name: str) -> Path:
    return image_records_dir(settings) / f"{name}.json"


def built_image_tags(settings: Settings) -> list[str]:
    """Content-hash tags of the images build_images produced, by image name."""
    folder = image_records_dir(settings)
    if not folder.is_dir():
        return []
    records = (read_json(p, {}) for p in sorted(folder.glob("*.json")))
    return [record["tag"] for record in records if record.get("tag")]


def tags_for(settings: Settings, image: Image, content_hash: str) -> tuple[str, str]:
    repository = f"{settings.images.prefix.rstrip('/')}/{image.name}"
    return f"{repository}:{content_hash}", f"{repository}:latest"


def image_is_current(settings: Settings, image: Image) -> bool:
    """Up to date: same hash as the last build, and the engine still has that image."""
    from .engines import select_engine

    from .channel_source import preflight_channel_url

    if settings.images.push and not image.problem:
        # A fresh CI runner has no records and an empty engine: the registry decides.
        from .registry import image_in_registry

        return image_in_registry(settings, image)
    record = read_json(record_path(settings, image.name))
    if not record or image.problem:
        return False
    try:
        resolution = resolve_internal(settings, image, preflight_channel_url(settings),
                                      reuse=True)
        if image_hash(settings, image, resolution) != record["hash"]:
            return False
        return _engine_has(select_engine(settings.images.engine), record["tag"], settings)
    except Exception:  # anything unclear: build, and let the build say what is wrong
        return False


_confirmed: dict[tuple, frozenset[str]] = {}


def _engine_has(engine: Engine, tag: str, settings: Settings) -> bool:
    """Whether the engine has the image ``tag``. The first question of a run asks for every
    recorded tag at once, one engine call instead of one per image; a tag that call did not
    confirm is asked alone."""
    tags = tuple(built_image_tags(settings))
    key = (engine.cli, tags)
    if key not in _confirmed:
        _confirmed[key] = frozenset(tags) if tags and engine.images_exist(tags) else frozenset()
    return tag in _confirmed[key] or engine.image_exists(tag)


# ---------------------------------------------------------------- staging and building

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


def stage_image(image: Image, target: Path, alias: str, channel_url: str,
                resolution: Resolution) -> Path:
    """Copy the image folder, replacing the channel alias in every environment.yml.

    Each staged environment.yml also names the exact internal packages (with sha256) in a
    comment: the engine's layer cache keys on the file's bytes, so a rebuilt internal
    package invalidates exactly the layers that install it.
    """
    from ruamel.yaml import YAML

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(image.folder, target, symlinks=True)
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


def write_repo2docker_config(settings: Settings, path: Path, *, no_cache: bool) -> Path:
    extra = [f"--network={settings.images.network}"] if settings.images.network else []
    if no_cache:
        extra.append("--no-cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    # repo2docker shells out to `<cli> buildx build`; these arguments go right before the
    # build context, which is how a loopback channel becomes reachable from RUN steps.
    path.write_text(f"c.DockerEngine.extra_buildx_build_args = {extra!r}\n")
    return path


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


def _channel_server(settings: Settings):
    from .server import channel_server_from_settings

    # access log under the state directory; a per-run token, never channel.token
    return channel_server_from_settings(settings, for_builds=True)


@reports_errors
def build_image(image: Image) -> None:
    from .channel_source import published_channel_url
    from .engines import select_engine

    settings = current_settings()
    started = time.monotonic()
    if image.problem:
        raise HubworksError(image.problem)
    hidden_tokens: list[str] = []  # the run's own token: kept out of the build log
    if published := published_channel_url(settings):  # channel.url: nothing served here
        build_url = preflight_url = published
    else:
        served = RUN.shared("channel-server", lambda: _channel_server(settings))
        build_url = channel_url_for_builds(settings, served)
        # local_url carries no token, so none reaches rattler's cache
        preflight_url = served.local_url
        hidden_tokens = [served.token] if served.token else []

    resolution = resolve_internal(settings, image, preflight_url)
    engine = select_engine(settings.images.engine)  # after preflight: spec errors need none
    content_hash = image_hash(settings, image, resolution)
    tag, latest = tags_for(settings, image, content_hash)
    print_line(f"   image {image.name} ({image.kind}): building {tag}; internal packages: "
               f"{resolution.describe()}")

    scratch = settings.state("images", image.name)
    stage = stage_image(image, scratch / "stage", settings.images.channel_alias, build_url,
                        resolution)
    # A Dockerfile's RUN steps fetch from CHANNEL_URL, which the layer cache cannot see:
    # when the internal packages differ from the last build (or are unknown), skip it.
    previous = read_json(record_path(settings, image.name), {}) or {}
    no_cache = bool(image.dockerfile and resolution.packages
                    and previous.get("internal_packages") != resolution.packages)
    config = write_repo2docker_config(settings, scratch / "repo2docker_config.py",
                                      no_cache=no_cache)
    appendix = hub_singleuser_appendix(settings, image)
    if appendix:  # the hub's jupyterhub-singleuser, installed after everything else
        with config.open("a") as handle:
            handle.write(f"c.Repo2Docker.appendix = {appendix!r}\n")
    command = repo2docker_command(settings, engine.repo2docker_engine, stage, tag,
                                  build_url, config, content_hash)
    log = log_path(settings, "images", f"{image.name}.log")
    env = build_environment()
    if settings.images.isolation and engine.name == "podman":
        env["BUILDAH_ISOLATION"] = settings.images.isolation
    returncode = run_logged(command, log, cwd=scratch, env=env,
                            title=f"{engine.name} build of images/{image.name} ({engine.reason})",
                            hide=hidden_tokens).returncode
    if returncode != 0 or not engine.image_exists(tag):
        seconds = time.monotonic() - started
        print_line(f"   image {image.name}: failed ({seconds:.1f} s)")
        notes, fix = diagnose(log.read_text(errors="replace"))
        raise HubworksError(
            f"image '{image.name}' failed to build (repo2docker exited with status "
            f"{returncode}).{notes}\n"
            f"  last lines of its log:\n{log_tail(log, settings.recipes.log_tail)}\n"
            f"  full log: {log}", fix=fix)
    engine.tag(tag, latest)
    if settings.images.push:
        engine.push(tag)
        engine.push(latest)
    atomic_write_json(record_path(settings, image.name), {
        "name": image.name, "tag": tag, "latest": latest, "hash": content_hash,
        "engine": engine.name, "internal_packages": resolution.packages,
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    print_line(f"   image {image.name}: built {tag} ({time.monotonic() - started:.1f} s)")


# ---------------------------------------------------------------- the doit task

def recipes_needed(settings: Settings, image: Image, makers: dict[str, str]) -> list[str]:
    """The recipes that make the internal packages ``image`` names (``makers``: package
    name -> recipe). Their packages' own dependencies follow from the recipes' graph."""
    if image.problem:
        return []
    try:
        specs = internal_specs(image, settings.images.channel_alias, set(makers))
    except HubworksError:
        return []  # an unreadable environment.yml: the image's build names it
    return sorted({makers[name] for name in map(spec_name, specs) if name in makers})


def task_build_images():
    """Build the images in images/ with repo2docker, serving the channel meanwhile."""
    settings = current_settings()
    images = discover_images(settings.images_dir)
    # With channel.url the packages come from a published channel: no local recipes or
    # index to wait for (an image runner has neither).
    local = not settings.channel.url
    makers = package_makers(settings) if images and local else {}
    # Every recipe first, so `doit build_images` fails at its end when one failed; an image
    # waits only for the recipes it uses, so under --continue the others still build.
    yield {"name": None, "doc": task_build_images.__doc__,
           "task_dep": ["build_recipes"] if local else []}
    for name, image in images.items():
        task = {
            "name": name,
            "doc": f"build images/{name} ({image.kind})",
            "actions": [(build_image, [image])],
            "task_dep": ["index_channel"] + [f"build_recipes:{recipe}" for recipe
                                             in recipes_needed(settings, image, makers)]
                        if local else [],
            "uptodate": [lambda task, values, image=image: image_is_current(settings, image)],
            "meta": {"what": f"image '{name}'",
                     "interrupted": "nothing is tagged or recorded; the next run builds it "
                                    "again"},
        }
        yield task
