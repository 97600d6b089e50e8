"""A hub's life after the install: backups, restores and upgrades, with real hubs on podman.

The story: an office's hub runs JupyterHub 5 with the docker spawner. Two users logged in;
one has a running server and a file in their home volume. `doit hub_backup` writes an archive
while the hub is busy; a damaged archive and one from a newer JupyterHub are refused before
anything changes. An upgrade to JupyterHub 6 that the office's own config breaks goes back to
JupyterHub 5, which answers again with nothing lost; without that file the upgrade goes
through and the running server, its route and the file stay. Then the server is lost: the
prefix and the volumes are gone, install_hub runs again, and hub_restore brings the users
back with their files and their login cookies.

Needs root (useradd, PAM, podman's root-only socket), podman with runc, mmdebstrap, PyPI and
npm. One hub for the module; the tests run in order, each from where the last left it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
import stat
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
import requests

from tasks.core.settings import SETTINGS, load_settings
from tasks.hub.layout import HubLayout
from tasks.hub.steps import schema_head
from tests.docker_hubs import Browser, DockerSite, add_image, build_and_install, docker_hub
from tests.test_hub import PREVIOUS_JUPYTERHUB

CURRENT_JUPYTERHUB = next(s.default for s in SETTINGS if s.key == "jupyterhub_version")
OLD_PIN = {"HUBWORKS_HUB_JUPYTERHUB_VERSION": PREVIOUS_JUPYTERHUB}
NOTE = "written before the upgrade\n"
# an office file that imports a module JupyterHub 6 no longer has: 5 loads it, 6 cannot
BREAKS_ON_6 = "from jupyterhub.emptyclass import EmptyClass  # noqa\n"


class Users:
    """Two users of one hub: ``first`` has a running server with a file, ``second`` none."""

    def __init__(self, site: DockerSite, second: DockerSite):
        self.site, self.second_site = site, second
        self.first = Browser(site)
        self.second = Browser(second)


def database_rows(prefix: Path, query: str) -> list:
    with sqlite3.connect(f"file:{prefix / 'var' / 'jupyterhub.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


def hub_version(site: DockerSite) -> str:
    return requests.get(f"{site.url}/hub/api/", timeout=10).json()["version"]


@pytest.fixture(scope="module")
def old_hub(podman_runtime, hub_base_image):
    """A JupyterHub 5 hub with the docker spawner; images for its singleuser 5 and for 6."""
    with docker_hub(podman_runtime, tag="hwup", image_prefix="hubworks-uptest",
                    users=("a", "b")) as site:
        add_image(site.ws, "lab", f"FROM {hub_base_image}\n")
        add_image(site.ws, "lab5", f"FROM {hub_base_image}\nUSER root\nRUN /opt/venv/bin/pip "
                                   f"install --no-cache-dir --quiet "
                                   f"jupyterhub=={PREVIOUS_JUPYTERHUB}\nUSER jovyan\n")
        build_and_install(site, OLD_PIN)
        users = Users(site, site.as_user(next(n for n in site.passwords if n != site.user)))
        users.first.pick("lab5")
        written = users.first.server_api("PUT", "/contents/note.txt", json={
            "type": "file", "format": "text", "content": NOTE})
        assert written.status_code in (200, 201), written.text
        yield users


def the_file_is_there(users: Users) -> None:
    read = users.first.server_api("GET", "/contents/note.txt")
    assert read.status_code == 200, read.text
    assert read.json()["content"] == NOTE


def archives(site: DockerSite) -> list[Path]:
    return sorted((site.prefix / "backups").glob("hub-*.tar"))


# ---- backups -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_backup_while_the_hub_is_busy_is_consistent_complete_and_root_only(old_hub):
    site, busy = old_hub.site, threading.Event()

    def keep_asking():  # each request writes the user's last activity into the database
        while not busy.is_set():
            old_hub.second.hub_api("GET", f"/users/{site.user}")
            old_hub.second.session.get(f"{site.url}/hub/home", timeout=30)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        run = site.doit("hub_backup")
    finally:
        busy.set()
        asker.join()
    assert run.returncode == 0, run.output
    (archive,) = archives(site)
    assert f"wrote {archive} (" in run.output
    assert f"JupyterHub {PREVIOUS_JUPYTERHUB}" in run.output
    assert f"home volumes hubworks-home-{site.user}" in run.output
    for secret in (site.prefix / "secrets").iterdir():
        if secret.is_file():
            assert secret.read_text().strip() not in run.output
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert stat.S_IMODE(archive.parent.stat().st_mode) == 0o700
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as scratch:
        manifest = json.load(tar.extractfile("manifest.json"))
        tar.extract("database/jupyterhub.sqlite", scratch, filter="data")
        with sqlite3.connect(Path(scratch) / "database" / "jupyterhub.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        names = set(tar.getnames())
    assert manifest["jupyterhub"] == PREVIOUS_JUPYTERHUB
    assert sorted(manifest["users"]) == sorted([site.user, old_hub.second_site.user])
    assert {"secrets/jupyterhub_cookie_secret", "secrets/proxy_auth_token",
            "etc/hubworks_config.json", "etc/images.json", "etc/settings.json",
            f"volumes/hubworks-home-{site.user}.tar"} <= names
    assert set(manifest["members"]) == {n for n in names if n != "manifest.json"
                                        and tar_is_file(archive, n)}


def tar_is_file(archive: Path, name: str) -> bool:
    with tarfile.open(archive) as tar:
        return tar.getmember(name).isfile()


@pytest.mark.slow
def test_an_archive_with_one_byte_changed_is_refused_naming_the_member(old_hub, tmp_path):
    site = old_hub.site
    (archive,) = archives(site)
    damaged = tmp_path / archive.name
    shutil.copy(archive, damaged)
    with tarfile.open(damaged) as tar:
        offset = tar.getmember("secrets/proxy_auth_token").offset_data
    with damaged.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 1]))
    pid_file = site.prefix / "var" / "jupyterhub.pid"
    pid, database = pid_file.read_text(), database_rows(site.prefix, "SELECT name FROM users")
    run = site.doit("hub_restore", "--archive", str(damaged))
    assert run.returncode != 0
    assert "member secrets/proxy_auth_token: its sha256 differs" in run.output, run.output
    assert "nothing was restored" in run.output
    assert database_rows(site.prefix, "SELECT name FROM users") == database
    assert pid_file.read_text() == pid, "the hub was not stopped"


# ---- upgrades ------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_upgrade_the_new_version_cannot_start_goes_back_with_nothing_lost(old_hub):
    site = old_hub.site
    office = site.prefix / "etc" / "jupyterhub_config.d" / "50-office.py"
    office.write_text(BREAKS_ON_6)
    try:
        site.install(OLD_PIN)  # JupyterHub 5 loads it
        before = site.containers()
        plan = site.doit("install_hub_plan")
        assert f"upgrade jupyterhub {PREVIOUS_JUPYTERHUB} -> {CURRENT_JUPYTERHUB}" in \
            plan.output, plan.output
        run = site.doit("install_hub")
        assert run.returncode != 0, run.output
        assert "the upgrade (jupyterhub" in run.output and "failed" in run.output
        assert "emptyclass" in run.output, run.output
        assert "rolled back" in run.output and f"{site.prefix}/var/jupyterhub.log" in run.output
        assert hub_version(site) == PREVIOUS_JUPYTERHUB
        assert requests.get(f"{site.url}/hub/health", timeout=10).status_code == 200
        assert sorted(name for (name,) in database_rows(site.prefix, "SELECT name FROM users")) \
            == sorted([site.user, old_hub.second_site.user])
        assert site.containers() == before
        the_file_is_there(old_hub)
        assert not (site.prefix / "var" / "upgrade.json").exists()
    finally:
        office.unlink()


@pytest.mark.slow
def test_an_upgrade_across_a_major_keeps_users_servers_and_files(old_hub):
    site = old_hub.site
    before = site.containers()
    run = site.install()
    assert {"jupyterhub", "database", "health"} <= site_steps(run), run.output
    assert "backed up to" in run.output and "the proxy routes every running server" in \
        run.output, run.output
    assert hub_version(site) == CURRENT_JUPYTERHUB
    (revision,) = database_rows(site.prefix, "SELECT version_num FROM alembic_version")[0]
    assert revision == schema_head(HubLayout(load_settings(site.ws.root, environ={})))
    assert sorted(name for (name,) in database_rows(site.prefix, "SELECT name FROM users")) == \
        sorted([site.user, old_hub.second_site.user])
    assert site.containers() == before, "the running server kept its container"
    the_file_is_there(old_hub)  # through the proxy: the server is still routed
    # done once: a re-run builds and upgrades nothing
    assert not {"venv", "jupyterhub", "database"} & site_steps(site.install())


def site_steps(run) -> set[str]:
    return set(re.findall(r"^\.  install_hub:(\w+)", run.output, re.M))


# ---- restoring onto a new server -------------------------------------------------------------

def with_manifest(archive: Path, copy: Path, change: dict) -> Path:
    """A copy of ``archive`` whose manifest has ``change``; its members are unchanged."""
    with tarfile.open(archive) as source, tarfile.open(copy, "w") as target:
        for member in source:
            data = source.extractfile(member) if member.isfile() else None
            if member.name == "manifest.json":
                text = json.dumps({**json.load(data), **change}).encode()
                member.size, data = len(text), io.BytesIO(text)
            target.addfile(member, data)
    return copy


@pytest.mark.slow
def test_a_new_server_restored_from_a_backup_has_the_users_files_and_logins(old_hub,
                                                                             podman_runtime):
    site, first = old_hub.site, old_hub.first
    run = site.doit("hub_backup")
    assert run.returncode == 0, run.output
    archive = archives(site)[-1]
    kept = Path(tempfile.mkdtemp(prefix="hubworks-kept-")) / archive.name
    shutil.copy(archive, kept)
    try:
        # the server is lost: hub, containers, volumes, prefix
        assert site.doit("hub_stop").returncode == 0
        for name in site.containers():
            podman_runtime.podman("rm", "--force", "--time", "0", name)
        for user in (site.user, old_hub.second_site.user):
            podman_runtime.podman("volume", "rm", "--force", f"hubworks-home-{user}")
        shutil.rmtree(site.prefix)
        site.install()
        # an archive from a newer JupyterHub, or with a schema this one does not know, is
        # refused before anything changes (the manifest is edited: installing an older
        # JupyterHub here would cost minutes and test the same comparison)
        for change, says in (({"jupyterhub": "99.0.0"}, "install JupyterHub 99.0.0 first"),
                             ({"schema": "f0f0f0f0f0f0"}, "its database schema f0f0f0f0f0f0 "
                                                          "is newer than what JupyterHub")):
            newer = with_manifest(kept, kept.parent / f"newer-{archive.name}", change)
            refused = site.doit("hub_restore", "--archive", str(newer))
            assert refused.returncode != 0
            assert says in refused.output and "nothing was restored" in refused.output, \
                refused.output
        restored = site.doit("hub_restore", "--archive", str(kept))
        assert restored.returncode == 0, restored.output
        assert f"imported home volumes hubworks-home-{site.user}" in restored.output
        # the cookie from before the backup still logs the user in
        me = first.hub_api("GET", "/user")
        assert me.status_code == 200 and me.json()["name"] == site.user, me.text
        first.pick("lab")
        the_file_is_there(old_hub)
        assert Browser(old_hub.second_site).hub_api("GET", "/user").json()["name"] == \
            old_hub.second_site.user
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)

