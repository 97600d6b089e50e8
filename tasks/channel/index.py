"""index_channel: repodata for every subdir of channel/, and a browsable index.html.

rattler's indexer (``rattler.index.index_fs``) reads packages and writes repodata.json and
sharded repodata. Used directly it decides what changed by file name only, aborts on a
corrupt package, rewrites every shard and recompresses everything on each pass (seconds
at 20,000 packages), and writes into the directory clients are reading. So here:

- validation: every new or changed package is read whole first, once, in one process per
  core (``tasks.package_files``: every compressed stream, checksum and archive header, and
  index.json and about.json for the page); an unreadable one is left out and named in the
  error, and the rest of the channel is still indexed and served;
- a package whose index.json names another subdir than the folder it is in, or another
  name, version or build than its file name says, is refused the same way (it would land
  in the wrong repodata, or clients would download it under a name it does not have);
- only the package names a change touches go to rattler, in a fresh folder of hard links
  (so a package replaced under the same file name is read again); their records and shards
  replace the old ones in a staged copy of the index under ``<state_dir>/index/``, whose
  records are kept as JSON text (``Records``) so a change copies bytes instead of parsing
  and writing every record again; a channel without index state goes to rattler whole,
  while its files are checked (``_EarlyIndex``);
- nothing is lost: every state file is written atomically and synced; a staged index that
  cannot be read, or that does not hold exactly the packages the state says it does, is
  rebuilt from the subdir's packages; a run ends with every readable package indexed;
- repodata.json.zst is compressed at a fast level;
- atomic publication: new shards first, then the shard index and the repodata files, each
  replaced by rename, so a client never reads a partial file or a dangling shard; served
  files are hard links of the staged ones, which are synced once and never changed;
- ``index.html`` at the channel root lists every package with its summary; its rows are
  kept by package name and only the names a change touches are rendered again.

The doit task is up to date while the channel's listing (names, sizes, mtimes) matches the
one last indexed (``indexed.json``): one directory scan, no hashing of packages.
"""

from __future__ import annotations

import datetime as dt
import errno
import gc
import hashlib
import html
import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import compress
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import orjson

from ..core.errors import HubworksError, reports_errors
from ..core.fsutil import (PACKAGE_SUFFIXES, atomic_write_bytes, exclusive_lock, fsync_dir,
                           link_or_copy, read_json, replace_with_link, sha256_file, sync_files)
from ..core.run_scope import RUN
from ..core.settings import Settings
from .package_files import conda_zip_opens, read_package
from .repodata import SECTIONS, section_records

STATE_VERSION = 5  # 5: file names are checked against index.json; read all again
READ_PROCESSES = min(8, os.cpu_count() or 1)
PACKAGES_PER_PROCESS = 64  # fewer packages than that are read faster than a process starts
EARLY_INDEX_MIN = 200  # below this many packages, rattler after the check is as fast
ZST_LEVEL = 1  # 20,000 packages: 1.1 MB in 0.01 s (level 3: 1.3 MB, 0.02 s; 19: 5 s)
SHARD_INDEX = "repodata_shards.msgpack.zst"
RECORDS = "records.msgpack"  # staging only: the repodata's records, as stored by Records
STAGED_FILES = ("repodata.json", "repodata.json.zst", SHARD_INDEX, RECORDS)

Listing = dict[str, dict[str, list[int]]]  # subdir -> file name -> [size, mtime_ns]


# ---------------------------------------------------------------- what is in the channel

def channel_listing(channel_dir: Path) -> Listing:
    """Package files per subdir; noarch is always present (conda clients require it)."""
    listing: Listing = {"noarch": {}}
    if not channel_dir.is_dir():
        return listing
    for entry in os.scandir(channel_dir):
        if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
            continue
        files = {}
        with os.scandir(entry.path) as items:  # 20,000 files: the loop is the cost, kept lean
            for item in items:
                name = item.name
                if name.endswith(PACKAGE_SUFFIXES) and name[0] != "." and \
                        item.is_file(follow_symlinks=False):
                    stat = item.stat(follow_symlinks=False)
                    files[name] = [stat.st_size, stat.st_mtime_ns]
        if files or entry.name == "noarch":
            listing[entry.name] = files
    return listing


@lru_cache(maxsize=None)
def is_subdir_name(name: str) -> bool:
    """noarch or <os>-<arch>: the folders conda clients ask for, and rattler indexes."""
    from rattler import Subdir

    try:
        Subdir(name)
    except Exception:  # rattler's ParseSubdirError
        return False
    return True


def listing_signature(listing: Listing) -> str:
    return hashlib.sha256(orjson.dumps(listing, option=orjson.OPT_SORT_KEYS)).hexdigest()


def state_path(settings: Settings) -> Path:
    return settings.state("index", "state.json")


def read_state(path: Path) -> dict:
    """The index state, or {} (index everything again) when it is missing or unreadable.
    Its entries are checked where they are used (``_scan``)."""
    state = read_json(path, {})
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        return {}
    if not all(isinstance(state.get(key, {}), dict) for key in ("packages", "shards", "staged")) \
            or "packages" not in state:
        return {}
    return state


def _indexed_path(settings: Settings) -> Path:
    return settings.state("index", "indexed.json")


def channel_is_indexed(settings: Settings) -> bool:
    """True when nothing in the channel changed since the last successful index.

    Reads a small summary the index writes after its state (the state runs to megabytes),
    which names the state file it goes with by size and time.
    """
    summary = read_json(_indexed_path(settings), {})
    state = state_path(settings)
    try:
        if not isinstance(summary, dict) or summary.get("version") != STATE_VERSION or \
                summary.get("state") != [state.stat().st_size, state.stat().st_mtime_ns]:
            return False
    except OSError:
        return False
    listing = channel_listing(settings.channel_dir)
    if summary.get("signature") != listing_signature(listing):
        return False
    return all((settings.channel_dir / subdir / "repodata.json").is_file()
               for subdir in summary.get("subdirs", ()))


# ---------------------------------------------------------------- validation

@dataclass
class PackageCheck:
    subdir: str
    filename: str
    size: int
    mtime_ns: int
    meta: dict = field(default_factory=dict)
    error: str = ""


class RefusedPackage(Exception):
    """A readable package that must not be indexed where it is."""


def _check_package(channel_dir: Path, check: PackageCheck) -> None:
    """Read one package whole; its metadata, or why it is left out, go into ``check``."""
    folder = check.subdir
    try:
        if not is_subdir_name(folder):
            raise RefusedPackage(f"the folder '{folder}' is not a subdir of a conda channel "
                                 f"(noarch or <os>-<arch>, such as linux-64)")
        meta = read_package(channel_dir / folder / check.filename)
        subdir = meta.pop("subdir")
        if subdir and subdir != folder:
            raise RefusedPackage(
                f"its index.json says subdir '{subdir}' but it is in the folder '{folder}' "
                f"(clients of '{folder}' could not install it)")
        stem = meta.pop("stem")
        suffix = next(end for end in PACKAGE_SUFFIXES if check.filename.endswith(end))
        if check.filename != stem + suffix:
            raise RefusedPackage(
                f"its index.json says it is {stem}{suffix} (name, version, build), not "
                f"{check.filename} (clients download a package by the file name its "
                f"index.json gives)")
        check.meta = meta
    except Exception as exc:  # any failure to read it means clients cannot either
        check.error = " ".join(str(exc).split()) or type(exc).__name__


def _read_one(channel_dir: Path, where: tuple[str, str]) -> tuple[dict, str]:
    check = PackageCheck(where[0], where[1], 0, 0)
    _check_package(channel_dir, check)
    return check.meta, check.error


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, silently.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_packages(channel_dir: Path, checks: list[PackageCheck],
                   processes: int = READ_PROCESSES) -> None:
    """Read every package in ``checks`` whole; many at once in up to ``processes`` processes
    (one per core unless the cores have other work, such as rattler indexing beside).

    Processes, not threads: a small package costs more interpreter time (the tar walk,
    the JSON) than decompression, which is all a thread could run beside the others.
    """
    import multiprocessing

    workers = min(processes, len(checks) // PACKAGES_PER_PROCESS)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for check in checks:
            _check_package(channel_dir, check)
        return
    chunk = max(1, min(256, len(checks) // (workers * 8)))
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_ignore_interrupts)
    try:
        results = pool.map(partial(_read_one, channel_dir),
                           [(check.subdir, check.filename) for check in checks], chunk)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    for check, (meta, error) in zip(checks, results):
        check.meta, check.error = meta, error


def _index_fs(folder: Path) -> None:
    import asyncio  # here, not at the top: loading the tasks does not need it

    from rattler.index import index_fs

    asyncio.run(index_fs(folder, write_zst=False, write_shards=True))


# ---------------------------------------------------------------- rattler on what changed

def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=ZST_LEVEL).compress(data)


def _unzstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@dataclass
class Section:
    """The records of one repodata section, sorted by file name, each kept as its JSON text
    beside its package name: merging and writing 20,000 records copies bytes, where parsing
    them would cost ten times more."""

    files: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)

    @classmethod
    def of(cls, records: dict[str, dict]) -> Section:
        files = sorted(records)
        return cls(files, [records[fn]["name"] for fn in files],
                   [orjson.dumps(records[fn]) for fn in files])

    def without(self, names: set[str]) -> Section:
        keep = [name not in names for name in self.names]
        return Section(list(compress(self.files, keep)), list(compress(self.names, keep)),
                       list(compress(self.records, keep)))

    def plus(self, other: Section) -> Section:
        files, names = self.files + other.files, self.names + other.names
        records = self.records + other.records
        order = sorted(range(len(files)), key=files.__getitem__)
        return Section([files[i] for i in order], [names[i] for i in order],
                       [records[i] for i in order])


@dataclass
class Records:
    """One subdir's repodata: its record sections, and the rest in its key order."""

    rest: dict
    sections: dict[str, Section]

    @classmethod
    def empty(cls) -> Records:
        return cls({}, {key: Section() for key in SECTIONS})

    @classmethod
    def from_repodata(cls, repodata: dict) -> Records:
        rest = {key: ({} if key in SECTIONS else value) for key, value in repodata.items()}
        for key in SECTIONS:
            rest.setdefault(key, {})
        return cls(rest, {key: Section.of(section_records(repodata, key)) for key in SECTIONS})

    @classmethod
    def from_bytes(cls, data: bytes) -> Records:
        import msgpack

        stored = msgpack.unpackb(data)
        return cls(orjson.loads(stored["rest"]), {key: Section(*stored[key]) for key in SECTIONS})

    def to_bytes(self) -> bytes:
        import msgpack

        stored: dict = {"rest": orjson.dumps(self.rest)}
        for key, section in self.sections.items():
            stored[key] = [section.files, section.names, section.records]
        return msgpack.packb(stored)

    def repodata_json(self) -> bytes:
        sections = self.sections
        return orjson.dumps({
            key: dict(zip(sections[key].files, map(orjson.Fragment, sections[key].records)))
            if key in SECTIONS else value for key, value in self.rest.items()})

    @property
    def files(self) -> set[str]:
        return {fn for section in self.sections.values() for fn in section.files}

    @property
    def names(self) -> set[str]:
        return {name for section in self.sections.values() for name in section.names}

    def merged(self, fresh: Records, names: set[str]) -> Records:
        """These records with every record of ``names`` replaced by those in ``fresh``."""
        rest = dict(self.rest)
        for key, value in fresh.rest.items():
            rest.setdefault(key, value)
        return Records(rest, {key: self.sections[key].without(names).plus(fresh.sections[key])
                              for key in SECTIONS})


def _merge_shard_index(full: bytes | None, fresh: bytes, names: set[str]) -> bytes:
    import msgpack

    fresh_index = msgpack.unpackb(_unzstd(fresh))
    if full is None:
        return fresh
    index = msgpack.unpackb(_unzstd(full))
    shards = {n: h for n, h in index["shards"].items() if n not in names}
    shards.update(fresh_index["shards"])
    index["shards"] = dict(sorted(shards.items()))
    index["info"] = fresh_index["info"]
    return _zstd(msgpack.packb(index))


@dataclass
class StagedIndex:
    """One subdir's staged index, read back whole: its records and the shard index."""

    records: Records
    shard_index_bytes: bytes
    stamps: dict[str, list[int]]  # inode, size and mtime of each of STAGED_FILES as written

    @property
    def files(self) -> set[str]:
        return self.records.files


def shard_names(shard_index_bytes: bytes) -> dict[str, str]:
    """Package name -> shard file name, from a shard index."""
    import msgpack

    index = msgpack.unpackb(_unzstd(shard_index_bytes))
    return {name: f"{bytes(digest).hex()}.msgpack.zst" for name, digest in index["shards"].items()}


def _stamps(folder: Path) -> dict[str, list[int]]:
    """Inode, size and mtime of each of STAGED_FILES: every write replaces a file whole (a
    new inode), and one cut short or changed in place shows another size or time."""
    stamps = {}
    for name in STAGED_FILES:
        stat = (folder / name).stat()
        stamps[name] = [stat.st_ino, stat.st_size, stat.st_mtime_ns]
    return stamps


def _read_staged(staged: Path, expected_files: set[str], published: Path,
                 stamps: object) -> StagedIndex | None:
    """The staged index of a subdir, or None when any part of it cannot be read, is not the
    file the last run wrote (``stamps``, from the state) or does not hold exactly
    ``expected_files``: then the subdir is indexed again from its packages.

    Shards not yet served are checked against their content address before they can be.
    """
    import msgpack
    import zstandard

    try:
        if _stamps(staged) != stamps:
            return None
        shard_index = (staged / SHARD_INDEX).read_bytes()
        records = Records.from_bytes((staged / RECORDS).read_bytes())
        shards = shard_names(shard_index)
        staged_index = StagedIndex(records, shard_index, stamps)
        names = records.names
    except (OSError, ValueError, TypeError, KeyError, AttributeError, zstandard.ZstdError,
            msgpack.UnpackException):
        return None
    if staged_index.files != expected_files or set(shards) != names:
        return None
    present, served = _folder_names(staged / "shards"), _folder_names(published / "shards")
    for shard in set(shards.values()) - served:
        if shard not in present or f"{sha256_file(staged / 'shards' / shard)}.msgpack.zst" != shard:
            return None
    return None if not set(shards.values()) <= present else staged_index


def _folder_names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


def _update_subdir(fresh: Path, staged: Path, names: set[str], old: StagedIndex | None
                   ) -> StagedIndex:
    """Fold rattler's output for ``names`` (in ``fresh``) into the staged subdir: shards
    first, then the shard index and the repodata, each replaced atomically and synced."""
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "shards").mkdir(exist_ok=True)
    fresh_index = (fresh / SHARD_INDEX).read_bytes()
    # Content-addressed: a shard already staged is this one, synced when it came.
    new_shards = [fresh / "shards" / name for name in
                  set(shard_names(fresh_index).values()) - _folder_names(staged / "shards")]
    sync_files(new_shards, mode=0o644)
    for shard in new_shards:
        os.replace(shard, staged / "shards" / shard.name)
    shard_index = _merge_shard_index(old and old.shard_index_bytes, fresh_index, names)
    fresh_records = Records.from_repodata(orjson.loads((fresh / "repodata.json").read_bytes()))
    records = (old.records if old else Records.empty()).merged(
        fresh_records, names)
    data = records.repodata_json()
    contents = {"repodata.json": data, "repodata.json.zst": _zstd(data),
                SHARD_INDEX: shard_index, RECORDS: records.to_bytes()}
    # The record store first: repodata.json, written last, is what the others must match.
    for name in (RECORDS, SHARD_INDEX, "repodata.json.zst", "repodata.json"):
        atomic_write_bytes(staged / name, contents[name])
    return StagedIndex(records, shard_index, _stamps(staged))


def _same_file(a: Path, b: Path) -> bool:
    """``b`` is ``a`` (a hard link of it) or has the same bytes."""
    try:
        first, second = a.stat(), b.stat()
        if (first.st_ino, first.st_dev) == (second.st_ino, second.st_dev):
            return True
        return first.st_size == second.st_size and a.read_bytes() == b.read_bytes()
    except FileNotFoundError:
        return False


def _publish_subdir(staged: Path, published: Path, previous_shards: set[str]) -> set[str]:
    """Publish the staged index files in the served subdir, as hard links of the staged
    ones (which are synced and never changed in place); return the shard names now live."""
    published.mkdir(parents=True, exist_ok=True)
    live = set(shard_names((staged / SHARD_INDEX).read_bytes()).values())
    if live:
        (published / "shards").mkdir(exist_ok=True)
    served = _folder_names(published / "shards")
    for name in sorted(live - served):  # content-addressed: a present one is already right
        replace_with_link(staged / "shards" / name, published / "shards" / name)
    if live - served:
        fsync_dir(published / "shards")
    # The shard index and repodata.json last: whatever a client reads first only names
    # files that already exist.
    for name in (SHARD_INDEX, "repodata.json.zst", "repodata.json"):
        source = staged / name
        if source.is_file() and not _same_file(source, published / name):
            replace_with_link(source, published / name)
    _prune(staged / "shards", keep=live)
    # Served shards of the previous generation stay for clients that are mid-fetch.
    _prune(published / "shards", keep=live | previous_shards)
    for folder in (published / "shards", published, staged / "shards", staged):
        if folder.is_dir():
            fsync_dir(folder)
    return live


def _prune(folder: Path, keep: set[str]) -> None:
    for name in _folder_names(folder) - keep:
        (folder / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- the whole pass

@dataclass
class IndexReport:
    packages: int = 0
    read: int = 0
    bad: dict[str, str] = field(default_factory=dict)


def _name(entry: dict | None) -> str | None:
    """The package name of a readable file's entry (None: absent or unreadable)."""
    return entry["meta"].get("name") if entry and not entry.get("error") else None


@dataclass
class ChannelFiles:
    """What the pass knows of each package file, by ``<subdir>/<file name>``: its entry for
    the state (size, mtime_ns, meta, error), and the same looked up by subdir, package name
    and fault."""

    entries: dict[str, dict] = field(default_factory=dict)
    readable: dict[str, set[str]] = field(default_factory=dict)  # subdir -> file names
    by_name: dict[str, list[str]] = field(default_factory=dict)  # package name -> keys
    bad: dict[str, str] = field(default_factory=dict)  # key -> why it is not indexed

    def enter(self, subdir: str, filename: str, entry: dict) -> None:
        """A file just read: its entry, readable or not."""
        key = f"{subdir}/{filename}"
        self.entries[key] = entry
        if entry["error"]:
            self.bad[key] = entry["error"]
        else:
            self.readable.setdefault(subdir, set()).add(filename)
            self.by_name.setdefault(entry["meta"]["name"], []).append(key)

    def leave_out(self, subdir: str, filename: str, why: str) -> None:
        """A readable file that is not indexed after all, and why."""
        key = f"{subdir}/{filename}"
        self.entries[key] = dict(self.entries[key], error=why)
        self.readable[subdir].discard(filename)
        self.bad[key] = why

    @property
    def indexed(self) -> int:
        return len(self.entries) - len(self.bad)


@dataclass
class ChannelScan:
    """The channel's files next to what the last pass knew of them."""

    listing: Listing
    subdirs: list[str]  # the folders indexed: conda subdirs only
    state: dict  # the last pass's; {} when there is none to trust
    # Unchanged files as the state has them; read_changed_packages enters the others.
    files: ChannelFiles
    to_check: list[PackageCheck]  # new or changed files, to read
    changed: set[str]  # keys of files new, changed or gone since the last pass
    indexed_before: dict[str, set[str]]  # subdir -> the files the last pass indexed

    @property
    def known(self) -> dict[str, dict]:
        return self.state.get("packages", {})


def _scan(listing: Listing, subdirs: list[str], state: dict) -> ChannelScan:
    """The files unchanged since the last pass (entries kept as they are), the files to
    read, and what the last pass indexed. Raises KeyError, TypeError or AttributeError when
    the state's entries are not of the shape it writes."""
    known: dict[str, dict] = state.get("packages", {})
    files = ChannelFiles()
    entries, by_name, bad = files.entries, files.by_name, files.bad
    to_check = []
    for subdir, names in listing.items():
        readable = files.readable.setdefault(subdir, set())
        for filename, (size, mtime_ns) in names.items():  # 20,000 files: kept lean
            key = f"{subdir}/{filename}"
            before = known.get(key)
            if before is None or before["size"] != size or before["mtime_ns"] != mtime_ns:
                to_check.append(PackageCheck(subdir, filename, size, mtime_ns))
                continue
            entries[key] = before
            if before["error"]:
                bad[key] = before["error"]
            else:
                readable.add(filename)
                by_name.setdefault(before["meta"]["name"], []).append(key)
    changed = {f"{check.subdir}/{check.filename}" for check in to_check}
    changed |= known.keys() - entries.keys()
    indexed_before = {subdir: set(names) for subdir, names in files.readable.items()}
    for key in changed:
        # The last pass's names of changed and gone files: checked here, with the rest.
        if _name(known.get(key)):
            subdir, _, filename = key.partition("/")
            indexed_before.setdefault(subdir, set()).add(filename)
    return ChannelScan(listing, subdirs, state, files, to_check, changed, indexed_before)


def _link_into(work: Path, channel_dir: Path, files: dict[str, set[str]]) -> None:
    """Hard links (copies where links fail) of ``files`` (subdir -> names) in a fresh
    ``work``. Plain strings and one folder at a time: 20,000 links are the cost."""
    (work / "noarch").mkdir(parents=True, exist_ok=True)  # rattler indexes it in any case
    for subdir, names in files.items():
        source, target = f"{channel_dir / subdir}/", f"{work / subdir}/"
        os.makedirs(target, exist_ok=True)
        for filename in names:
            link_or_copy(source + filename, target + filename)


class _EarlyIndex:
    """rattler's index of every package file of a channel that has no index state, run on a
    thread while the files are checked (its Rust code does not hold the interpreter lock),
    for the two take as long. ``_index_exactly`` then takes out what the check refused.

    A .conda file whose zip cannot be opened makes rattler's indexer panic, which prints a
    backtrace into the run's output: such files (the check refuses them too) are left out.
    """

    def __init__(self, work: Path, channel_dir: Path, files: dict[str, set[str]]):
        self.files = {subdir: {name for name in names if not name.endswith(".conda")
                               or conda_zip_opens(channel_dir / subdir / name)}
                      for subdir, names in files.items()}
        shutil.rmtree(work, ignore_errors=True)
        _link_into(work, channel_dir, self.files)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True,
                                        name="hubworks-early-index")
        self._thread.start()

    def _run(self, work: Path) -> None:
        try:
            _index_fs(work)
        except BaseException as exc:  # rattler stops at a package it cannot read
            self.error = exc

    def succeeded(self) -> bool:
        self._thread.join()
        return self.error is None

    def __enter__(self) -> _EarlyIndex:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        # After an error the run may go on, and its next index clears the work folder:
        # rattler must be done with it. After Ctrl-C the process ends, and the thread too.
        if exc_type is not None and not issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self._thread.join()


def _index_exactly(work: Path, channel_dir: Path, wanted: dict[str, set[str]],
                   early: _EarlyIndex | None = None) -> None:
    """rattler's index of exactly ``wanted`` (subdir -> file names) in ``work``: a fresh
    one, or what ``early`` indexed with the files it should not have taken out (and any it
    lacks added) by a second, incremental pass."""
    if early is None or not early.succeeded():
        shutil.rmtree(work, ignore_errors=True)
        _link_into(work, channel_dir, wanted)
        _index_fs(work)
        return
    changed = False
    for subdir in set(early.files) | set(wanted):
        present, want = early.files.get(subdir, set()), wanted.get(subdir, set())
        for filename in present - want:
            os.unlink(work / subdir / filename)
        _link_into(work, channel_dir, {subdir: want - present})
        changed = changed or present != want
    if changed:
        _index_fs(work)


@dataclass
class PageFacts:
    """What the index page says besides its rows."""

    packages: int
    bad: dict[str, str]   # key -> why it is not indexed
    subdirs: set[str]     # subdirs with readable packages


def _write_page(channel_dir: Path, packages: dict[str, dict], touched: set[str],
                by_name: dict[str, list[str]], state: dict, rows_path: Path,
                facts: PageFacts) -> str:
    """Write index.html, rendering rows again only for the package names a change touched
    (``by_name``: the packages of each name): the other names' rows come from the last page
    (a file of the state, named by a generation that the state records). Returns the new
    generation."""
    cached = read_json(rows_path, {}) if state.get("page") else {}
    rows = cached.get("rows") if isinstance(cached, dict) else None
    if isinstance(rows, dict) and cached.get("generation") == state["page"]:
        for name in touched:
            rows.pop(name, None)
        rows.update(page_rows(packages, [key for name in touched
                                         for key in by_name.get(name, ())]))
    else:
        rows = page_rows(packages, list(packages))
    generation = secrets.token_hex(8)
    atomic_write_bytes(rows_path, orjson.dumps({"generation": generation, "rows": rows}))
    write_index_page(channel_dir, rows, facts)
    return generation


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """The collector's full passes walk every object, the state's hundreds of thousands
    included, a few times per pass; nothing an index pass makes needs it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _ensure_folder(folder: Path) -> None:
    """Create ``folder`` (conda clients require noarch/), or say what stands in its way."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise HubworksError(f"{folder} must be a folder of the channel, but something else "
                            f"has that name.",
                            fix=f"move {folder} out of the channel, then index again") from None


def index_channel(settings: Settings) -> IndexReport:
    """Bring every subdir's repodata and the index page in line with the channel's files.

    Only the package names touched by a change are handed to rattler (in a fresh folder of
    hard links, so a same-name replacement is read again); their records and shards replace
    the old ones in the staged index, which is then published. A subdir whose staged index
    cannot be trusted is indexed whole.
    """
    run = IndexPass(settings)
    try:
        return _index_pass(run, settings)
    except Exception as exc:
        if not _out_of_space(exc):
            raise
        # Every file is replaced whole, so what clients read is still the previous index.
        where = _fullest(Path(exc.filename).parent if isinstance(exc, OSError) and
                         exc.filename else None, run.channel_dir, run.work.parent)
        raise HubworksError(
            f"index_channel ran out of disk space writing in {where}; the channel "
            f"{run.channel_dir} keeps its previous index, which is still served.",
            fix=f"free space on the disk that holds {where} (`df -h {where}`), then run "
                f"doit index_channel again") from None


def _fullest(*folders: Path | None) -> Path:
    """The folder named by the error (the first) if any, else the one of the others whose
    disk has the least space left: a failed write rarely says where it was."""
    def free(folder: Path) -> int:
        try:
            stat = os.statvfs(folder)
        except OSError:
            return 1 << 62
        return stat.f_bavail * stat.f_frsize

    named, *others = folders
    return named or min(others, key=free)


def _out_of_space(exc: BaseException) -> bool:
    """A full disk or quota, raised by Python or by rattler (whose errors carry the OS
    error only in their text)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return f"(os error {errno.ENOSPC})" in text or f"(os error {errno.EDQUOT})" in text


def _index_pass(run: IndexPass, settings: Settings) -> IndexReport:
    with exclusive_lock(settings.state("index", "lock"), "the channel index"), \
            ExitStack() as cleanup, _no_cycle_collection():
        _ensure_folder(run.channel_dir / "noarch")
        scan = run.read_channel_and_state()
        early = run.start_early_index(scan, cleanup)
        run.read_changed_packages(scan, early)
        touched = run.find_touched_names(scan)
        staged, touched = run.check_staged_indexes(scan, touched)
        stamps = run.index_touched_names(scan, touched, staged, early)
        run.drop_stale_staging(scan.subdirs)
        shards = run.publish_subdirs(scan, touched)
        page = run.write_page(scan, touched)
        # Last, once the index it describes is on disk: the state says what is indexed.
        run.write_state(scan, stamps, shards, page)
    files = scan.files
    return IndexReport(files.indexed, len(scan.to_check), files.bad)


class IndexPass:
    """The steps of one index_channel pass, a method each, and where they work. A step takes
    what it works on and returns what it finds; ``touched`` (subdir -> package names whose
    records change) is what most of them act on."""

    def __init__(self, settings: Settings):
        self.channel_dir = settings.channel_dir
        self.staging = settings.state("index", "staging")
        self.work = settings.state("index", "work")
        self.rows_path = settings.state("index", "page-rows.json")
        self.state_path = state_path(settings)
        self.indexed_path = _indexed_path(settings)

    def read_channel_and_state(self) -> ChannelScan:
        """The channel's files, the last pass's state, and what it says of unchanged files."""
        listing = channel_listing(self.channel_dir)
        # Packages in other folders are refused one by one; only subdirs are indexed.
        subdirs = [subdir for subdir in listing if is_subdir_name(subdir)]
        state = read_state(self.state_path)
        if state:
            try:
                return _scan(listing, subdirs, state)
            except (KeyError, TypeError, AttributeError):
                pass  # a state of another shape: index anew
        shutil.rmtree(self.staging, ignore_errors=True)
        return _scan(listing, subdirs, {})

    def start_early_index(self, scan: ChannelScan, cleanup: ExitStack) -> _EarlyIndex | None:
        """Without a state, a large channel goes to rattler whole while its files are read."""
        listing = scan.listing
        if scan.state or sum(len(listing[s]) for s in scan.subdirs) < EARLY_INDEX_MIN:
            return None
        return cleanup.enter_context(_EarlyIndex(
            self.work, self.channel_dir, {subdir: set(listing[subdir]) for subdir in scan.subdirs}))

    def read_changed_packages(self, scan: ChannelScan, early: _EarlyIndex | None) -> None:
        """Read every new or changed file whole, and enter what it is (or why not) in
        ``scan.files``."""
        # Beside an early index, which keeps every core busy, one reader is quickest.
        check_packages(self.channel_dir, scan.to_check, 1 if early else READ_PROCESSES)
        for check in scan.to_check:
            scan.files.enter(check.subdir, check.filename, {
                "size": check.size, "mtime_ns": check.mtime_ns, "meta": check.meta,
                "error": check.error})

    def find_touched_names(self, scan: ChannelScan) -> dict[str, set[str]]:
        """Package names whose records change, per subdir: new, changed, removed, gone bad.
        Without a state every subdir is indexed whole."""
        touched: dict[str, set[str]] = {} if scan.state else {s: set() for s in scan.subdirs}
        known, entries = scan.known, scan.files.entries
        for key in scan.changed:
            for name in (_name(known.get(key)), _name(entries.get(key))):
                if name:
                    touched.setdefault(key.partition("/")[0], set()).add(name)
        return touched

    def check_staged_indexes(self, scan: ChannelScan, touched: dict[str, set[str]]
                             ) -> tuple[dict[str, StagedIndex], dict[str, set[str]]]:
        """The staged index of every subdir about to be published must hold exactly what
        the last pass indexed; one that is missing, unreadable or different is rebuilt from
        the packages on disk (never read as empty, which would drop the rest). Returns the
        staged indexes to build on, and ``touched`` with every name of the subdirs to rebuild."""
        stamps = scan.state.get("staged", {})
        staged: dict[str, StagedIndex] = {}
        touched = dict(touched)
        for subdir in scan.subdirs:
            if subdir not in touched and self._published_repodata(subdir).is_file():
                continue
            found = _read_staged(self.staging / subdir, scan.indexed_before.get(subdir, set()),
                                 self.channel_dir / subdir, stamps.get(subdir))
            if found is None:
                shutil.rmtree(self.staging / subdir, ignore_errors=True)
                touched[subdir] = touched.get(subdir, set()) | {
                    _name(scan.files.entries[f"{subdir}/{filename}"])
                    for filename in scan.files.readable.get(subdir, ())}
            else:
                staged[subdir] = found
        return staged, touched

    def index_touched_names(self, scan: ChannelScan, touched: dict[str, set[str]],
                            staged: dict[str, StagedIndex], early: _EarlyIndex | None
                            ) -> dict[str, dict[str, list[int]]]:
        """rattler on the files of the touched names; its records replace theirs in the
        staged index. Every readable package ends up indexed, or is left out in
        ``scan.files`` with the reason. Returns the stamps of every subdir's staged files."""
        stamps = dict(scan.state.get("staged", {}))
        if not touched:
            return stamps
        wanted = _files_of_names(scan.files.by_name, touched)
        _index_exactly(self.work, self.channel_dir, wanted, early)
        for subdir, names in touched.items():
            updated = _update_subdir(self.work / subdir, self.staging / subdir, names,
                                     staged.get(subdir))
            stamps[subdir] = updated.stamps
            for filename in wanted[subdir] - updated.files:
                scan.files.leave_out(subdir, filename,
                                     "rattler's indexer left it out of the repodata")
        shutil.rmtree(self.work, ignore_errors=True)
        return stamps

    def drop_stale_staging(self, subdirs: list[str]) -> None:
        """Staged indexes of subdirs the channel no longer has."""
        for stale in self.staging.iterdir() if self.staging.is_dir() else ():
            if stale.is_dir() and stale.name not in subdirs:
                shutil.rmtree(stale)

    def publish_subdirs(self, scan: ChannelScan, touched: dict[str, set[str]]
                        ) -> dict[str, list[str]]:
        """Publish the staged index of every touched subdir, and of any not yet served.
        Returns the shards each subdir serves."""
        shards = dict(scan.state.get("shards", {}))
        for subdir in scan.subdirs:
            if subdir in touched or not self._published_repodata(subdir).is_file():
                shards[subdir] = sorted(_publish_subdir(
                    self.staging / subdir, self.channel_dir / subdir,
                    set(shards.get(subdir, []))))
        return shards

    def write_page(self, scan: ChannelScan, touched: dict[str, set[str]]) -> str:
        """index.html again when a name's rows or the files left out changed. Returns the
        generation of the page's rows."""
        files = scan.files
        bad_before = {key: entry["error"] for key, entry in scan.known.items()
                      if entry.get("error")}
        if not touched and files.bad == bad_before and \
                (self.channel_dir / "index.html").exists():
            return scan.state.get("page", "")
        return _write_page(
            self.channel_dir, files.entries, set().union(*touched.values()), files.by_name,
            scan.state, self.rows_path,
            PageFacts(files.indexed, files.bad,
                      {subdir for subdir, names in files.readable.items() if names}))

    def write_state(self, scan: ChannelScan, stamps: dict[str, dict[str, list[int]]],
                    shards: dict[str, list[str]], page: str) -> None:
        """The state of this pass, then the summary channel_is_indexed reads."""
        atomic_write_bytes(self.state_path, orjson.dumps({
            "version": STATE_VERSION,
            "packages": scan.files.entries,
            "shards": {k: v for k, v in shards.items() if k in scan.subdirs},
            "staged": {k: v for k, v in stamps.items() if k in scan.subdirs},
            "page": page,
        }))
        written = self.state_path.stat()
        atomic_write_bytes(self.indexed_path, orjson.dumps({
            "version": STATE_VERSION,
            "state": [written.st_size, written.st_mtime_ns],
            # A channel with unreadable files is never recorded as indexed: the error repeats.
            "signature": listing_signature(scan.listing) if not scan.files.bad else "",
            "subdirs": scan.subdirs,
        }))

    def _published_repodata(self, subdir: str) -> Path:
        return self.channel_dir / subdir / "repodata.json"


def _files_of_names(by_name: dict[str, list[str]], touched: dict[str, set[str]]
                    ) -> dict[str, set[str]]:
    """The readable files of the touched names, per subdir."""
    wanted: dict[str, set[str]] = {subdir: set() for subdir in touched}
    for subdir, names in touched.items():
        for name in names:
            for key in by_name.get(name, ()):
                if key.partition("/")[0] == subdir:
                    wanted[subdir].add(key.partition("/")[2])
    return wanted


# ---------------------------------------------------------------- the index page

_HTML_SPECIAL = re.compile(r"[&<>\"']")
_URL_PLAIN = re.compile(r"[A-Za-z0-9._~/-]*")


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _escape(value: str) -> str:
    """HTML-escaped; most values need nothing, so the work is skipped for them."""
    return html.escape(value) if _HTML_SPECIAL.search(value) else value


def _anchor(path: str, text: str) -> str:
    href = path if _URL_PLAIN.fullmatch(path) else html.escape(quote(path))
    return f'<a href="{href}">{_escape(text)}</a>'


def page_rows(packages: dict[str, dict], keys: list[str]) -> dict[str, str]:
    """The index page's table rows of the readable packages among ``keys``, by package
    name, newest version first."""
    from rattler import Version

    groups: dict[str, list[tuple[str, dict]]] = {}
    for key in keys:
        entry = packages[key]
        if not entry["error"]:
            groups.setdefault(entry["meta"]["name"], []).append((key, entry))
    rows = {}
    for name, items in groups.items():
        if len(items) > 1:
            items.sort(key=lambda item: (Version(item[1]["meta"]["version"]),
                                         item[1]["meta"]["build"]), reverse=True)
        # Every value is escaped and every link percent-encoded: file names, folder names
        # and everything in a package's metadata come from whoever put the file there.
        lines = []
        for key, entry in items:
            meta, (subdir, filename) = entry["meta"], key.split("/", 1)
            cells = "".join(f"<td>{_escape(value)}</td>" for value in (
                meta["name"], meta["version"], meta["build"], subdir))
            cells += f'<td class="n">{_human_size(entry["size"])}</td>'
            cells += "".join(f"<td>{_escape(value)}</td>" for value in (
                meta.get("date", ""), meta.get("summary", "")))
            lines.append(f"<tr>{cells}<td>{_anchor(key, filename)}</td></tr>")
        rows[name] = "\n".join(lines)
    return rows


def write_index_page(channel_dir: Path, rows: dict[str, str], facts: PageFacts) -> None:
    """index.html: every package (``rows``: by name, from page_rows), and the files left
    out with the reason."""
    bad = [f"<li><code>{_escape(key)}</code>: {_escape(error)}</li>"
           for key, error in sorted(facts.bad.items())]
    links = " ".join(_anchor(f"{s}/repodata.json", s) for s in sorted(facts.subdirs | {"noarch"}))
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>conda channel</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .2em .8em; text-align: left; }}
tr:nth-child(even) {{ background: #f3f3f3; }} td.n {{ text-align: right; }}
</style></head><body>
<h1>conda channel</h1>
<p>{facts.packages} packages. Repodata: {links}. Indexed {generated}.</p>
{"<h2>Not indexed (unreadable, misplaced or misnamed files)</h2><ul>" + "".join(bad) + "</ul>" if bad else ""}
<table>
<tr><th>Package</th><th>Version</th><th>Build</th><th>Subdir</th><th>Size</th><th>Date</th>\
<th>Summary</th><th>File</th></tr>
{chr(10).join(rows[name] for name in sorted(rows))}
</table></body></html>
"""
    atomic_write_bytes(channel_dir / "index.html", page.encode())


# ---------------------------------------------------------------- the doit task

# Threads of one run index one at a time without a word; the file lock inside
# index_channel is for other doit processes, and says when it waits for one.
_index_turn = threading.Lock()


def index_and_report(settings: Settings) -> IndexReport:
    """Index the channel as it is now; name unreadable files as a problem of the run.

    An unreadable file fails the run at its end, not the task: everything else is indexed,
    so what needs the index (serving, image builds) still goes ahead.
    """
    with _index_turn:
        report = index_channel(settings)
    print(f"   indexed {report.packages} packages ({report.read} read) in "
          f"{settings.channel_dir}")
    problem = None
    if report.bad:
        lines = "\n".join(f"    {settings.channel_dir / key}: {error}"
                          for key, error in sorted(report.bad.items()))
        problem = HubworksError(
            f"{len(report.bad)} package file(s) in the channel are unreadable, misplaced or "
            f"misnamed and were left out of the index (the other {report.packages} are "
            f"indexed and served):\n{lines}",
            fix="move a misplaced file to the folder its index.json names, and rename a "
                "misnamed one to the file name it gives; delete any other file named, or "
                "rebuild the recipe that makes it "
                "(doit forget build_recipes:<recipe>; doit build_recipes)")
        print(f"   left out of the index: {problem.message}")
    RUN.note_problem("channel index: unreadable, misplaced or misnamed files", problem)
    return report


@reports_errors
def run_index_channel(settings: Settings) -> None:
    index_and_report(settings)

