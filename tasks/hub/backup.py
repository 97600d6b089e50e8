"""hub_backup and hub_restore: one archive with what the hub needs to come back.

The archive is a plain tar, root-only (0600 in a 0700 folder), named by its UTC time:

- ``database/jupyterhub.sqlite``: sqlite's online backup, consistent while the hub writes;
- ``secrets/``: the whole folder (cookie secret, proxy token, service tokens, the TLS
  certificate and key, certbot's ACME account);
- ``etc/``: the configuration (hubworks_config.json, jupyterhub_config.d/, images.json) and
  ``settings.json``, the [hub] settings the hub was installed with;
- ``volumes/<name>.tar``: each user's home volume (docker spawner, ``podman volume export``);
- ``homes/<user>/``: each user's home folder (local spawner with ``hub.backup_homes``);
- ``manifest.json``, last: the sha256 and size of every other member, the JupyterHub version
  and the database schema.

A restore checks every member against the manifest, and the versions against the installed
JupyterHub, before it changes anything; then it stops the hub, puts everything back and
starts it again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HubworksError
from .containers import docker_api, podman_binary, recorded_podman_env
from .layout import HubLayout
from .permissions import require_root
from .service import start_hub, stop_hub
from .versions import parse_version

MANIFEST = "manifest.json"
FORMAT = 1
ARCHIVE_PATTERN = re.compile(r"^hub-\d{8}-\d{6}(-\d+)?\.tar$")
DATABASE_MEMBER = "database/jupyterhub.sqlite"
HOME_VOLUME = "hubworks-home-{}"  # DockerSpawner's home_volume in payload/docker_spawner.py
PODMAN_SECONDS = 600


@dataclass(frozen=True)
class Backup:
    path: Path
    manifest: dict

    def says(self) -> str:
        m = self.manifest
        size = _size(self.path.stat().st_size)
        database = (f"database (schema {m['schema']}, {len(m['users'])} users)"
                    if m["schema"] else "no database (the hub never started)")
        homes = (f"home volumes {', '.join(m['volumes'])}" if m["volumes"] else
                 f"home folders of {', '.join(m['homes'])}" if m["homes"] else
                 f"no homes ({m['homes_note']})")
        counts = {part: sum(1 for name in m["members"] if name.startswith(part + "/"))
                  for part in ("secrets", "etc")}
        return (f"{self.path} ({size}): JupyterHub {m['jupyterhub']}, {database}, "
                f"{counts['secrets']} secret files, {counts['etc']} configuration files, "
                f"{homes}")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


# ---- what the installed hub is -------------------------------------------------------------

def installed_jupyterhub(hub: HubLayout) -> str | None:
    from .steps import installed_version  # steps runs upgrades, which back up first

    return installed_version(hub, "jupyterhub")


def known_schemas(hub: HubLayout) -> set[str]:
    """Every alembic revision the installed JupyterHub knows (its migration scripts)."""
    site = hub.site_packages()
    folder = site / "jupyterhub" / "alembic" / "versions" if site else None
    if folder is None or not folder.is_dir():
        return set()
    found = set()
    for script in folder.glob("*.py"):
        match = re.search(r"^revision\s*=\s*['\"](\w+)['\"]", script.read_text(), re.M)
        if match:
            found.add(match.group(1))
    return found


def copy_database(source: Path, target: Path) -> None:
    """sqlite's online backup: a consistent copy while the hub writes to ``source``."""
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _read_database(path: Path) -> tuple[str | None, list[str]]:
    """The schema revision and user names of a database file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        users = [name for (name,) in db.execute("SELECT name FROM users ORDER BY name")]
    return (row[0] if row else None), users


# ---- writing the archive -------------------------------------------------------------------

class _HashingReader(io.RawIOBase):
    """A file read once: into the tar and into its sha256 at the same time."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.handle.read(len(buffer))
        self.digest.update(data)
        buffer[:len(data)] = data
        return len(data)


class _Writer:
    def __init__(self, tar: tarfile.TarFile):
        self.tar, self.members = tar, {}

    def add_file(self, path: Path, name: str) -> None:
        info = self.tar.gettarinfo(str(path), arcname=name)
        with path.open("rb") as handle:
            reader = _HashingReader(handle)
            self.tar.addfile(info, reader)
        self.members[name] = {"sha256": reader.digest.hexdigest(), "size": info.size}

    def add_bytes(self, data: bytes, name: str, mode: int = 0o600) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, int(dt.datetime.now().timestamp())
        self.tar.addfile(info, io.BytesIO(data))
        self.members[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def add_tree(self, folder: Path, name: str) -> None:
        """A folder with its files' owners and modes (folders too, so a restore keeps them)."""
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            rel = Path(root).relative_to(folder)
            here = name if rel == Path(".") else f"{name}/{rel.as_posix()}"
            self.tar.add(root, arcname=here, recursive=False)
            for file in sorted(files):
                path = Path(root, file)
                if path.is_symlink():
                    self.tar.add(str(path), arcname=f"{name}/{(rel / file).as_posix()}",
                                 recursive=False)
                    continue
                if not path.is_file():
                    continue  # sockets and pipes hold nothing to bring back
                try:
                    self.add_file(path, f"{name}/{(rel / file).as_posix()}")
                except FileNotFoundError:
                    continue  # removed while the backup ran (a home folder in use)


def take_backup(hub: HubLayout) -> Backup:
    """Write one archive of the hub into hub.backup_dir; keep the newest hub.backup_keep."""
    require_root("backing up the hub (its database and secrets are root's)")
    if not hub.secrets.is_dir():
        raise HubworksError(f"there is no hub to back up at {hub.prefix} ({hub.secrets} is "
                            f"missing).", fix="run doit install_hub first, or set hub.prefix")
    folder = hub.backup_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = _archive_name(folder)
    partial = path.with_name(path.name + ".partial")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".hub-backup-") as scratch:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w",
                                                             format=tarfile.PAX_FORMAT) as tar:
                manifest = _write_members(hub, _Writer(tar), Path(scratch))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, path)
    _keep_newest(folder, hub.hub_settings.backup_keep)
    return Backup(path, manifest)


def _archive_name(folder: Path) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"hub-{stamp}.tar", 1
    while path.exists():
        path, n = folder / f"hub-{stamp}-{n}.tar", n + 1
    return path


def _write_members(hub: HubLayout, writer: _Writer, scratch: Path) -> dict:
    schema, users = None, []
    if hub.database.exists():
        copy = scratch / "jupyterhub.sqlite"
        copy_database(hub.database, copy)
        schema, users = _read_database(copy)
        writer.add_file(copy, DATABASE_MEMBER)
    writer.add_tree(hub.secrets, "secrets")
    for path in (hub.config_data_file, hub.config_file, hub.images_file):
        if path.is_file():
            writer.add_file(path, f"etc/{path.name}")
    if hub.config_d.is_dir():
        writer.add_tree(hub.config_d, f"etc/{hub.config_d.name}")
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in vars(hub.hub_settings).items() if not key.startswith("_")}
    writer.add_bytes((json.dumps(settings, indent=1, sort_keys=True) + "\n").encode(),
                     "etc/settings.json")
    volumes, homes, note = _write_homes(hub, writer, scratch, users)
    manifest = {"format": FORMAT, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                "prefix": str(hub.prefix), "jupyterhub": installed_jupyterhub(hub),
                "schema": schema, "users": users, "spawner": hub.choice("spawner"),
                "volumes": volumes, "homes": homes, "homes_note": note,
                "members": writer.members}
    writer.add_bytes((json.dumps(manifest, indent=1) + "\n").encode(), MANIFEST)
    return manifest


def _write_homes(hub: HubLayout, writer: _Writer, scratch: Path,
                 users: list[str]) -> tuple[list[str], list[str], str]:
    """Users' homes: the docker spawner's volumes, or (hub.backup_homes) local folders."""
    if hub.uses_docker:
        if not docker_api(hub).managed:
            return [], [], ("the engine is not podman's service of install_hub, and only "
                            "podman exports volumes")
        volumes = []
        for user in users:
            volume = HOME_VOLUME.format(user)
            if not _podman(hub, "volume", "exists", volume, check=False).returncode == 0:
                continue
            export = scratch / f"{volume}.tar"
            _podman(hub, "volume", "export", volume, "--output", str(export))
            writer.add_file(export, f"volumes/{volume}.tar")
            export.unlink()
            volumes.append(volume)
        return volumes, [], "" if volumes else "no user has a home volume yet"
    if not hub.hub_settings.backup_homes:
        return [], [], "hub.backup_homes is off"
    homes = []
    for user in users:
        try:
            home = Path(pwd.getpwnam(user).pw_dir)
        except KeyError:
            continue  # a hub user without a system account has no home folder here
        if home.is_dir():
            writer.add_tree(home, f"homes/{user}")
            homes.append(user)
    return [], homes, "" if homes else "no user has a home folder"


def _podman(hub: HubLayout, *args: str, check: bool = True,
            stdin=None) -> subprocess.CompletedProcess:
    """podman with the configuration its API service for the hub runs with."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(recorded_podman_env(hub) or {})}
    done = subprocess.run([podman_binary(), *args], env=env, capture_output=True, text=True,
                          timeout=PODMAN_SECONDS, stdin=stdin)
    if check and done.returncode:
        raise HubworksError(f"podman {' '.join(args[:3])} failed: "
                            f"{done.stderr.strip()[-500:]}",
                            fix="fix what podman says (`podman volume ls` lists the volumes), "
                                "then run it again")
    return done


def _keep_newest(folder: Path, keep: int) -> None:
    archives = sorted(p for p in folder.iterdir() if ARCHIVE_PATTERN.match(p.name))
    for old in archives[:-keep]:
        old.unlink()


# ---- restoring -----------------------------------------------------------------------------

def read_manifest(tar: tarfile.TarFile, archive: Path) -> dict:
    try:
        member = tar.getmember(MANIFEST)
        manifest = json.loads(tar.extractfile(member).read())
        if manifest.get("format") != FORMAT or "members" not in manifest:
            raise ValueError("unknown format")
    except (KeyError, ValueError, AttributeError) as exc:
        raise HubworksError(f"{archive} is not a hub backup of this hubworks: its "
                            f"{MANIFEST} is missing or unreadable ({exc}).",
                            fix="name an archive that doit hub_backup wrote") from None
    return manifest


def verify_archive(archive: Path) -> dict:
    """Every member's sha256 against the manifest; the manifest if they all match."""
    if not archive.is_file():
        raise HubworksError(f"there is no archive at {archive}.",
                            fix="name one that doit hub_backup wrote: "
                                "doit hub_restore --archive PATH")
    last = "the first member"
    try:
        with tarfile.open(archive, mode="r:") as tar:
            manifest = read_manifest(tar, archive)
            expected, seen = manifest["members"], set()
            for member in tar:
                last = member.name
                if member.name == MANIFEST or not member.isfile():
                    continue
                want = expected.get(member.name)
                if want is None:
                    raise _refused(archive, member.name, "its manifest does not list it")
                digest = hashlib.sha256()
                handle = tar.extractfile(member)
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                if digest.hexdigest() != want["sha256"]:
                    raise _refused(archive, member.name, "its sha256 differs from the "
                                                         "manifest's (the archive changed)")
                seen.add(member.name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise HubworksError(f"{archive} is damaged after member {last}: {exc}.",
                            fix="restore from another archive (doit hub_backup keeps "
                                "hub.backup_keep of them)") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise _refused(archive, missing[0], "it is missing from the archive")
    return manifest


def _refused(archive: Path, member: str, why: str) -> HubworksError:
    return HubworksError(f"{archive} does not verify: member {member}: {why}; nothing was "
                         f"restored.", fix="restore from another archive (doit hub_backup "
                                           "keeps hub.backup_keep of them)")


def check_versions(hub: HubLayout, manifest: dict) -> None:
    """Refuse an archive made by a newer JupyterHub (its database would not load here)."""
    installed = installed_jupyterhub(hub)
    if installed is None:
        raise HubworksError(f"no JupyterHub is installed at {hub.prefix} to restore into.",
                            fix="run doit install_hub first, then doit hub_restore")
    made_by, schema = manifest.get("jupyterhub"), manifest.get("schema")
    newer = made_by and parse_version(made_by) > parse_version(installed)
    unknown = schema and schema not in known_schemas(hub)
    if newer or unknown:
        why = (f"made by JupyterHub {made_by}, newer than the installed {installed}" if newer
               else f"its database schema {schema} is newer than what JupyterHub "
                    f"{installed} knows")
        raise HubworksError(f"the archive was {why}; nothing was restored.",
                            fix=f"install JupyterHub {made_by} first (hub.jupyterhub_version = "
                                f"\"{made_by}\", doit install_hub), then doit hub_restore "
                                f"again")


def _check_accounts(manifest: dict) -> None:
    """Local home folders go back to their users' system accounts, which must exist."""
    for user in manifest.get("homes", []):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise HubworksError(f"the archive holds the home folder of {user}, who has no "
                                f"system account here; nothing was restored.",
                                fix=f"create the account first (useradd -m {user}), then "
                                    f"doit hub_restore again") from None


def restore_backup(hub: HubLayout, archive: Path) -> str:
    require_root("restoring the hub (its database and secrets are root's)")
    archive = Path(archive).absolute()
    manifest = verify_archive(archive)
    check_versions(hub, manifest)
    _check_accounts(manifest)
    said = [f"{archive} verified ({len(manifest['members'])} members)"]
    stopped = stop_hub(hub)
    said.append(stopped)
    with tarfile.open(archive, mode="r:") as tar:
        members = [m for m in tar.getmembers() if m.name != MANIFEST]
        said += _put_back(hub, tar, members, manifest)
    said.append(_upgrade_database(hub))
    hub.upgrade_file.unlink(missing_ok=True)  # an upgrade under way is over: this is the state
    said.append(start_hub(hub))
    return "\n".join(part for part in said if part)


def _put_back(hub: HubLayout, tar: tarfile.TarFile, members: list[tarfile.TarInfo],
              manifest: dict) -> list[str]:
    said = []
    by_part: dict[str, list[tarfile.TarInfo]] = {}
    for member in members:
        by_part.setdefault(member.name.split("/", 1)[0], []).append(member)
    if DATABASE_MEMBER in manifest["members"]:
        _extract_file(tar, tar.getmember(DATABASE_MEMBER), hub.database, 0o600)
        for leftover in ("-journal", "-wal", "-shm"):
            Path(f"{hub.database}{leftover}").unlink(missing_ok=True)
        said.append(f"put back the database (schema {manifest['schema']}, users "
                    f"{', '.join(manifest['users']) or 'none'})")
    _extract_under(tar, by_part.get("secrets", []), "secrets", hub.secrets)
    said.append("put back the secrets (cookie secret, tokens, TLS, ACME account)")
    config = _put_back_config(hub, tar, by_part.get("etc", []))
    said.append(f"put back {config}")
    for volume in manifest.get("volumes", []):
        _import_volume(hub, tar, tar.getmember(f"volumes/{volume}.tar"), volume)
    if manifest.get("volumes"):
        said.append(f"imported home volumes {', '.join(manifest['volumes'])}")
    for user in manifest.get("homes", []):
        home = Path(pwd.getpwnam(user).pw_dir)
        _extract_under(tar, [m for m in by_part.get("homes", [])
                             if m.name.split("/")[1] == user], f"homes/{user}", home)
    if manifest.get("homes"):
        said.append(f"put back the home folders of {', '.join(manifest['homes'])}")
    return said


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path,
                  mode: int) -> None:
    temporary = target.with_name(f".{target.name}.restoring")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        shutil.copyfileobj(tar.extractfile(member), handle)
    os.replace(temporary, target)


def _extract_under(tar: tarfile.TarFile, members: list[tarfile.TarInfo], part: str,
                   target: Path) -> None:
    """Members under ``part/`` into ``target``, with their modes and owners (by name)."""
    renamed = []
    for member in members:
        rel = member.name[len(part):].lstrip("/")
        if not rel:
            continue
        copy = member.replace(name=rel, deep=False)
        renamed.append(copy)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    # "tar": owners and modes as archived, nothing outside target
    tar.extractall(target, members=renamed, filter="tar")


def _put_back_config(hub: HubLayout, tar: tarfile.TarFile,
                     members: list[tarfile.TarInfo]) -> str:
    """The office's config files and the offered images; install_hub writes the rest from
    the settings (etc/settings.json in the archive holds the ones it was installed with)."""
    office = f"etc/{hub.config_d.name}"
    ours = [m for m in members if m.name.startswith(office + "/")]
    if hub.config_d.is_dir():
        for old in hub.config_d.iterdir():
            if old.is_file() and f"{office}/{old.name}" not in {m.name for m in ours}:
                old.unlink()  # not in the archive: the restored hub did not have it
    _extract_under(tar, ours, office, hub.config_d)
    os.chmod(hub.config_d, 0o755)
    restored = [f"{hub.config_d.name}/ ({len(ours)} files)"]
    images = f"etc/{hub.images_file.name}"
    if any(m.name == images for m in members):
        _extract_file(tar, tar.getmember(images), hub.images_file, 0o644)
        restored.append(hub.images_file.name)
    return " and ".join(restored)


def _import_volume(hub: HubLayout, tar: tarfile.TarFile, member: tarfile.TarInfo,
                   volume: str) -> None:
    if _podman(hub, "volume", "exists", volume, check=False).returncode != 0:
        _podman(hub, "volume", "create", volume)
    with tempfile.NamedTemporaryFile(dir=hub.var, prefix=".volume-", suffix=".tar") as handle:
        shutil.copyfileobj(tar.extractfile(member), handle)
        handle.flush()
        _podman(hub, "volume", "import", volume, handle.name)


def _upgrade_database(hub: HubLayout) -> str:
    """An archive of an older JupyterHub: its database goes to the installed schema."""
    from .steps import check_database, ensure_database

    if not hub.database.exists() or check_database(hub).ok:
        return ""
    return ensure_database(hub)
