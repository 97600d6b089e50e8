"""Which Node.js runs which configurable-http-proxy release, for install_hub's node step.

The pinned proxy release may need a newer Node.js than the server has: then a newer one from
the package manager, else the newest older release of the same major that this node runs.
etc/proxy-releases.json remembers what npm said: the node range each release of the pinned
major declares, and, per node binary and version, whether a release's whole dependency tree
installs under --engine-strict (5.3.0 declares node >= 20 but pulls commander 15, which needs
22.12). Both answers are fixed for a given release and node, so checks read them from there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_bytes
from .interpreters import node_candidates, node_version, npm_for
from .layout import PROXY_PACKAGE, HubLayout
from .packages import install_packages, package_candidate, package_manager, run
from .versions import parse_version, satisfies, show_version


@dataclass(frozen=True)
class NodeChoice:
    node: Path
    version: tuple[int, ...]
    release: str  # the configurable-http-proxy release this node runs
    says: str


def _proxy_cache(hub: HubLayout) -> dict:
    try:
        return json.loads(hub.proxy_releases_file.read_text())
    except (OSError, ValueError):
        return {}


def _save_proxy_cache(hub: HubLayout, cache: dict) -> None:
    text = json.dumps(cache, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(hub.proxy_releases_file, text.encode(), 0o644)


def _pin_major(hub: HubLayout) -> str:
    return hub.hub_settings.proxy_version.split(".")[0]


def _node_key(path: Path, version: tuple[int, ...]) -> str:
    return f"{path} v{show_version(version)}"


def _nodes(hub: HubLayout) -> list[tuple[Path, tuple[int, ...]]]:
    if hub.hub_settings.node:
        path = Path(shutil.which(hub.hub_settings.node) or hub.hub_settings.node)
        if not path.is_file():
            raise HubworksError(f"hub.node names {hub.hub_settings.node}, which does not exist.",
                                fix="name an installed node, or leave hub.node empty")
        return [(path, node_version(path))]
    return [(path, node_version(path)) for path in node_candidates()]


def _older_releases(releases, pin: str) -> list[str]:
    return sorted((r for r in releases if parse_version(r) < parse_version(pin)),
                  key=parse_version, reverse=True)


def node_choice(hub: HubLayout) -> NodeChoice | None:
    """Which node runs which proxy release, from the cache and ``node --version`` only."""
    pin = hub.hub_settings.proxy_version
    cache = _proxy_cache(hub)
    nodes = _nodes(hub)
    for path, version in nodes:
        if cache.get("runs", {}).get(_node_key(path, version), {}).get(pin) == "":
            return NodeChoice(path, version, pin, f"Node.js v{show_version(version)} at {path} "
                                                  f"runs configurable-http-proxy {pin}")
    for path, version in nodes:
        key = _node_key(path, version)
        runs = cache.get("runs", {}).get(key, {})
        no_newer = cache.get("no_newer_node", {}).get(key)
        fits = [r for r in _older_releases(runs, pin) if runs[r] == ""]
        if runs.get(pin) and no_newer and fits:
            return NodeChoice(path, version, fits[0], (
                f"Node.js v{show_version(version)} at {path} cannot run configurable-http-proxy "
                f"{pin} ({runs[pin]}) and {no_newer}: configurable-http-proxy {fits[0]} "
                f"instead"))
    return None


def chosen_node(hub: HubLayout) -> NodeChoice:
    choice = node_choice(hub)
    if choice is None:
        raise HubworksError("no Node.js has been chosen for the proxy.",
                            fix="run doit install_hub:node first; it says what is missing")
    return choice


def choose_node(hub: HubLayout, log: Path) -> str | None:
    """Find the Node.js and proxy release that run here, asking npm (and installing Node.js
    where none or none new enough is found); says which. None after installing a newer
    Node.js: the node step checks again, and the new one may already be known to run."""
    nodes = _nodes(hub)
    if not nodes:
        _install_node(hub, log, "no Node.js found")
        nodes = _nodes(hub)
    pin = hub.hub_settings.proxy_version
    declared = _declared_releases(hub, nodes, log)
    why = [_runs(hub, path, version, pin, declared) for path, version in nodes]
    if "" in why:
        return node_choice(hub).says
    needs = why[0].rsplit("node ", 1)[-1]  # "<package> needs node >=22.12.0"
    no_newer = _why_no_newer_node(hub, nodes, needs)
    if no_newer is None:
        _install_node(hub, log, f"configurable-http-proxy {pin} needs node {needs}")
        return None
    return _choose_older_proxy(hub, nodes, declared, no_newer)


def _why_no_newer_node(hub: HubLayout, nodes, needs: str) -> str | None:
    """None when the package manager offers a Node.js newer than ``nodes`` that meets
    ``needs``; else why install_hub cannot install one (said when it picks an older proxy)."""
    if hub.hub_settings.node:
        return "hub.node names it, so install_hub does not replace it"
    tool = package_manager()
    if not tool:
        return "there is no package manager here to install a newer one"
    offered = package_candidate("nodejs")
    if offered and satisfies(offered, needs) and offered > max(v for _, v in nodes):
        return None
    return f"{tool} offers nodejs " + (show_version(offered) if offered else "in no version")


def _declared_releases(hub: HubLayout, nodes, log: Path) -> dict[str, str]:
    """Ask npm which node each release of the pinned major declares; cache it under etc/."""
    pin = hub.hub_settings.proxy_version
    cache = _proxy_cache(hub)
    known = cache.get("declared", {}).get(_pin_major(hub), {})
    if pin in known:
        return known
    npm = _npm([path for path, _ in nodes])
    answer = json.loads(run(
        [npm, "view", "--json", f"{PROXY_PACKAGE}@{_pin_major(hub)}", "version", "engines"],
        log=log, env=node_env(nodes[0][0]), capture=True))
    entries = answer if isinstance(answer, list) else [answer]
    known = {e["version"]: (e.get("engines") or {}).get("node", "*") for e in entries}
    if pin not in known:
        raise HubworksError(
            f"configurable-http-proxy has no release {pin}.",
            fix=f"set hub.proxy_version to one of {', '.join(known) or 'its releases'}")
    cache.setdefault("declared", {})[_pin_major(hub)] = known
    _save_proxy_cache(hub, cache)
    return known


def _npm(nodes: list[Path]) -> Path:
    npm = next((npm_for(path) for path in nodes if npm_for(path)), None)
    if npm is None:
        raise HubworksError("npm is missing: it installs configurable-http-proxy.",
                            fix="install npm (Debian: apt-get install npm) or a Node.js "
                                "that ships it")
    return npm


def _runs(hub: HubLayout, node: Path, version, release: str, declared: dict[str, str]) -> str:
    """'' when ``release`` installs on ``node`` with every engine range met; else why not."""
    cache = _proxy_cache(hub)
    runs = cache.setdefault("runs", {}).setdefault(_node_key(node, version), {})
    if release in runs:
        return runs[release]
    if not satisfies(version, declared[release]):
        runs[release] = f"it declares node {declared[release]}"
    else:
        runs[release] = _dry_run(hub, node, release)
    _save_proxy_cache(hub, cache)
    return runs[release]


def _dry_run(hub: HubLayout, node: Path, release: str) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [str(_npm([node])), "install", "--dry-run", "--engine-strict",
             "--no-audit", "--no-fund", "--prefix", scratch, f"{PROXY_PACKAGE}@{release}"],
            capture_output=True, text=True, env=node_env(node), cwd=scratch)
    if done.returncode == 0:
        return ""
    culprit = re.search(r"Not compatible with your version of node/npm: (\S+)", done.stderr)
    needs = _required_node(done.stderr)
    if culprit and needs:
        return f"{culprit.group(1)} needs node {needs}"
    raise HubworksError(f"npm could not resolve configurable-http-proxy {release}:\n"
                        f"{done.stderr.strip()[-800:]}",
                        fix="check that the npm registry is reachable, then run again")


def _required_node(npm_error: str) -> str | None:
    match = re.search(r'Required:\s*\{"node":"([^"]+)"', npm_error)
    return match.group(1) if match else None


def node_env(node: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{node.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _install_node(hub: HubLayout, log: Path, why: str) -> None:
    if not package_manager():
        raise HubworksError(f"{why} and no package manager here to install Node.js.",
                            fix="install Node.js >= 20 and npm, or name a node in hub.node")
    install_packages(["nodejs"], log)
    # NodeSource's nodejs ships npm; Debian's needs its npm package (which conflicts with
    # NodeSource's), so add it only when the installed node came without one
    nodes = node_candidates()
    if nodes and not npm_for(nodes[0]) and package_candidate("npm"):
        install_packages(["npm"], log)


def _choose_older_proxy(hub: HubLayout, nodes, declared: dict[str, str], no_newer: str) -> str:
    pin = hub.hub_settings.proxy_version
    for path, version in nodes:
        for release in _older_releases(declared, pin):
            if _runs(hub, path, version, release, declared) == "":
                cache = _proxy_cache(hub)
                cache.setdefault("no_newer_node", {})[_node_key(path, version)] = no_newer
                _save_proxy_cache(hub, cache)
                return node_choice(hub).says
    path, version = nodes[0]
    raise HubworksError(
        f"Node.js v{show_version(version)} at {path} is too old for every "
        f"configurable-http-proxy {_pin_major(hub)}.x release up to {pin} (they need node "
        f"{' or '.join(sorted(set(declared.values())))}), and {no_newer}.",
        fix="install Node.js >= 20 (distribution or NodeSource packages) and put it on PATH "
            "or name it in hub.node; or set hub.proxy_version to a release of an older major")
