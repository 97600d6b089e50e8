"""Upgrades with a way back: each venv and proxy release built beside the one in use.

``venv`` is a link to one of ``venvs/<n>``, ``node_modules`` a link to
``proxies/<release>/node_modules``; the config, the units and the servers name the links, so
a switch is one rename. A changed pin on a hub that has run (it has a database) is an upgrade:

1. the step that builds takes a backup (hub_backup's archive) and a copy of the database, and
   writes ``var/upgrade.json``: what was in use, to go back to;
2. it builds the new venv (every pinned package) or proxy beside the old one while the hub
   keeps running on the old one, then switches the link;
3. the database step stops the hub and upgrades the schema; the health step starts the hub,
   checks /hub/health and that the proxy routes every running server, and ends the upgrade;
4. when 3 fails, the links go back, the database copy comes back, the old hub starts again,
   and the step fails with the cause and the log.

A venv that differs from the running one only in what the hub does not load (JupyterLab)
needs no restart: the running hub keeps its own venv, which stays on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from ..core.errors import HubworksError
from .backup import copy_database, take_backup
from .layout import HubLayout
from .permissions import write_private_file
from .processes import process_cmdline
from .service import loopback_tls, running_hub_pid, start_hub, stop_hub

# what the hub process itself loads (or starts as its services): a change restarts it
HUB_SIDE = ("jupyterhub", "dockerspawner", "jupyterhub_idle_culler", "jupyterhub_systemdspawner",
            "certbot")
ROUTE_SECONDS = 60


# ---- the links ---------------------------------------------------------------------------

def link_target(link: Path) -> Path | None:
    """Where a link of the prefix points (None: no link there)."""
    if not link.is_symlink():
        return None
    return (link.parent / os.readlink(link)).absolute()


def point(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` in one rename (a reader never finds it missing)."""
    temporary = link.with_name(f".{link.name}.switching")
    temporary.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), temporary)
    os.replace(temporary, link)


def adopt_old_layout(hub: HubLayout) -> str:
    """A hub installed before venvs/ and proxies/: its folders move there, links replace them
    (the move keeps every file, so the running hub and servers go on)."""
    said = []
    if hub.venv.is_dir() and not hub.venv.is_symlink():
        target = new_venv_dir(hub)
        os.rename(hub.venv, target)
        point(hub.venv, target)
        said.append(f"moved {hub.venv} to {target}")
    if hub.node_modules.is_dir() and not hub.node_modules.is_symlink():
        target = hub.proxies / "installed-before"
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.rename(hub.node_modules, target / "node_modules")
        for name in ("package.json", "package-lock.json"):
            if (hub.prefix / name).exists():
                os.rename(hub.prefix / name, target / name)
        point(hub.node_modules, target / "node_modules")
        said.append(f"moved {hub.node_modules} to {target}")
    return "; ".join(said)


def new_venv_dir(hub: HubLayout) -> Path:
    hub.venvs.mkdir(mode=0o755, exist_ok=True)
    numbers = [int(p.name) for p in hub.venvs.iterdir() if p.name.isdigit()]
    return hub.venvs / str(max(numbers, default=0) + 1)


def venv_versions(folder: Path) -> dict[str, str]:
    """Distribution (normalized name) -> version, from a venv's dist-info folders."""
    found = {}
    for info in folder.glob("lib/python3*/site-packages/*.dist-info"):
        match = re.match(r"(.+?)-(\d[^-]*)\.dist-info$", info.name)
        if match:
            found[re.sub(r"[-_.]+", "_", match[1]).lower()] = match[2]
    return found


def venv_base(folder: Path) -> str:
    """The interpreter line of a venv's pyvenv.cfg ('' if unreadable)."""
    try:
        text = (folder / "pyvenv.cfg").read_text()
    except OSError:
        return ""
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return " ".join(lines.get(k, "").strip() for k in ("home", "version", "version_info"))


def hub_side_change(old: Path, new: Path) -> str:
    """What differs between two venvs in what the hub itself runs ('' if nothing)."""
    if os.path.realpath(old) == os.path.realpath(new):
        return ""
    if venv_base(old) != venv_base(new):
        return "its Python"
    before, after = venv_versions(old), venv_versions(new)
    for dist in HUB_SIDE:
        if before.get(dist) != after.get(dist):
            return f"{dist} {before.get(dist)} -> {after.get(dist)}"
    return ""


def running_venv(hub: HubLayout) -> Path | None:
    """The venv the running hub was started from (its interpreter's folder)."""
    pid = running_hub_pid(hub)
    command = process_cmdline(pid) if pid else []
    if not command:
        return None
    # not realpath of the interpreter: a venv's python links to the system's
    return Path(os.path.realpath(Path(command[0]).parent.parent))


def matching_venv(hub: HubLayout, base: str, pins: dict[str, str]) -> Path | None:
    """A venv in venvs/ built from the same Python with every pinned version: reused."""
    if not hub.venvs.is_dir():
        return None
    for folder in sorted(hub.venvs.iterdir(), reverse=True):
        if not folder.name.isdigit() or venv_base(folder) != base:
            continue
        have = venv_versions(folder)
        if all(have.get(re.sub(r"[-_.]+", "_", d).lower()) == v for d, v in pins.items()):
            return folder
    return None


# ---- the upgrade under way ---------------------------------------------------------------

def has_run(hub: HubLayout) -> bool:
    """A hub with a database has users and state to protect: a change is an upgrade."""
    return hub.database.exists()


def pending(hub: HubLayout) -> dict | None:
    try:
        return json.loads(hub.upgrade_file.read_text())
    except (OSError, ValueError):
        return None


def _save(hub: HubLayout, record: dict) -> None:
    temporary = hub.upgrade_file.with_name(".upgrade.json.new")
    temporary.unlink(missing_ok=True)
    write_private_file(temporary, (json.dumps(record, indent=1) + "\n").encode())
    os.replace(temporary, hub.upgrade_file)


def in_place(hub: HubLayout) -> bool:
    """Whether a package goes into the venv in use: a hub that never ran, or the venv this
    upgrade built (not yet started)."""
    if not has_run(hub):
        return True
    record = pending(hub)
    staged = record and record.get("staged_venv")
    return bool(staged) and link_target(hub.venv) == Path(staged)


def begin(hub: HubLayout, what: str) -> str:
    """Back up and remember what runs now, once per upgrade; say what was done."""
    record = pending(hub)
    if record:
        record["what"].append(what)
        _save(hub, record)
        return ""
    backup = take_backup(hub)
    copy = hub.var / "upgrade-jupyterhub.sqlite"
    copy_database(hub.database, copy)
    # the images step offers what the new JupyterHub can serve; going back needs the old list
    images = hub.var / "upgrade-images.json"
    if hub.images_file.exists():
        shutil.copy2(hub.images_file, images)
    _save(hub, {"what": [what], "started": time.time(), "backup": str(backup.path),
                "database": str(copy), "images": str(images),
                "venv": str(link_target(hub.venv) or ""),
                "proxy": str(link_target(hub.node_modules) or "")})
    return f"backed up to {backup.path}"


def staged(hub: HubLayout, *, venv: Path | None = None, proxy: Path | None = None) -> None:
    """Switch to what this upgrade built; the record keeps what to switch back to."""
    record = pending(hub) or {}
    if venv is not None:
        point(hub.venv, venv)
        record["staged_venv"] = str(venv)
    if proxy is not None:
        point(hub.node_modules, proxy)
        record["staged_proxy"] = str(proxy)
    if record:
        _save(hub, record)


def needs_restart(hub: HubLayout) -> bool:
    record = pending(hub)
    if record is None:
        return False
    if record.get("staged_proxy") and record["staged_proxy"] != record.get("proxy"):
        return True
    before = Path(record["venv"]) if record.get("venv") else None
    return before is None or bool(hub_side_change(before, hub.venv))


def finish(hub: HubLayout) -> str:
    """The upgrade holds: forget the way back, keep one previous venv and proxy."""
    record = pending(hub)
    if record is None:
        return ""
    Path(record["database"]).unlink(missing_ok=True)
    if record.get("images"):
        Path(record["images"]).unlink(missing_ok=True)
    hub.upgrade_file.unlink(missing_ok=True)
    keep_venvs = {Path(record["venv"]) if record.get("venv") else None, running_venv(hub),
                  link_target(hub.venv)}
    _prune(hub.venvs, {os.path.realpath(p) for p in keep_venvs if p})
    keep_proxies = {Path(p).parent for p in (record.get("proxy"), str(link_target(
        hub.node_modules) or "")) if p}
    _prune(hub.proxies, {os.path.realpath(p) for p in keep_proxies})
    return f"upgrade done ({'; '.join(record['what'])})"


def _prune(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for old in folder.iterdir():
        if old.is_dir() and os.path.realpath(old) not in keep:
            shutil.rmtree(old, ignore_errors=True)


def roll_back(hub: HubLayout, cause: HubworksError) -> HubworksError:
    """Back to the venv, proxy and database of before; the old hub started again."""
    record = pending(hub)
    said = [stop_hub(hub)]
    if record.get("venv"):
        point(hub.venv, Path(record["venv"]))
    if record.get("proxy"):
        point(hub.node_modules, Path(record["proxy"]))
    copy, images = Path(record["database"]), Path(record.get("images", ""))
    if copy.exists():
        copy_database(copy, hub.database)
    if record.get("images") and images.exists():
        os.replace(images, hub.images_file)
    with open(hub.log_file, "a") as log:
        log.write(f"\n---- hubworks: the upgrade ({'; '.join(record['what'])}) failed; "
                  f"rolled back to {record.get('venv')} and the database of before ----\n")
    hub.upgrade_file.unlink(missing_ok=True)
    copy.unlink(missing_ok=True)
    try:
        said.append(start_hub(hub))
    except HubworksError as again:
        said.append(f"the previous hub did not start either: {again.message}")
    return HubworksError(
        f"the upgrade ({'; '.join(record['what'])}) failed: {cause.message}\n"
        f"rolled back: {hub.venv} points at {record.get('venv')} again, the database is as "
        f"it was; {'; '.join(said)}. The backup taken first: {record['backup']}.",
        fix=f"read the failed start in {hub.log_file} (above the 'rolled back' line), fix "
            f"it or keep the old pin, then run doit install_hub again")


@contextlib.contextmanager
def rolls_back(hub: HubLayout) -> Iterator[None]:
    """Within an upgrade, a failure switches everything back before it is reported."""
    try:
        yield
    except HubworksError as exc:
        if pending(hub) is None:
            raise
        raise roll_back(hub, exc) from None


# ---- after the restart: does the proxy route every running server? -----------------------

def unrouted_servers(hub: HubLayout) -> list[str]:
    """Running servers the hub knows whose route the proxy lacks (waits ROUTE_SECONDS)."""
    token = hub.status_token.read_text().strip()
    proxy_token = hub.proxy_token.read_text().strip()
    deadline = time.monotonic() + ROUTE_SECONDS
    while True:
        users = _get(f"{hub.local_url}hub/api/users?state=active", token)
        if isinstance(users, dict):
            users = users.get("items", [])
        wanted = {server["url"].rstrip("/"): f"{user['name']}/{name}".rstrip("/")
                  for user in users for name, server in (user.get("servers") or {}).items()
                  if server.get("ready")}
        routes = _get(f"http://127.0.0.1:{hub.hub_settings.proxy_api_port}/api/routes",
                      proxy_token)
        routed = {path.rstrip("/") for path in routes}
        missing = sorted(name for url, name in wanted.items() if url not in routed)
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1)


def _get(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10, context=loopback_tls()) as response:
        return json.load(response)


def check_routes(hub: HubLayout) -> str:
    try:
        missing = unrouted_servers(hub)
    except OSError as exc:
        raise HubworksError(f"after the restart the hub's API or the proxy's did not answer: "
                            f"{getattr(exc, 'reason', exc)}.",
                            fix=f"look at {hub.log_file}") from None
    if missing:
        raise HubworksError(f"after the restart the proxy does not route the running servers "
                            f"of {', '.join(missing)}.", fix=f"look at {hub.log_file}")
    return "the proxy routes every running server"
