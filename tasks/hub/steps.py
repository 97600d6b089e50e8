"""One ``check_*`` / ``ensure_*`` pair per state of an installed hub.

``check_x(hub)`` reads the server (files, /proc, one ``node --version``) and says whether the
state holds, in a line; doit calls it as the step's ``uptodate``, so it never changes anything
and never starts pip, npm or Python. ``ensure_x(hub)`` makes the state hold and says what it
did; it checks again first, so it is safe to call on its own.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Callable

from ..core.commands import log_path
from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_bytes
from .checks import Check, checks_first
from .containers import (DockerAPI, api_problem, docker_api, podman_environment,
                         recorded_podman_env, running_podman_pid, start_podman_service,
                         stop_podman_service, write_podman_env)
from .interpreters import Python, npm_for, probe_python, python_candidates, python_on_disk
from .images_page import check_images_page, write_images_page
from .layout import PODMAN_UNIT_NAME, PROXY_PACKAGE, UNIT_NAME, HubLayout, systemd_is_running
from .node import choose_node, chosen_node, node_choice, node_env
from .offered import check_images_file, write_images_file
from .packages import install_packages, package_candidate, package_manager, run
from .payload import tls_service
from .plan import STEPS, Step  # noqa: F401  (declared there; _wanted_pins reads them)
from .permissions import (blocked_for_others, first_writable_by_others, make_readable_not_writable,
                          require_root, user_name, write_private_file)
from .render import config_files, hub_search_path, render_podman_unit, render_unit
from .service import (HEALTH_GRACE_SECONDS, answers_health_within, ensure_ports_free,
                      ports_of_running_hub, running_hub_pid, start_hub, stop_hub)
from .upgrade import (adopt_old_layout, begin, check_routes, finish, has_run, hub_side_change,
                      in_place, link_target, matching_venv, needs_restart, new_venv_dir, pending,
                      point, rolls_back, running_venv, staged, venv_base)
from .versions import parse_version, show_version

MIN_PYTHON = (3, 10)


def _log(hub: HubLayout, step: str) -> Path:
    return log_path(hub.settings, "install_hub", f"{step}.log")


# ---- prefix ------------------------------------------------------------------------------

def _prefix_folders(hub: HubLayout) -> dict[Path, int]:
    """The folders the prefix step makes, with their modes: secrets and state are root's."""
    return {hub.prefix: 0o755, hub.etc: 0o755, hub.config_d: 0o755, hub.venvs: 0o755,
            hub.proxies: 0o755, hub.secrets: 0o700, hub.var: 0o700}


def check_prefix(hub: HubLayout) -> Check:
    prefix = hub.prefix
    if not prefix.is_dir():
        return Check(False, f"{prefix} does not exist yet")
    blocked = blocked_for_others(prefix)
    if blocked:
        return Check(False, f"other users cannot enter {prefix}: {blocked}")
    for folder, wanted_mode in _prefix_folders(hub).items():
        private = wanted_mode == 0o700
        try:
            st = os.stat(folder)
        except OSError:
            return Check(False, f"{folder} is missing")
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid() or (mode & 0o077 if private else mode & 0o022) \
                or (not private and mode & 0o005 != 0o005):
            return Check(False, f"{folder} has owner {user_name(st.st_uid)}, mode {mode:o}")
    loose = first_writable_by_others(prefix)
    if loose:
        return Check(False, f"{loose} is writable by other users")
    return Check(True, f"{prefix}: every user can enter it, nobody else can write in it, "
                       "secrets/ and var/ are private")


@checks_first(check_prefix)
def ensure_prefix(hub: HubLayout) -> str:
    _require_writable_place(hub.prefix)
    hub.prefix.mkdir(mode=0o755, parents=True, exist_ok=True)
    _require_enterable(hub.prefix)
    _make_prefix_folders(hub)
    _close_to_writes_by_others(hub)
    return f"{hub.prefix} ready: every user can enter it, secrets/ and var/ are private"


def _require_writable_place(prefix: Path) -> None:
    """The prefix, or the folder it would be created in, must be writable by this user."""
    existing = next(p for p in (prefix, *prefix.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == prefix else f"cannot be created: {existing} "
        raise HubworksError(
            f"the hub prefix {prefix} {where}is not writable by {user_name()}.",
            fix="run as root (sudo doit install_hub), or set hub.prefix "
                "(HUBWORKS_HUB_PREFIX) to a folder you can write")


def _require_enterable(prefix: Path) -> None:
    blocked = blocked_for_others(prefix)
    if blocked:
        raise HubworksError(
            f"every user must be able to enter {prefix} (their servers run from its venv), "
            f"but {blocked}.",
            fix="set hub.prefix to a folder outside it, such as /opt/jupyterhub")


def _make_prefix_folders(hub: HubLayout) -> None:
    for folder, mode in _prefix_folders(hub).items():
        folder.mkdir(mode=mode, exist_ok=True)
        if os.stat(folder).st_uid != os.geteuid():
            os.chown(folder, os.geteuid(), os.getegid())
        os.chmod(folder, mode)


def _close_to_writes_by_others(hub: HubLayout) -> None:
    """Nobody but root writes under the prefix; what users run from stays readable."""
    for public in (hub.venvs, hub.proxies, hub.etc):
        if public.exists():
            make_readable_not_writable(public)
    for private in (hub.secrets, hub.var):
        make_readable_not_writable(private, readable=False)
    if first_writable_by_others(hub.prefix):
        make_readable_not_writable(hub.prefix, readable=False)


# ---- Python ------------------------------------------------------------------------------

def _named_python(hub: HubLayout) -> Path | None:
    name = hub.hub_settings.python
    if not name:
        return None
    found = shutil.which(name) if os.sep not in name else name
    if not found or not Path(found).exists():
        raise HubworksError(f"hub.python names {name}, which does not exist.",
                            fix="name an installed interpreter, or leave hub.python empty")
    return Path(found)


def _venv_base(hub: HubLayout) -> Path | None:
    """The interpreter the existing hub venv was made from (pyvenv.cfg)."""
    cfg = hub.venv / "pyvenv.cfg"
    try:
        text = cfg.read_text()
    except OSError:
        return None
    parser = configparser.ConfigParser()
    parser.read_string("[venv]\n" + text)
    venv = parser["venv"]
    if venv.get("executable"):
        return Path(venv["executable"])
    version = re.match(r"(\d+)\.(\d+)", venv.get("version", venv.get("version_info", "")))
    if venv.get("home") and version:
        return Path(venv["home"]) / f"python{version[1]}.{version[2]}"
    return None


def _python_problem(python: Python) -> str | None:
    if python.version < MIN_PYTHON:
        return f"Python {show_version(python.version)} is older than 3.10"
    blocked = blocked_for_others(python.path)
    if blocked:
        return f"other users cannot run it: {blocked}"
    if not python.can_make_venvs:
        return "it cannot make venvs (no ensurepip)"
    return None


def hub_python(hub: HubLayout) -> Python | None:
    """The interpreter for the venv as far as files tell: hub.python, the venv's, or a search."""
    named = _named_python(hub)
    candidates = [named] if named else [p for p in [_venv_base(hub)] if p] + python_candidates()
    for path in candidates:
        python = python_on_disk(path)
        if python and not _python_problem(python):
            return python
    return None


def check_python(hub: HubLayout) -> Check:
    python = hub_python(hub)
    if python:
        return Check(True, f"{python.describe()}: every user can run it, it makes venvs")
    named = _named_python(hub)
    if named:
        return Check(False, f"hub.python names {named}; running it tells its version")
    return Check(False, "no Python >= 3.10 that every user can run is known yet")


@checks_first(check_python)
def ensure_python(hub: HubLayout) -> str:
    named = _named_python(hub)
    if named:
        return _ensure_named_python(hub, named)
    skipped, python = _search_python()
    if python is None:
        python = _install_python(hub, skipped)
    elif not python.can_make_venvs:
        _install_venv_support(hub, python)
        python = probe_python(python.path)
    note = f" (passed over: {'; '.join(skipped)})" if skipped else ""
    return f"{python.describe()}: every user can run it, it makes venvs{note}"


def _ensure_named_python(hub: HubLayout, path: Path) -> str:
    python = probe_python(path)
    if python.version < MIN_PYTHON:
        raise HubworksError(
            f"hub.python names {path}, which is Python {show_version(python.version)}; "
            f"the hub needs Python >= 3.10 (too old).",
            fix="name a Python >= 3.10 in hub.python (HUBWORKS_HUB_PYTHON), or leave it "
                "empty so that install_hub finds or installs one")
    blocked = blocked_for_others(path)
    if blocked:
        raise HubworksError(
            f"hub.python names {path}, which other users cannot run: {blocked}; their "
            f"servers would not start.",
            fix="name an interpreter every user can run, such as the system's "
                "/usr/bin/python3, or leave hub.python empty")
    if not python.can_make_venvs:
        _install_venv_support(hub, python)
    return f"{python.describe()} (hub.python): every user can run it, it makes venvs"


def _search_python() -> tuple[list[str], Python | None]:
    """Run each candidate once; the first fit, else one lacking only venv support."""
    skipped, lacking_venv = [], None
    for path in python_candidates():
        try:
            python = probe_python(path)
        except HubworksError as exc:
            skipped.append(f"{path}: {exc.message}")
            continue
        problem = _python_problem(python)
        if problem is None:
            return skipped, python
        if problem.startswith("it cannot make venvs") and lacking_venv is None:
            lacking_venv = python
        skipped.append(f"{path}: {problem}")
    return skipped, lacking_venv


def _install_venv_support(hub: HubLayout, python: Python) -> None:
    minor = f"python{python.version[0]}.{python.version[1]}"
    if package_manager() != "apt-get":
        raise HubworksError(f"{python.describe()} cannot make venvs (no ensurepip).",
                            fix=f"install its venv module (on Debian: {minor}-venv)")
    install_packages([f"{minor}-venv"], _log(hub, "python"))


def _install_python(hub: HubLayout, skipped: list[str]) -> Python:
    tool = package_manager()
    what = "python3 >= 3.10 with its venv module (Debian: python3 python3-venv)"
    passed = "; ".join(skipped) or "none found"
    if tool is None:
        raise HubworksError(f"no Python >= 3.10 that every user can run ({passed}) and no "
                            f"package manager to install one.",
                            fix=f"install {what}, or name one in hub.python")
    for minor in range(14, 9, -1):
        package = f"python3.{minor}"
        if package_candidate(package):
            extra = [f"{package}-venv"] if tool == "apt-get" else []
            install_packages([package, *extra], _log(hub, "python"))
            _, python = _search_python()
            if python and python.can_make_venvs:
                return python
    raise HubworksError(f"no Python >= 3.10 that every user can run ({passed}), and {tool} "
                        f"offers none.", fix=f"install {what}, or name one in hub.python")


# ---- Node.js and the proxy release it can run (chosen in node.py) ------------------------

def check_node(hub: HubLayout) -> Check:
    choice = node_choice(hub)
    if choice:
        return Check(True, choice.says)
    return Check(False, f"not yet known which Node.js here runs configurable-http-proxy "
                        f"{hub.hub_settings.proxy_version} (asks npm)")


@checks_first(check_node)
def ensure_node(hub: HubLayout) -> str:
    says = choose_node(hub, _log(hub, "node"))
    # None: a newer Node.js was installed; check again, as a first run would
    return ensure_node(hub) if says is None else says


# ---- the venv and what pip puts in it ----------------------------------------------------

def check_venv(hub: HubLayout) -> Check:
    base = _venv_base(hub)
    if base is None or not hub.venv_python.exists():
        return Check(False, f"no venv at {hub.venv} yet")
    if link_target(hub.venv) is None:
        return Check(False, f"{hub.venv} is a folder; it moves to {hub.venvs}/ and becomes a "
                            f"link, so that an upgrade can build beside it")
    python = hub_python(hub)
    if python is None or os.path.realpath(base) != os.path.realpath(python.path):
        upgrade = "upgrade " if has_run(hub) else ""
        return Check(False, f"{upgrade}{hub.venv} was made from {base}, not the hub's Python"
                     + (f" {python.describe()}" if python else ""))
    if not (hub.venv_bin / "pip").exists():
        return Check(False, f"{hub.venv} has no pip")
    return Check(True, f"{hub.venv}, made from {base}")


@checks_first(check_venv)
def ensure_venv(hub: HubLayout) -> str:
    python = hub_python(hub) or _search_python()[1]
    if python is None or _python_problem(python):
        raise HubworksError("no usable Python for the hub's venv.",
                            fix="run doit install_hub:python first; it says what is missing")
    moved = adopt_old_layout(hub)
    if moved and check_venv(hub).ok:
        return f"{moved}; {hub.venv} links to it"
    old = _venv_base(hub)
    if old and has_run(hub):
        return _venv_beside(hub, f"Python {old} -> {python.path}")
    target = new_venv_dir(hub)
    run([python.path, "-m", "venv", target], log=_log(hub, "venv"), env=_pip_env())
    make_readable_not_writable(target)
    point(hub.venv, target)
    made = f"{target} from {python.describe()}, linked as {hub.venv}"
    return f"rebuilt {made} (it was made from {old})" if old else f"created {made}"


def _wanted_pins(hub: HubLayout) -> tuple[dict[str, str], list[str]]:
    """Every pinned package this hub wants (name: version), and pip's arguments for them."""
    pins, args = {}, []
    for step in STEPS:
        if step.name in PINNED and step.wanted(hub):
            dist, key, beside = PINNED[step.name]
            pins[dist] = getattr(hub.hub_settings, f"{key}_version")
            args += [f"{dist}=={pins[dist]}", *(f"{n}>={low}" for n, low in beside.items())]
    return pins, args


def _venv_beside(hub: HubLayout, what: str) -> str:
    """An upgrade: back up, build a venv with every pin beside the one in use (the hub keeps
    running on that), switch the link; the database and health steps finish it."""
    python = hub_python(hub) or _search_python()[1]
    backed_up = begin(hub, what)
    before = link_target(hub.venv)
    pins, args = _wanted_pins(hub)
    log = _log(hub, "upgrade")
    built = new_venv_dir(hub)
    run([python.path, "-m", "venv", built], log=log, env=_pip_env())
    earlier = matching_venv(hub, venv_base(built), pins)
    if earlier is not None and earlier != built:
        shutil.rmtree(built)
        target, how = earlier, f"switched to {earlier}, built earlier with the same versions"
    else:
        target = built
        # --compile: users cannot write __pycache__ into root's venv, so compile it now
        run([target / "bin" / "python", "-m", "pip", "install", "--compile", *args],
            log=log, env=_pip_env())
        make_readable_not_writable(target)
        how = f"built {target} beside {before} while the hub ran on it"
    staged(hub, venv=target)
    said = [part for part in (backed_up, how, f"{hub.venv} now links to it") if part]
    if not needs_restart(hub):
        said.append(finish(hub) + "; the hub does not load what changed and keeps running")
    return f"upgrade {what}: " + "; ".join(said)


def installed_version(hub: HubLayout, dist: str) -> str | None:
    """A distribution's version from its dist-info folder in the venv (no pip, no Python)."""
    site = hub.site_packages()
    if site is None:
        return None
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    found = [p for p in site.glob(f"{stem}-*.dist-info") if (p / "METADATA").is_file()]
    if len(found) != 1:
        return None
    return found[0].name[len(stem) + 1:-len(".dist-info")]


def _pip_env() -> dict[str, str]:
    """The environment for pip: the machine's pip settings, none of doit's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    return env


def _check_package(hub: HubLayout, dist: str, key: str, beside: dict[str, str]) -> Check:
    pin = getattr(hub.hub_settings, f"{key}_version")
    have = installed_version(hub, dist)
    if have != pin and have and not in_place(hub):
        return Check(False, f"upgrade {dist} {have} -> {pin} (a backup first, then a new venv "
                            f"beside the one in use)")
    if have != pin:
        return Check(False, f"{dist} {have} in {hub.venv}, pinned {pin}" if have
                     else f"{dist} is not installed; pinned {pin}")
    for name, lowest in beside.items():
        found = installed_version(hub, name)
        if found is None or parse_version(found) < parse_version(lowest):
            return Check(False, f"{name} {found or 'is not installed'} in {hub.venv}; the "
                                f"hub's HTTPS service needs {name} >= {lowest}")
    return Check(True, f"{dist} {pin} in {hub.venv}"
                       + (f", with {' and '.join(beside)}" if beside else ""))


def _install_package(hub: HubLayout, dist: str, key: str, beside: dict[str, str]) -> str:
    pin = getattr(hub.hub_settings, f"{key}_version")
    before = installed_version(hub, dist)
    if not in_place(hub):
        return _venv_beside(hub, f"{dist} {before} -> {pin}")
    # --compile: users cannot write __pycache__ into root's venv, so compile it now
    run([hub.venv_python, "-m", "pip", "install", "--compile", f"{dist}=={pin}",
         *(f"{name}>={lowest}" for name, lowest in beside.items())],
        log=_log(hub, key), env=_pip_env())
    make_readable_not_writable(hub.venv)
    return (f"{dist} {pin} installed" + (f" (was {before})" if before else "")
            + (f", with {' and '.join(beside)}" if beside else ""))


def _pinned_package(dist: str, key: str | None = None,
                    beside: dict[str, str] | None = None) -> tuple[Callable, Callable]:
    """The check_/ensure_ pair of a distribution pinned by ``hub.<key>_version`` (key: the
    distribution's name unless given); ``beside``: what pip installs with it (name: lowest
    release)."""
    key, beside = key or dist, beside or {}

    def check(hub: HubLayout) -> Check:
        return _check_package(hub, dist, key, beside)

    @checks_first(check)
    def ensure(hub: HubLayout) -> str:
        return _install_package(hub, dist, key, beside)

    check.__name__, ensure.__name__ = f"check_{key}", f"ensure_{key}"
    return check, ensure


# step name: (distribution, settings key, what pip installs beside it); an upgrade's new venv
# gets every one its hub wants
PINNED = {"jupyterhub": ("jupyterhub", "jupyterhub", tls_service.LIBRARIES),
          "jupyterlab": ("jupyterlab", "jupyterlab", {}),
          "dockerspawner": ("dockerspawner", "dockerspawner", {}),
          "idle_culler": ("jupyterhub-idle-culler", "idle_culler", {}),
          "certbot": ("certbot", "certbot", {}),
          "systemdspawner": ("jupyterhub-systemdspawner", "systemdspawner", {})}

# the hub runs payload/tls_service.py with the venv's Python: its libraries come with JupyterHub
check_jupyterhub, ensure_jupyterhub = _pinned_package("jupyterhub",
                                                      beside=tls_service.LIBRARIES)
check_jupyterlab, ensure_jupyterlab = _pinned_package("jupyterlab")
check_dockerspawner, ensure_dockerspawner = _pinned_package("dockerspawner")
check_idle_culler, ensure_idle_culler = _pinned_package("jupyterhub-idle-culler", "idle_culler")
check_certbot, ensure_certbot = _pinned_package("certbot")
check_systemdspawner, ensure_systemdspawner = _pinned_package("jupyterhub-systemdspawner",
                                                              "systemdspawner")


# ---- configurable-http-proxy -------------------------------------------------------------

def installed_proxy(hub: HubLayout) -> str | None:
    try:
        return json.loads((hub.proxy_dir / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def check_proxy(hub: HubLayout) -> Check:
    choice = node_choice(hub)
    have = installed_proxy(hub)
    if choice is None:
        return Check(False, "waits for the node step to choose a proxy release")
    if have == choice.release and link_target(hub.node_modules):
        return Check(True, f"configurable-http-proxy {have} in {hub.node_modules}")
    if have == choice.release:
        return Check(False, f"{hub.node_modules} is a folder; it moves to {hub.proxies}/ and "
                            f"becomes a link, so that an upgrade can install beside it")
    if have and has_run(hub):
        return Check(False, f"upgrade configurable-http-proxy {have} -> {choice.release} (a "
                            f"backup first, then the new release beside the one in use)")
    return Check(False, f"configurable-http-proxy {have or 'not installed'}; "
                        f"wanted {choice.release}")


@checks_first(check_proxy)
def ensure_proxy(hub: HubLayout) -> str:
    choice = chosen_node(hub)
    moved = adopt_old_layout(hub)
    if moved and check_proxy(hub).ok:
        return f"{moved}; {hub.node_modules} links to it"
    before = installed_proxy(hub)
    backed_up = begin(hub, f"configurable-http-proxy {before} -> {choice.release}") \
        if before and has_run(hub) else ""
    # each release under its own npm prefix, beside the one the running proxy uses
    place = hub.proxies / choice.release
    if _proxy_release_in(place) != choice.release:
        shutil.rmtree(place, ignore_errors=True)
        place.mkdir(mode=0o755, parents=True)
        npm = npm_for(choice.node)
        run([npm, "install", "--prefix", place, "--save-exact", "--engine-strict",
             "--no-audit", "--no-fund", f"{PROXY_PACKAGE}@{choice.release}"],
            log=_log(hub, "proxy"), env=node_env(choice.node))
        make_readable_not_writable(place)
    if has_run(hub) and before:
        staged(hub, proxy=place / "node_modules")
    else:
        point(hub.node_modules, place / "node_modules")
    return ("; ".join(part for part in (backed_up, f"configurable-http-proxy {choice.release} "
            f"in {place}" + (f" (was {before})" if before else "") + f", run by {choice.node}")
                      if part))


def _proxy_release_in(place: Path) -> str | None:
    try:
        package = place / "node_modules" / PROXY_PACKAGE / "package.json"
        return json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


# ---- secrets -----------------------------------------------------------------------------

def _secret_files(hub: HubLayout) -> tuple[Path, ...]:
    return hub.cookie_secret, hub.proxy_token, hub.status_token


def check_secrets(hub: HubLayout) -> Check:
    for path in _secret_files(hub):
        try:
            st = os.stat(path)
        except OSError:
            return Check(False, f"{path.name} does not exist yet")
        if st.st_size == 0 or stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
            return Check(False, f"{path} is empty or readable by others")
    return Check(True, "cookie secret, proxy token and status token exist, mode 600 (never "
                       "regenerated)")


@checks_first(check_secrets)
def ensure_secrets(hub: HubLayout) -> str:
    done = []
    for path in _secret_files(hub):
        if path.exists():
            # an existing secret is kept: a new one would log every user out
            os.chmod(path, 0o600)
            done.append(f"kept {path.name}, mode 600")
        else:
            write_private_file(path, (secrets.token_hex(32) + "\n").encode())
            done.append(f"created {path.name}")
    return "; ".join(done)


# ---- the container engine (spawner = docker) ---------------------------------------------

def _podman_unit_current(hub: HubLayout) -> bool:
    try:
        return hub.podman_unit_file.read_text() == render_podman_unit(hub)
    except OSError:
        return False


def check_engine(hub: HubLayout) -> Check:
    api = docker_api(hub)
    if api.managed:
        if recorded_podman_env(hub) != podman_environment():
            return Check(False, f"{hub.podman_env_file} does not hold the podman configuration "
                                f"of this environment")
        if hub.uses_systemd:
            if not _podman_unit_current(hub) or not hub.podman_unit_link.exists():
                return Check(False, f"{PODMAN_UNIT_NAME} is missing, differs or is not enabled")
        elif running_podman_pid(hub) is None:
            return Check(False, "podman's API service for the hub is not running")
    problem = api_problem(api.url)
    if problem:
        return Check(False, f"the Docker API at {api.url} does not answer: {problem}")
    return Check(True, f"{api.origin} answers at {api.url}")


@checks_first(check_engine)
def ensure_engine(hub: HubLayout) -> str:
    api = docker_api(hub)
    if not api.managed:
        raise _unanswered_api_error(api)
    require_root("running podman's API service for the hub")
    env = podman_environment()
    changed = recorded_podman_env(hub) != env
    write_podman_env(hub, env)
    said = _podman_unit(hub, changed) if hub.uses_systemd else _podman_process(hub, changed)
    config = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "podman's own defaults"
    return "; ".join(part for part in said if part) + f"; its configuration: {config}"


def _unanswered_api_error(api: DockerAPI) -> HubworksError:
    """An engine install_hub does not run (Docker, or hub.docker_url) has to be started."""
    problem = api_problem(api.url)
    if api.engine == "docker":
        fix = "start Docker (systemctl start docker) or set images.engine = \"podman\""
    else:
        fix = "start the engine behind it, or correct hub.docker_url (HUBWORKS_HUB_DOCKER_URL)"
    return HubworksError(f"users' servers run through the Docker API at {api.url} "
                         f"({api.origin}), which does not answer: {problem}.",
                         fix=f"{fix}; then run doit install_hub again")


def _podman_unit(hub: HubLayout, changed: bool) -> list[str]:
    """With systemd: podman's API service as a unit, restarted when its configuration changed."""
    atomic_write_bytes(hub.podman_unit_file, render_podman_unit(hub).encode(), 0o644)
    log = _log(hub, "engine")
    if systemd_is_running():
        run(["systemctl", "daemon-reload"], log=log)
    run(["systemctl", "enable", PODMAN_UNIT_NAME], log=log)
    if systemd_is_running():
        run(["systemctl", "restart" if changed else "start", PODMAN_UNIT_NAME], log=log)
    return [f"wrote and enabled {hub.podman_unit_file}"]


def _podman_process(hub: HubLayout, changed: bool) -> list[str]:
    """Without systemd: podman's API service as a process of the hub's, restarted likewise."""
    said = [stop_podman_service(hub)] if changed else []
    return said + [start_podman_service(hub)]


# ---- the images users can pick (spawner = docker) ----------------------------------------

def check_images(hub: HubLayout) -> Check:
    holds, says = check_images_file(hub)
    return Check(holds, says)


@checks_first(check_images)
def ensure_images(hub: HubLayout) -> str:
    return write_images_file(hub)


# ---- the Images page (spawner = docker): the service the hub runs, and its files --------

def check_images_page_files(hub: HubLayout) -> Check:
    return Check(*check_images_page(hub))


@checks_first(check_images_page_files)
def ensure_images_page(hub: HubLayout) -> str:
    return write_images_page(hub)


# ---- the hub's configuration: its data and the fixed jupyterhub_config.py ----------------

def _wanted_config(hub: HubLayout) -> dict[Path, str] | None:
    choice = node_choice(hub)
    return config_files(hub, choice.node) if choice else None


def check_config(hub: HubLayout) -> Check:
    wanted = _wanted_config(hub)
    if wanted is None:
        return Check(False, "waits for the node step (the config names the proxy's node)")
    for path, text in wanted.items():
        try:
            current = path.read_text()
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return Check(False, f"{path} does not exist yet")
        if current != text:
            return Check(False, f"{path} differs from the settings")
        if mode != 0o644:
            return Check(False, f"{path} has mode {mode:o}")
    return Check(True, f"{hub.config_data_file} and {hub.config_file.name} match the settings")


@checks_first(check_config)
def ensure_config(hub: HubLayout) -> str:
    wanted = config_files(hub, chosen_node(hub).node)
    ensure_ports_free(hub, ours=ports_of_running_hub(hub))
    existed = hub.config_data_file.exists()
    for path, text in wanted.items():
        atomic_write_bytes(path, text.encode(), 0o644)
    return (f"{'rewrote' if existed else 'wrote'} {hub.config_data_file} and "
            f"{hub.config_file.name}")


# ---- database schema ---------------------------------------------------------------------

def schema_head(hub: HubLayout) -> str | None:
    """The newest alembic revision the installed JupyterHub ships (read from its files)."""
    site = hub.site_packages()
    folder = site / "jupyterhub" / "alembic" / "versions" if site else None
    if folder is None or not folder.is_dir():
        return None
    revisions, parents = set(), set()
    for script in folder.glob("*.py"):
        text = script.read_text()
        rev = re.search(r"^revision\s*=\s*['\"](\w+)['\"]", text, re.M)
        down = re.search(r"^down_revision\s*=\s*['\"](\w+)['\"]", text, re.M)
        if rev:
            revisions.add(rev.group(1))
        if down:
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def schema_in_database(hub: HubLayout) -> str | None:
    uri = f"file:{hub.database}?mode=ro"
    try:
        with sqlite3.connect(uri, uri=True, timeout=2) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def check_database(hub: HubLayout) -> Check:
    if not os.path.exists(hub.database):
        return Check(True, "no database yet: the hub creates it at its first start")
    head, current = schema_head(hub), schema_in_database(hub)
    if head and head == current:
        return Check(True, f"{hub.database} is at schema {current}, JupyterHub's newest")
    return Check(False, f"{hub.database} is at schema {current}; JupyterHub "
                        f"{installed_version(hub, 'jupyterhub')} ships {head}")


@checks_first(check_database)
def ensure_database(hub: HubLayout) -> str:
    before = schema_in_database(hub)
    stopped = ""
    with rolls_back(hub):  # within an upgrade: a failure brings back the database of before
        if running_hub_pid(hub):
            # the running hub holds the old schema in memory; it starts again in the health step
            stopped = stop_hub(hub) + "; "
        # upgrade-db runs `alembic` from PATH
        run([hub.jupyterhub, "upgrade-db", "-f", hub.config_file], cwd=hub.var,
            log=_log(hub, "database"), env=dict(_pip_env(), PATH=hub_search_path(hub)))
    return (f"{stopped}upgraded {hub.database} from schema {before} to "
            f"{schema_in_database(hub)} (jupyterhub upgrade-db keeps a backup beside it)")


# ---- service -----------------------------------------------------------------------------

def _background_says(hub: HubLayout) -> str:
    why = ("hub.service = background" if hub.choice("service") == "background"
           else "systemd is not running here")
    return (f"{why}: the hub runs in the background, started by this install or "
            f"`doit hub_start`, stopped by `doit hub_stop`; log {hub.log_file}")


def check_service(hub: HubLayout) -> Check:
    if not hub.uses_systemd:
        return Check(True, _background_says(hub))
    try:
        current = hub.unit_file.read_text() == render_unit(hub)
    except OSError:
        current = False
    if not current:
        return Check(False, f"{hub.unit_file} is missing or differs from the settings")
    if not hub.unit_link.exists():
        return Check(False, f"{UNIT_NAME} is not enabled")
    return Check(True, f"{hub.unit_file} written and enabled")


@checks_first(check_service)
def ensure_service(hub: HubLayout) -> str:
    require_root(f"writing the systemd unit {hub.unit_file}")
    atomic_write_bytes(hub.unit_file, render_unit(hub).encode(), 0o644)
    log = _log(hub, "service")
    if systemd_is_running():
        run(["systemctl", "daemon-reload"], log=log)
    run(["systemctl", "enable", UNIT_NAME], log=log)
    return f"wrote {hub.unit_file} and enabled it; systemd starts the hub at boot"


# ---- health ------------------------------------------------------------------------------

def _changed_since_start(hub: HubLayout) -> str | None:
    """What changed after the running hub started (JupyterHub writes its pid file at start)."""
    try:
        started = os.stat(hub.pid_file).st_mtime
    except OSError:
        return None
    site = hub.site_packages()
    running = running_venv(hub)
    if running is not None and str(running) != os.path.realpath(hub.venv):
        changed = hub_side_change(running, hub.venv)
        if changed:
            return f"the venv ({changed})"
        site = None  # the running hub's own venv stays on disk, unchanged
    inputs = [hub.config_file, hub.config_data_file, hub.spawner_module, hub.cookie_secret,
              hub.proxy_token, hub.proxy_dir]
    if site:
        inputs += list(site.glob("jupyterhub-*.dist-info")) + \
            list(site.glob("dockerspawner-*.dist-info"))
        # the hub starts these as its services, or spawns servers with them
        inputs += list(site.glob("jupyterhub_idle_culler-*.dist-info")) + \
            list(site.glob("jupyterhub_systemdspawner-*.dist-info"))
    # the office's own config (a file added, changed or removed) and the TLS service; not the
    # certificate, which reaches the proxy without a restart
    inputs += [hub.config_d, *hub.config_d.glob("*.py"), hub.tls_service_script,
               hub.tls_service_conf, hub.images_service_script, hub.images_service_conf,
               *hub.images_service_templates.glob("*.html")]
    for path in inputs:
        try:
            if os.stat(path).st_mtime > started:
                return path.name
        except OSError:
            continue
    return None


def check_health(hub: HubLayout) -> Check:
    pid = running_hub_pid(hub)
    if pid is None:
        return Check(False, "the hub is not running")
    if pending(hub):
        return Check(False, f"an upgrade waits for the hub's restart and checks "
                            f"({hub.upgrade_file})")
    changed = _changed_since_start(hub)
    if changed:
        return Check(False, f"the hub (pid {pid}) started before {changed} changed")
    if not answers_health_within(hub):
        return Check(False, f"the hub (pid {pid}) does not answer {hub.health_url} "
                            f"(tried for {HEALTH_GRACE_SECONDS} s)")
    return Check(True, f"{hub.health_url} answers 200; open {hub.public_url}")


@checks_first(check_health)
def ensure_health(hub: HubLayout) -> str:
    if hub.uses_systemd and not systemd_is_running():
        raise HubworksError("hub.service is systemd, but systemd is not running here.",
                            fix="set hub.service = background (or auto)")
    said = []
    with rolls_back(hub):  # within an upgrade: a failure brings back the previous hub
        if running_hub_pid(hub):
            # a restart picks up the new config, JupyterHub or proxy; users' servers stop too
            said.append(stop_hub(hub))
        said.append(start_hub(hub))
        said.append(f"{hub.health_url} answers 200")
        if pending(hub):
            said += [check_routes(hub), finish(hub)]
    return "; ".join(said)
