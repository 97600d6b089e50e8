"""Which internal channel image builds use: channel/ served here, or a published one.

With ``channel.url`` set (an http(s) URL conda clients read, e.g. what ``publish_channel``
made), build_images resolves and builds against that URL: it starts no server, and it needs
neither ``recipes/`` nor ``channel/``, which is what a fresh CI runner that builds one image
has. Without it, the channel is ``channel/``, served while images build.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..core.errors import HubworksError
from ..core.settings import Settings
from .repodata import internal_package_names, package_names

_remote_names: dict[str, frozenset[str]] = {}
FETCH_SECONDS = 30


def published_channel_url(settings: Settings) -> str:
    """``channel.url`` with a trailing slash, or '' when builds use channel/."""
    url = settings.channel.url.strip()
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HubworksError(
            f"channel.url is {url!r}, which is not an http(s) URL of a conda channel.",
            fix="give the URL conda clients read the channel at, e.g. "
                "https://bucket.s3.amazonaws.com/channel/ (HUBWORKS_CHANNEL_URL)")
    return url.rstrip("/") + "/"


def preflight_channel_url(settings: Settings) -> str:
    """The channel that up-to-date checks resolve against, with no server running."""
    return published_channel_url(settings) or settings.channel_dir.as_uri()


def channel_package_names(settings: Settings) -> frozenset[str]:
    """Every package name the channel image builds use has."""
    url = published_channel_url(settings)
    if not url:
        return internal_package_names(settings.channel_dir)
    if url not in _remote_names:
        _remote_names[url] = _published_names(url)
    return _remote_names[url]


def _published_names(url: str) -> frozenset[str]:
    """Package names in the published channel's repodata (noarch and this platform)."""
    import rattler
    import requests

    names: set[str] = set()
    for subdir in ("noarch", str(rattler.Subdir.current())):
        try:
            response = requests.get(f"{url}{subdir}/repodata.json", timeout=FETCH_SECONDS)
        except requests.RequestException as exc:
            raise HubworksError(
                f"the published channel {url} cannot be reached: {_reason(exc)}.",
                fix="check channel.url (HUBWORKS_CHANNEL_URL) and that this machine "
                    "reaches it") from None
        if response.status_code == 404 and subdir != "noarch":
            continue  # a channel of noarch packages only
        if response.status_code != 200:
            raise HubworksError(
                f"the published channel {url} has no readable {subdir}/repodata.json "
                f"(HTTP {response.status_code}).",
                fix="publish it first (doit publish_channel), make it readable to this "
                    "machine (a public-read bucket policy for an S3 bucket), or correct "
                    "channel.url")
        try:
            data = response.json()
        except ValueError:
            raise HubworksError(
                f"{url}{subdir}/repodata.json is not JSON: channel.url does not point at a "
                f"conda channel.",
                fix="give the channel's own URL, the folder that holds noarch/ "
                    "(HUBWORKS_CHANNEL_URL)") from None
        names |= package_names(data)
    return frozenset(names)


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 200 else text[:200] + "..."


def forget_published_names() -> None:
    """Drop remembered repodata (tests publish and read in one process)."""
    _remote_names.clear()
