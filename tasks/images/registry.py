"""What the container registry holds, asked over its HTTP API without pulling anything.

With ``images.push`` set, an image is up to date when the registry already has its
content-hash tag (``<prefix>/<name>:<hash>``): a fresh CI runner, whose engine is empty and
which has no build records, decides from the registry alone. The check is one manifest
``HEAD`` per image (the registry API v2, which Docker Hub, GHCR, GitLab, Harbor, Quay, ECR and
the ``registry`` server all speak), with the credentials ``podman login`` or ``docker login``
stored: ``REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.config/containers/auth.json``, then ``$DOCKER_CONFIG/config.json`` (``~/.docker``).
Plain HTTP is used only for registries the engines themselves treat as insecure: loopback
ones, and those ``registries.conf`` marks ``insecure = true``.

``doit image_matrix`` prints, as JSON for a CI matrix, the images whose tags are missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HubworksError, reports_errors
from ..core.netaddr import host_of, is_loopback
from ..core.reporter import print_line
from ..core.settings import Settings
from ..core.workspace import current_settings

CHECK_SECONDS = 20
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


# ---------------------------------------------------------------- image references

@dataclass(frozen=True)
class ImageReference:
    registry: str     # host[:port] as written, docker.io when none is written
    repository: str   # path inside the registry
    tag: str

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def parse_reference(ref: str) -> ImageReference:
    """``host:5000/team/image:tag`` -> registry, repository, tag (the engines' rules)."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, ref
        if "/" not in path.split(":", 1)[0]:
            path = f"library/{path}"
    name, _, tag = path.rpartition(":")
    if not name or "/" in tag:
        name, tag = path, "latest"
    return ImageReference(registry, name, tag)


# ---------------------------------------------------------------- what the engines configured

def _auth_files() -> list[Path]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    files.append(Path.home() / ".config" / "containers" / "auth.json")
    docker_config = os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker"
    files.append(Path(docker_config, "config.json"))
    return files


def registry_credentials(registry: str) -> tuple[str, str] | None:
    """User and password ``podman login`` / ``docker login`` stored for ``registry``."""
    names = {registry, f"https://{registry}", f"http://{registry}"}
    if registry == DOCKER_HUB:
        names |= {"https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB_API}
    for path in _auth_files():
        try:
            auths = json.loads(path.read_text()).get("auths", {})
        except (OSError, ValueError, AttributeError):
            continue
        for key, entry in auths.items():
            if key.rstrip("/") not in names and key not in names:
                continue
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, password
            if entry.get("username"):
                return entry["username"], entry.get("password", "")
    return None


def _registries_conf_files() -> list[Path]:
    if os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        return [Path(os.environ["CONTAINERS_REGISTRIES_CONF"])]
    return [Path("/etc/containers/registries.conf"),
            Path.home() / ".config" / "containers" / "registries.conf"]


def _marked_insecure(registry: str) -> bool:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    for path in _registries_conf_files():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for entry in data.get("registry", []):
            if entry.get("location") == registry and entry.get("insecure"):
                return True
        if registry in data.get("registries", {}).get("insecure", {}).get("registries", []):
            return True  # the version 1 format
    return False


def _schemes(registry: str) -> list[str]:
    # Both engines try TLS first and fall back to plain HTTP only where they were told to.
    if is_loopback(host_of(registry)) or _marked_insecure(registry):
        return ["https", "http"]
    return ["https"]


# ---------------------------------------------------------------- the registry API

def _fix_login(registry: str) -> str:
    return (f"log in to {registry} on this machine (`podman login {registry}` or "
            f"`docker login {registry}`) with an account that may read and push there")


def _bearer_token(session, challenge: str, reference: ImageReference,
                  credentials: tuple[str, str] | None) -> str:
    params = dict(_CHALLENGE_PARAM.findall(challenge))
    query = {"scope": f"repository:{reference.repository}:pull"}
    if params.get("service"):
        query["service"] = params["service"]
    response = session.get(params.get("realm", ""), params=query, auth=credentials,
                           timeout=CHECK_SECONDS)
    if response.status_code != 200:
        raise HubworksError(
            f"the registry {reference.registry} refused a token to read {reference} "
            f"(HTTP {response.status_code}).", fix=_fix_login(reference.registry))
    body = response.json()
    return body.get("token") or body.get("access_token") or ""


def _head_manifest(session, url: str, reference: ImageReference):
    headers = {"Accept": MANIFEST_TYPES}
    response = session.head(url, headers=headers, timeout=CHECK_SECONDS)
    if response.status_code != 401:
        return response
    challenge = response.headers.get("WWW-Authenticate", "")
    credentials = registry_credentials(reference.registry)
    if challenge.lower().startswith("bearer"):
        token = _bearer_token(session, challenge, reference, credentials)
        headers["Authorization"] = f"Bearer {token}"
    elif credentials:
        session.auth = credentials
    else:
        return response
    return session.head(url, headers=headers, timeout=CHECK_SECONDS)


def registry_has(ref: str) -> bool:
    """True when the registry holds the tag ``ref``; reads one manifest header, pulls nothing."""
    import requests

    reference = parse_reference(ref)
    schemes = _schemes(reference.registry)
    problem = ""
    for scheme in schemes:
        url = (f"{scheme}://{reference.api_host}/v2/{reference.repository}/manifests/"
               f"{reference.tag}")
        with requests.Session() as session:
            try:
                response = _head_manifest(session, url, reference)
            except requests.RequestException as exc:
                problem = " ".join(str(exc).split())[:200]
                continue
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        if response.status_code in (401, 403):
            raise HubworksError(
                f"the registry {reference.registry} refused to say whether it has {ref} "
                f"(HTTP {response.status_code}).", fix=_fix_login(reference.registry))
        raise HubworksError(
            f"the registry {reference.registry} answered HTTP {response.status_code} when "
            f"asked for {ref}.",
            fix=f"check that {reference.registry} is a container registry (images.prefix "
                f"starts with its host) and that it is healthy")
    raise HubworksError(
        f"the registry {reference.registry} cannot be reached to check {ref}: {problem}.",
        fix=f"check that {reference.registry} is up and reachable from this machine, and "
            f"that images.prefix starts with its host")


# ---------------------------------------------------------------- images and their tags

@dataclass
class ImageStatus:
    name: str
    tag: str             # <prefix>/<name>:<content hash>
    packages: list[dict]  # the internal packages it resolves to
    present: bool         # in the registry (images.push), else in the local engine


def expected_tag(settings: Settings, image) -> tuple[str, list[dict]]:
    """The content-hash tag ``image`` gets from the channel now, and its internal packages."""
    from ..channel.source import preflight_channel_url
    from .hashing import image_hash, tags_for
    from .solve import resolve_internal

    if image.problem:
        raise image.problem
    resolution = resolve_internal(settings, image, preflight_channel_url(settings))
    return tags_for(settings, image, image_hash(settings, image, resolution))[0], \
        resolution.packages


def tag_exists(settings: Settings, tag: str) -> bool:
    """In the registry with images.push (pulling nothing), else in the local engine."""
    if settings.images.push:
        return registry_has(tag)
    from .engines import select_engine

    return select_engine(settings.images.engine).image_exists(tag)


def image_status(settings: Settings, image) -> ImageStatus:
    """Where ``image`` stands: its content-hash tag now, and whether that tag exists."""
    tag, packages = expected_tag(settings, image)
    return ImageStatus(image.name, tag, packages, tag_exists(settings, tag))


def image_in_registry(settings: Settings, image) -> bool:
    """build_images' up-to-date rule with images.push: the registry has the tag."""
    try:
        return image_status(settings, image).present
    except Exception:  # anything unclear: build, and let the build say what is wrong
        return False


def images_to_build(settings: Settings) -> list[str]:
    """Names of the images whose content-hash tags the registry (or engine) lacks."""
    from .discovery import discover_images

    wanted = []
    for name, image in discover_images(settings.images_dir).items():
        try:
            tag, _ = expected_tag(settings, image)
        except HubworksError as exc:
            # Its build job fails with this message, next to the images that build.
            print(f"   image {name}: {exc.message}", file=sys.stderr)
            wanted.append(name)
            continue
        if not tag_exists(settings, tag):  # an unreachable registry fails the matrix
            wanted.append(name)
    return wanted


@reports_errors
def print_image_matrix(settings: Settings, output: str) -> None:
    matrix = json.dumps(images_to_build(settings))
    if output:
        path = Path(output) if os.path.isabs(output) else settings.root / output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(matrix + "\n")
    print_line(matrix)


def task_image_matrix():
    """Print, as JSON for a CI matrix, the images whose tags the registry lacks."""
    settings = current_settings()
    return {
        "actions": [(print_image_matrix, [settings])],
        "params": [{"name": "output", "long": "output", "default": "",
                    "help": "also write the JSON list to this file"}],
        "uptodate": [False],
        "verbosity": 2,
    }
