"""Who may read, write and enter the hub's files: permission checks and private files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..core.errors import HubworksError


OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH



def blocked_for_others(path: Path | str) -> str | None:
    """Why a user other than the owner cannot execute ``path`` (None: every user can).

    Every directory on the way, as written and as resolved, needs "x" for others, and so
    does the file itself: an interpreter under /root runs for root only.
    """
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    for place in dict.fromkeys([*reversed(given.parents), *reversed(real.parents), real]):
        try:
            mode = os.stat(place).st_mode
        except OSError as exc:
            return f"{place} cannot be read ({exc.strerror})"
        if not mode & stat.S_IXOTH:
            what = "is closed to" if stat.S_ISDIR(mode) else "is not executable by"
            return f"{place} {what} other users (mode {stat.S_IMODE(mode):o})"
    return None


def first_writable_by_others(tree: Path) -> Path | None:
    """The first file or folder under ``tree`` that group or others may write, if any."""
    try:
        if os.lstat(tree).st_mode & OTHERS_WRITE:
            return tree
    except FileNotFoundError:
        return None
    stack = [str(tree)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    continue
                if mode & OTHERS_WRITE:
                    return Path(entry.path)
                if stat.S_ISDIR(mode):
                    stack.append(entry.path)
    return None


def make_readable_not_writable(tree: Path, *, readable: bool = True) -> None:
    """Drop group/other write everywhere under ``tree``; with ``readable`` also grant a+rX."""
    for root, dirs, files in os.walk(tree):
        for name in [None, *files]:
            path = root if name is None else os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode) & ~OTHERS_WRITE
            if readable:
                mode |= 0o444
                if stat.S_ISDIR(st.st_mode) or mode & 0o100:
                    mode |= 0o111
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(path, mode)


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` with ``mode`` from the first byte on (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def user_name(uid: int | None = None) -> str:
    import pwd
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def require_root(doing: str) -> None:
    if os.geteuid() != 0:
        raise HubworksError(
            f"{doing} needs root; this runs as {user_name()}.",
            fix="run it as root, e.g. sudo doit install_hub")
