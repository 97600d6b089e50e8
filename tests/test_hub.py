"""install_hub for real: a hub installed into a temporary prefix, a system user logging in.

The story: on this server, `doit install_hub` installs a JupyterHub whose JupyterHub release is
one behind, starts it, and is run again with the current pins (JupyterHub and its database are
upgraded, nothing else). A system user logs in through the login form and gets JupyterLab from
a server running under their own uid. Re-runs do nothing; changing one pin redoes only the
steps that depend on it; the secrets never change. Then the failures a server can hand the
installer (unwritable prefix, busy port, too old Python or Node, no root) each stop with the
problem and the fix. `doit hub_stop` ends the hub, its proxy and the users' servers.

Needs root (useradd, PAM, servers started as the user), PyPI and npm, and Debian's pypy3 for
a real too-old interpreter. The hub is installed once for the module.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from traitlets.config import Config
from traitlets.config.loader import DeferredConfig, PyFileConfigLoader

from tasks.core.settings import load_settings
from tasks.hub.layout import HubLayout
from tasks.hub.render import config_files, render_podman_unit, render_unit
from tasks.hub.steps import ensure_secrets, schema_head
from tests.conftest import free_ports

REPO = Path(__file__).resolve().parents[1]
DODO = REPO / "dodo.py"
PREVIOUS_JUPYTERHUB = "5.4.6"  # its schema is older than the pinned release's
OLDER_JUPYTERLAB = "4.6.5"
OLDER_PROXIES = ("5.1.0", "5.0.1")  # both run on Node.js 18 and later

# ---- running doit ------------------------------------------------------------------------

@dataclass
class Run:
    returncode: int
    output: str
    seconds: float

    @property
    def executed(self) -> set[str]:
        """install_hub steps whose actions ran ('.  install_hub:<step>: ...')."""
        return set(re.findall(r"^\.  install_hub:(\w+)", self.output, re.M))

    @property
    def up_to_date(self) -> set[str]:
        return set(re.findall(r"^-- install_hub:(\w+): up to date", self.output, re.M))


@dataclass
class HubSite:
    """A workspace whose hub lives in a prefix every user can enter."""

    root: Path
    prefix: Path
    user: str
    password: str
    ports: dict[str, int]
    runs: dict[str, Run] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['port']}"

    @property
    def layout(self) -> HubLayout:
        return HubLayout(load_settings(self.root, environ={}))

    def doit(self, *args: str, env: dict[str, str] | None = None, timeout: int = 900) -> Run:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUBWORKS_")}
        full_env.update(env or {})
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(self.root), *args],
            env=full_env, capture_output=True, text=True, timeout=timeout)
        return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - started)

    def install(self, env: dict[str, str] | None = None) -> Run:
        run = self.doit("install_hub", env=env)
        assert run.returncode == 0, run.output
        return run

    def hub_pid(self) -> int:
        return int((self.prefix / "var" / "jupyterhub.pid").read_text())

    def installed(self, dist: str) -> str:
        site = next((self.prefix / "venv" / "lib").glob("python3*/site-packages"))
        (info,) = site.glob(f"{dist}-*.dist-info")
        return info.name[len(dist) + 1:-len(".dist-info")]

    def proxy_release(self) -> str:
        package = self.prefix / "node_modules" / "configurable-http-proxy" / "package.json"
        return json.loads(package.read_text())["version"]


def missing(what: str) -> None:
    """Skip for lack of ``what``; in CI (CI set) fail instead, so nothing passes unseen."""
    if os.environ.get("CI"):
        pytest.fail(f"this test needs {what}")
    pytest.skip(f"needs {what}")


def public_tempdir(prefix: str) -> Path:
    """A temporary folder every user can enter (pytest's tmp_path sits under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def processes_under(prefix: Path) -> dict[int, int]:
    """pid -> uid of every process running a program from the prefix."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if str(prefix) in cmdline and "\nState:\tZ" not in status:
            found[int(entry.name)] = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    return found


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        match = re.search(r"^Uid:\s+(\d+)", status, re.M)
        if match and int(match.group(1)) == uid and "\nState:\tZ" not in status:
            found.append(int(entry.name))
    return found


def single_user_servers(site: HubSite) -> dict[int, int]:
    return {pid: uid for pid, uid in processes_under(site.prefix).items()
            if "jupyterhub-singleuser" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()}


def add_user(name: str) -> str:
    """A system user with a home folder and a fresh password (returned), for PAM logins."""
    password = secrets.token_urlsafe(12)
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    return password


# ---- the hub, installed once ------------------------------------------------------------

@pytest.fixture(scope="module")
def site():
    if os.geteuid() != 0:
        missing("root: installing a hub and adding users needs it")
    user = f"hwtest{os.getpid() % 100000}"
    password = add_user(user)
    root = Path(tempfile.mkdtemp(prefix="hubworks-ws-"))
    outer = public_tempdir("hubworks-prefix-")
    port, hub_port, api_port = free_ports(3)
    site = HubSite(root, outer / "hub", user, password,
                   {"port": port, "hub_port": hub_port, "proxy_api_port": api_port})
    (root / "hubworks.toml").write_text(
        f'[hub]\nprefix = "{site.prefix}"\nport = {port}\nhub_port = {hub_port}\n'
        f'proxy_api_port = {api_port}\nallowed_users = ["{user}"]\n'
        f'admin_users = ["{user}"]\n')
    try:
        site.runs["previous"] = site.install({"HUBWORKS_HUB_JUPYTERHUB_VERSION":
                                              PREVIOUS_JUPYTERHUB})
        site.secrets = {p.name: p.read_bytes() for p in (site.prefix / "secrets").iterdir()}
        site.runs["upgrade"] = site.install()
        yield site
    finally:
        site.doit("hub_stop")
        leftovers = processes_under(site.prefix)
        uid = pwd.getpwnam(user).pw_uid
        leftovers.update({pid: uid for pid in processes_of(uid)})
        for pid in leftovers:  # only if hub_stop failed: what this test started
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run(["userdel", "-r", user], capture_output=True)
        shutil.rmtree(outer, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def log_in_and_open_lab(site: HubSite, *, user: str = "", password: str = "",
                        session: requests.Session | None = None) -> requests.Response:
    """Log in through the form as a system user (the site's own unless given) and follow the
    spawn to JupyterLab; ``session`` carries the cookies (and e.g. the CA to verify with)."""
    user, password = user or site.user, password or site.password
    session = session or requests.Session()
    session.get(f"{site.url}/hub/login", timeout=30).raise_for_status()
    response = session.post(
        f"{site.url}/hub/login?next=",
        data={"username": user, "password": password,
              "_xsrf": session.cookies.get("_xsrf")}, timeout=60)
    assert response.status_code == 200, response.text[-2000:]
    assert "/hub/login" not in response.url, "the login form came back: login failed"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lab = session.get(f"{site.url}/user/{user}/lab", timeout=60)
        if lab.status_code == 200 and lab.url.endswith(f"/user/{user}/lab"):
            return lab
        time.sleep(1)
    pytest.fail(f"/user/{user}/lab never answered 200; last: {lab.status_code} {lab.url}")


# ---- the install story -------------------------------------------------------------------

@pytest.mark.slow
def test_a_fresh_server_gets_every_step_and_a_healthy_hub(site):
    run = site.runs["previous"]
    assert {"prefix", "node", "venv", "jupyterhub", "jupyterlab", "proxy", "secrets",
            "config", "health"} <= run.executed, run.output
    assert f"http://127.0.0.1:{site.ports['port']}/hub/health answers 200" in run.output
    assert requests.get(f"{site.url}/hub/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_upgrading_jupyterhub_upgrades_it_and_its_database_only(site):
    run = site.runs["upgrade"]
    assert run.executed == {"jupyterhub", "database", "health"}, run.output
    assert site.installed("jupyterhub") == site.layout.hub_settings.jupyterhub_version
    database = site.prefix / "var" / "jupyterhub.sqlite"
    with sqlite3.connect(database) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision == schema_head(site.layout)
    assert list(database.parent.glob("jupyterhub.sqlite.*")), "upgrade-db keeps a backup"


@pytest.mark.slow
def test_nothing_in_the_prefix_is_writable_by_others_and_users_can_enter_it(site):
    assert stat.S_IMODE(site.prefix.stat().st_mode) == 0o755
    assert stat.S_IMODE((site.prefix / "venv").stat().st_mode) == 0o755
    for private in ("secrets", "var"):
        assert stat.S_IMODE((site.prefix / private).stat().st_mode) == 0o700
    for secret in (site.prefix / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for folder, dirs, files in os.walk(site.prefix):
        for name in dirs + files:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            assert stat.S_ISLNK(mode) or not mode & 0o022, os.path.join(folder, name)


@pytest.mark.slow
def test_a_system_user_logs_in_and_gets_jupyterlab_as_themselves(site):
    lab = log_in_and_open_lab(site)
    assert "JupyterLab" in lab.text
    uid = pwd.getpwnam(site.user).pw_uid
    servers = single_user_servers(site)
    assert servers and set(servers.values()) == {uid}, servers


@pytest.mark.slow
def test_a_second_install_runs_no_step(site):
    run = site.install()
    assert run.executed == set(), run.output
    assert {"prefix", "python", "venv", "jupyterhub", "jupyterlab", "proxy", "config",
            "health"} <= run.up_to_date


@pytest.mark.slow
def test_list_status_shows_every_step_up_to_date_without_running_any(site):
    pid = site.hub_pid()
    run = site.doit("list", "--all", "--status", "install_hub")
    assert run.returncode == 0, run.output
    statuses = re.findall(r"^([UR]) install_hub:(\w+)", run.output, re.M)
    assert len(statuses) >= 12 and {status for status, _ in statuses} == {"U"}, run.output
    assert site.hub_pid() == pid


@pytest.mark.slow
def test_the_plan_shows_every_step_up_to_date_without_running_any(site):
    pid = site.hub_pid()
    run = site.doit("install_hub_plan")
    assert run.returncode == 0, run.output
    steps = re.findall(r"^  (up to date|would run )\s+(\w+)", run.output, re.M)
    assert len(steps) >= 12 and all(state == "up to date" for state, _ in steps), run.output
    assert site.hub_pid() == pid


@pytest.mark.slow
def test_changing_the_jupyterlab_pin_reinstalls_only_jupyterlab(site):
    pid = site.hub_pid()
    older = site.install({"HUBWORKS_HUB_JUPYTERLAB_VERSION": OLDER_JUPYTERLAB})
    assert older.executed == {"jupyterlab"}, older.output
    assert site.installed("jupyterlab") == OLDER_JUPYTERLAB
    back = site.install()
    assert back.executed == {"jupyterlab"}, back.output
    assert site.installed("jupyterlab") == site.layout.hub_settings.jupyterlab_version
    assert site.hub_pid() == pid, "a JupyterLab change does not restart the hub"


@pytest.mark.slow
def test_changing_the_proxy_pin_reinstalls_the_proxy_and_restarts_the_hub(site):
    before, pid = site.proxy_release(), site.hub_pid()
    # Older than what runs now: on Node.js 18 the install already fell back to 5.1.0.
    older_proxy = next(v for v in OLDER_PROXIES if v != before)
    older = site.install({"HUBWORKS_HUB_PROXY_VERSION": older_proxy})
    # the node step decides which release this Node.js runs, so it checks the new pin
    assert older.executed == {"node", "proxy", "health"}, older.output
    assert site.proxy_release() == older_proxy
    assert site.hub_pid() != pid
    assert requests.get(f"{site.url}/hub/health", timeout=10).status_code == 200
    back = site.install()
    assert back.executed == {"proxy", "health"}, back.output
    assert site.proxy_release() == before


@pytest.mark.slow
def test_changing_a_setting_rewrites_the_config_and_restarts_only_the_hub(site, monkeypatch):
    pid = site.hub_pid()
    admins = f"{site.user},hwadmin"
    changed = site.install({"HUBWORKS_HUB_ADMIN_USERS": admins})
    assert changed.executed == {"config", "health"}, changed.output
    assert site.hub_pid() != pid
    assert loaded_config(site.layout, monkeypatch).Authenticator.admin_users == \
        sorted(admins.split(","))
    assert site.install({"HUBWORKS_HUB_ADMIN_USERS": admins}).executed == set()
    back = site.install()
    assert back.executed == {"config", "health"}, back.output
    assert loaded_config(site.layout, monkeypatch).Authenticator.admin_users == [site.user]
    assert requests.get(f"{site.url}/hub/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_secrets_survive_every_rerun_byte_for_byte(site):
    site.install()
    now = {p.name: p.read_bytes() for p in (site.prefix / "secrets").iterdir()}
    assert now == site.secrets and len(now) == 3  # cookie, proxy token, status token


# ---- what stops a step, and what it says ------------------------------------------------

@pytest.mark.slow
def test_a_busy_port_stops_the_config_step_with_the_port_and_the_fix(site):
    written = [site.prefix / "etc" / name
               for name in ("jupyterhub_config.py", "hubworks_config.json")]
    config = [path.read_text() for path in written]
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        run = site.doit("install_hub", env={"HUBWORKS_HUB_PORT": str(busy)})
    assert run.returncode != 0
    assert f"port {busy} (hub.port) is already in use by another program" in run.output
    assert "fix:" in run.output and "HUBWORKS_HUB_PORT" in run.output
    assert [path.read_text() for path in written] == config


@pytest.mark.slow
def test_a_too_old_python_named_by_the_setting_stops_the_python_step(site):
    old = shutil.which("pypy3")  # Debian's pypy3 is a real Python 3.9
    if old is None:
        missing("Debian's pypy3 (apt-get install pypy3) as a too-old Python")
    run = site.doit("install_hub", env={"HUBWORKS_HUB_PYTHON": old})
    assert run.returncode != 0
    assert "FAILED install_hub:python" in run.output
    assert re.search(r"hub\.python names \S+, which is Python 3\.9\.\d+; the hub needs "
                     r"Python >= 3\.10 \(too old\)", run.output), run.output
    assert "fix: name a Python >= 3.10 in hub.python" in run.output
    assert "venv" not in run.executed


@pytest.fixture(scope="module")
def node16():
    """A real Node.js 16: the binary PyPI's nodejs-bin wheel ships."""
    folder = Path(tempfile.mkdtemp(prefix="hubworks-node16-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(folder), "nodejs-bin==16.15.1a4"], check=True,
                   capture_output=True)
    (wheel,) = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract("nodejs/bin/node", folder)
    node = folder / "nodejs" / "bin" / "node"
    node.chmod(0o755)
    yield node
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_too_old_node_with_no_way_to_install_stops_the_node_step(site, node16):
    run = site.doit("install_hub", env={"HUBWORKS_HUB_NODE": str(node16)})
    assert run.returncode != 0
    assert "FAILED install_hub:node" in run.output
    assert (f"Node.js v16.15.1 at {node16} is too old for every configurable-http-proxy 5.x "
            "release") in run.output, run.output
    assert "hub.node names it, so install_hub does not replace it" in run.output
    assert "fix: install Node.js >= 20" in run.output
    assert site.install().executed == set()


@pytest.fixture(scope="module")
def as_nobody(site):
    """Run doit as the unprivileged user nobody: Python from the hub venv, doit and tasks
    copied where nobody can read them (the test's own interpreter may sit in root's home)."""
    kit = public_tempdir("hubworks-nobody-")
    import doit
    shutil.copytree(Path(doit.__file__).parent, kit / "doit")
    shutil.copytree(REPO / "tasks", kit / "tasks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (kit / "dodo.py").write_text(
        "from tasks.core.workspace import doit_config\n"
        "from tasks.hub import task_install_hub, task_hub_start, task_hub_stop  # noqa\n"
        "DOIT_CONFIG = doit_config()\n")
    subprocess.run(["chmod", "-R", "a+rX", str(kit)], check=True)
    nobody = pwd.getpwnam("nobody")

    def run(*args: str, env: dict[str, str]) -> Run:
        workspace = public_tempdir("hubworks-ws-nobody-")
        os.chown(workspace, nobody.pw_uid, nobody.pw_gid)
        full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(kit), "HOME": "/tmp",
                    "HUBWORKS_HUB_PREFIX": str(site.prefix), **env}
        started = time.monotonic()
        done = subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
             "--clear-groups", str(site.prefix / "venv" / "bin" / "python"), "-m", "doit",
             "-f", str(kit / "dodo.py"), "-d", str(workspace), *args],
            env=full_env, capture_output=True, text=True, timeout=300)
        shutil.rmtree(workspace, ignore_errors=True)
        return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - started)

    yield run
    shutil.rmtree(kit, ignore_errors=True)


@pytest.mark.slow
def test_an_unwritable_prefix_stops_the_prefix_step(site, as_nobody):
    owned_by_root = public_tempdir("hubworks-rootonly-")
    try:
        run = as_nobody("install_hub", env={"HUBWORKS_HUB_PREFIX": str(owned_by_root / "hub")})
    finally:
        shutil.rmtree(owned_by_root)
    assert run.returncode != 0
    assert "FAILED install_hub:prefix" in run.output, run.output
    assert (f"the hub prefix {owned_by_root}/hub cannot be created: {owned_by_root} is not "
            "writable by nobody") in run.output
    assert "fix: run as root (sudo doit install_hub), or set hub.prefix" in run.output


@pytest.mark.slow
def test_starting_the_hub_as_an_ordinary_user_says_it_needs_root(site, as_nobody):
    run = as_nobody("hub_start", env={})
    assert run.returncode != 0
    assert "starting the hub (PAM checks system passwords and servers start as their users) " \
           "needs root; this runs as nobody." in run.output, run.output
    assert "fix: run it as root" in run.output


@pytest.mark.slow
def test_writing_the_systemd_unit_as_an_ordinary_user_says_it_needs_root(site, as_nobody):
    run = as_nobody("-s", "install_hub:service", env={"HUBWORKS_HUB_SERVICE": "systemd"})
    assert run.returncode != 0
    assert "writing the systemd unit /etc/systemd/system/jupyterhub.service needs root; " \
           "this runs as nobody." in run.output, run.output


@pytest.mark.slow
def test_local_home_folders_are_backed_up_and_put_back_with_owner_and_mode(site):
    """hub.backup_homes: the local spawner's homes go into the archive; a lost file comes back
    from it as its user's, with its mode, and the hub serves again."""
    account = pwd.getpwnam(site.user)
    home = Path(account.pw_dir)
    folder, kept = home / "analysis", home / "analysis" / "kept.txt"
    folder.mkdir(exist_ok=True)
    kept.write_text("written before the backup\n")
    for path in (folder, kept):
        os.chown(path, account.pw_uid, account.pw_gid)
    kept.chmod(0o600)
    off = site.doit("hub_backup")
    assert off.returncode == 0, off.output
    assert "no homes (hub.backup_homes is off)" in off.output, off.output
    homes = {"HUBWORKS_HUB_BACKUP_HOMES": "true"}
    run = site.doit("hub_backup", env=homes)
    assert run.returncode == 0, run.output
    assert f"home folders of {site.user}" in run.output, run.output
    archive = max((site.prefix / "backups").glob("hub-*.tar"), key=lambda p: p.stat().st_mtime)
    with tarfile.open(archive) as tar:
        member = tar.getmember(f"homes/{site.user}/analysis/kept.txt")
    assert (member.uname, stat.S_IMODE(member.mode)) == (site.user, 0o600)
    shutil.rmtree(folder)
    restored = site.doit("hub_restore", "--archive", str(archive), env=homes)
    assert restored.returncode == 0, restored.output
    assert f"put back the home folders of {site.user}" in restored.output, restored.output
    assert kept.read_text() == "written before the backup\n"
    for path, mode in ((kept, 0o600), (folder, None)):
        found = path.stat()
        assert (found.st_uid, found.st_gid) == (account.pw_uid, account.pw_gid), path
        assert mode is None or stat.S_IMODE(found.st_mode) == mode
    log_in_and_open_lab(site)  # the restore started the hub again


@pytest.mark.slow
def test_hub_stop_ends_the_hub_its_proxy_and_the_users_servers(site):
    log_in_and_open_lab(site)
    running = processes_under(site.prefix)
    assert len(running) >= 3, running  # hub, proxy, the user's server
    run = site.doit("hub_stop")
    assert run.returncode == 0, run.output
    assert re.search(r"stopped the hub \(pid \d+\), its proxy \(pid \d+\) and [1-9]\d* ",
                     run.output), run.output
    assert processes_under(site.prefix) == {}
    assert "the hub is not running" in site.doit("hub_stop").output
    again = site.install()  # the health step brings it back
    assert again.executed == {"health"}, again.output


# ---- the hub's configuration as JupyterHub loads it (no install needed) -------------------

def hub_in(tmp_path: Path, toml: str = "", **environ: str) -> HubLayout:
    """A hub with its prefix under tmp_path, from these settings (after [hub]'s prefix)."""
    (tmp_path / "hubworks.toml").write_text(f'[hub]\nprefix = "{tmp_path / "hub"}"\n{toml}')
    return HubLayout(load_settings(tmp_path, environ=environ))


def loaded_config(hub: HubLayout, monkeypatch) -> Config:
    """The prefix's etc/jupyterhub_config.py executed as JupyterHub executes it (traitlets'
    loader, with load_subconfig); what it adds to sys.path is undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    return PyFileConfigLoader(hub.config_file.name, path=str(hub.etc)).load_config()


def written_config(hub: HubLayout, monkeypatch, node: Path = Path("/usr/bin/node")) -> Config:
    """What the config step writes (and the secrets step's files), loaded."""
    for folder in (hub.etc, hub.config_d, hub.secrets):
        folder.mkdir(parents=True, exist_ok=True)
    ensure_secrets(hub)
    for path, text in config_files(hub, node).items():
        path.write_text(text)
    return loaded_config(hub, monkeypatch)


def config_values(config) -> list:
    """Every value in a loaded configuration, nested lists and dicts opened."""
    if isinstance(config, dict):
        return [leaf for value in config.values() for leaf in config_values(value)]
    if isinstance(config, list):
        return [leaf for value in config for leaf in config_values(value)]
    return [config]


def test_a_local_hub_listens_on_loopback_and_runs_servers_from_its_venv(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, 'port = 8443\nhub_port = 8444\nproxy_api_port = 8445\n'
                           'admin_users = ["ada", "ada"]\nallowed_users = ["bob", "ada"]\n')
    c = written_config(hub, monkeypatch, node=Path("/opt/node/bin/node"))
    prefix = hub.prefix
    assert c.JupyterHub.bind_url == "http://:8443/"
    assert (c.JupyterHub.hub_ip, c.JupyterHub.hub_port) == ("127.0.0.1", 8444)
    assert c.ConfigurableHTTPProxy.api_url == "http://127.0.0.1:8445"
    assert c.ConfigurableHTTPProxy.command == [
        "/opt/node/bin/node", f"{prefix}/node_modules/configurable-http-proxy/bin/"
                              "configurable-http-proxy"]
    assert c.JupyterHub.db_url == f"sqlite:///{prefix}/var/jupyterhub.sqlite"
    assert c.JupyterHub.authenticator_class == "pam"
    assert c.Authenticator.admin_users == ["ada"]
    assert c.Authenticator.allowed_users == ["ada", "bob"]
    assert c.Authenticator.allow_all is False
    assert c.JupyterHub.spawner_class == "localprocess"
    assert c.Spawner.cmd == [f"{prefix}/venv/bin/jupyterhub-singleuser"]
    assert c.Spawner.environment["PATH"].startswith(f"{prefix}/venv/bin:")
    assert c.Spawner.default_url == "/lab"


def test_secrets_stay_in_their_files_and_the_config_reads_them(tmp_path, monkeypatch):
    hub = hub_in(tmp_path)
    c = written_config(hub, monkeypatch)
    assert c.ConfigurableHTTPProxy.auth_token == hub.proxy_token.read_text().strip()
    (status,) = [s for s in c.JupyterHub.services if s["name"] == "hubworks-status"]
    assert status["api_token"] == hub.status_token.read_text().strip()
    assert c.JupyterHub.cookie_secret_file == str(hub.cookie_secret)
    data = hub.config_data_file.read_text()
    for secret in (hub.cookie_secret, hub.proxy_token, hub.status_token):
        assert secret.read_text().strip() not in data, secret


def test_the_offices_own_files_load_last_and_override_anything(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, "allowed_users = [\"ada\"]\n")
    hub.config_d.mkdir(parents=True)
    (hub.config_d / "20-office.py").write_text(
        "c.Spawner.default_url = '/tree'\nc.Authenticator.allowed_users = ['ada', 'bob']\n"
        "c.JupyterHub.services.append({'name': 'announcement', 'url': 'http://127.0.0.1:9'})\n")
    (hub.config_d / "10-office.py").write_text("c.Spawner.default_url = '/doc'\n")
    c = written_config(hub, monkeypatch)
    assert c.Spawner.default_url == "/tree"  # by name order, after hubworks' sections
    assert c.Authenticator.allowed_users == ["ada", "bob"]
    assert [s["name"] for s in c.JupyterHub.services] == ["idle-culler", "hubworks-status",
                                                           "announcement"]


def test_without_its_data_the_config_stops_the_hub_with_the_fix(tmp_path, monkeypatch):
    hub = hub_in(tmp_path)
    written_config(hub, monkeypatch)
    hub.config_data_file.unlink()
    with pytest.raises(SystemExit) as stopped:
        loaded_config(hub, monkeypatch)
    assert f"hubworks: cannot read the hub's settings {hub.config_data_file}" in \
        str(stopped.value)
    assert "fix: run `doit install_hub`" in str(stopped.value)


def test_docker_spawner_config_runs_the_offered_images_through_podmans_api(tmp_path,
                                                                          monkeypatch):
    hub = hub_in(tmp_path, 'spawner = "docker"\nallowed_groups = ["staff"]\n'
                           '[images]\nengine = "podman"\n')
    c = written_config(hub, monkeypatch)
    socket_url, images = f"unix://{hub.prefix}/var/podman.sock", f"{hub.prefix}/etc/images.json"
    # JupyterHub imports hubworks' spawner from etc/, where the config step copies it
    assert c.JupyterHub.spawner_class == "hubworks_spawner.HubworksSpawner"
    assert sys.path[0] == str(hub.etc)
    assert hub.spawner_module.read_text() == \
        (REPO / "tasks" / "hub" / "payload" / "docker_spawner.py").read_text()
    assert c.HubworksSpawner.images_file == images
    assert c.DockerSpawner.client_kwargs == {"base_url": socket_url}
    # containers reach the hub on the bridge's gateway, asked of that engine as the hub starts
    gateway = c.JupyterHub.hub_ip
    assert isinstance(gateway, DeferredConfig)
    assert (gateway.docker_url, gateway.images_file) == (socket_url, images)
    assert c.JupyterHub.hub_connect_ip is gateway
    # nothing listens on every interface
    assert not [value for value in config_values(c) if "0.0.0.0" in str(value)]
    assert c.DockerSpawner.host_ip == "127.0.0.1"
    assert c.JupyterHub.cleanup_servers is False
    assert c.DockerSpawner.pull_policy == "never"
    assert c.LocalAuthenticator.allowed_groups == ["staff"]


def test_docker_url_names_the_engine_and_a_registry_prefix_allows_pulls(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, 'spawner = "docker"\ndocker_url = "tcp://10.1.2.3:2375"\n'
                           '[images]\npush = true\n')
    c = written_config(hub, monkeypatch)
    assert c.DockerSpawner.client_kwargs == {"base_url": "tcp://10.1.2.3:2375"}
    assert c.JupyterHub.hub_ip.docker_url == "tcp://10.1.2.3:2375"
    assert c.DockerSpawner.pull_policy == "ifnotpresent"


# ---- systemd units -------------------------------------------------------------------------

def test_the_systemd_unit_runs_the_hub_from_the_prefix(tmp_path):
    (tmp_path / "hubworks.toml").write_text('[hub]\nprefix = "/srv/hub"\nservice = "systemd"\n')
    unit = render_unit(HubLayout(load_settings(tmp_path, environ={})))
    assert "ExecStart=/srv/hub/venv/bin/jupyterhub -f /srv/hub/etc/jupyterhub_config.py\n" in unit
    assert "WorkingDirectory=/srv/hub/var\n" in unit
    assert "User=root\n" in unit and "Restart=on-failure\n" in unit
    assert "Environment=PATH=/srv/hub/venv/bin:" in unit
    assert "WantedBy=multi-user.target" in unit


def test_with_systemd_podmans_api_is_a_unit_the_hub_requires(tmp_path):
    (tmp_path / "hubworks.toml").write_text(
        '[hub]\nprefix = "/srv/hub"\nspawner = "docker"\nservice = "systemd"\n'
        '[images]\nengine = "podman"\n')
    hub = HubLayout(load_settings(tmp_path, environ={}))
    unit = render_podman_unit(hub)
    assert re.search(r"^ExecStart=/\S*podman system service --time=0 "
                     r"unix:///srv/hub/var/podman\.sock$", unit, re.M), unit
    assert "EnvironmentFile=/srv/hub/etc/podman-service.env\n" in unit
    # stopping the API must not stop users' containers (their conmon shares its cgroup)
    assert "KillMode=process\n" in unit and "Delegate=true\n" in unit
    hub_unit = render_unit(hub)
    assert "Requires=jupyterhub-podman.service\nAfter=jupyterhub-podman.service\n" in hub_unit
