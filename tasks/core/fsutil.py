"""Small file helpers shared by every task: atomic writes, locks, links and package file names."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

PACKAGE_SUFFIXES = (".conda", ".tar.bz2")


def is_package(name: str) -> bool:
    return name.endswith(PACKAGE_SUFFIXES) and not name.startswith(".")


def _replace_atomically(target: Path, write: Callable[[BinaryIO], None], mode: int) -> None:
    # A temporary file in the same directory, so os.replace is a rename on one filesystem.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_bytes(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``target`` with ``data``; a concurrent reader sees the old or the new file."""
    _replace_atomically(target, lambda handle: handle.write(data), mode)


def atomic_write_json(target: Path, value: Any) -> None:
    atomic_write_bytes(target, json.dumps(value, indent=1, sort_keys=True).encode())


def atomic_copy(source: Path, target: Path, mode: int = 0o644) -> None:
    """Copy ``source`` over ``target`` atomically (readers never see a partial file)."""
    def copy(handle: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, handle, 1 << 20)

    _replace_atomically(target, copy, mode)


def sync_files(paths: Iterable[Path], mode: int | None = None) -> None:
    """Flush many finished files to disk (setting ``mode`` first), several at a time: the
    filesystem commits concurrent flushes together, ten times faster than one by one."""
    def sync(path: Path) -> None:
        if mode is not None:
            os.chmod(path, mode)
        _fsync_file(path)

    paths = list(paths)
    if len(paths) < 4:
        for path in paths:
            sync(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16, thread_name_prefix="hubworks-sync") as pool:
        list(pool.map(sync, paths))


def replace_with_link(source: Path, target: Path) -> None:
    """Make ``target`` another name of the finished, synced file ``source``, in one step
    (readers see the old file or this one); a synced copy where a hard link cannot be
    made (another filesystem). ``source`` must never be changed in place afterwards."""
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    try:
        os.link(source, tmp)
    except OSError:
        atomic_copy(source, target)
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def publish_new_file(source: Path, target: Path, mode: int = 0o644) -> None:
    """Move the finished file ``source`` to ``target`` in one step, never replacing a file
    already there (FileExistsError, and ``source`` is left where it was).

    A hard link both appears at once and refuses an existing name; across filesystems the
    file is first copied (and synced) next to ``target``, then linked into place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(source, mode)
    _fsync_file(source)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                       dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle, source.open("rb") as src:
                    shutil.copyfileobj(src, handle, 1 << 20)
                publish_new_file(Path(tmp), target, mode)
            finally:
                _unlink_quietly(tmp)
        elif exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            # A filesystem without hard links: a rename after the check (callers hold a lock).
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
            os.rename(source, target)
        else:
            raise
    _unlink_quietly(source)
    fsync_dir(target.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make the renames done in ``folder`` durable (before a later file relies on them)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """``target`` as a hard link of ``source``, or a copy where links fail (another
    filesystem, or links not allowed): a throwaway view of files, never published."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_json(path: Path, default: Any = None) -> Any:
    """``path`` parsed, or ``default`` when it is missing or not JSON."""
    # orjson: repodata and the index state run to megabytes, where the stdlib json is 5x
    # slower. Imported here like the other third-party libraries, so modules that only
    # import fsutil (the hub steps, via images) load nothing beyond doit and the stdlib.
    import orjson

    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return default


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every file in a folder tree, sorted, skipping caches and editor droppings."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in {"__pycache__", ".git"})
        for name in sorted(filenames):
            if name.endswith((".pyc", "~", ".swp")) or name == ".DS_Store":
                continue
            found.append(Path(dirpath, name))
    return found


def tree_digest(folder: Path, files: Iterable[Path] | None = None) -> str:
    """A content hash of a folder: relative names, modes and bytes of every file."""
    digest = hashlib.sha256()
    for path in files if files is not None else folder_files(folder):
        rel = path.relative_to(folder).as_posix()
        digest.update(rel.encode() + b"\0")
        digest.update(b"x" if os.access(path, os.X_OK) else b"-")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold ``what`` alone, across threads and doit processes; say so when waiting for it.

    An advisory ``flock`` on ``lock_file``: the kernel drops it when the holder exits, so a
    killed run never leaves a stale lock behind.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"   waiting for another run to finish with {what}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
