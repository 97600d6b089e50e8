"""index_channel: repodata for every subdir of channel/, and a browsable index.html.

rattler's indexer (``rattler.index.index_fs``) writes repodata.json, repodata.json.zst and
sharded repodata. It is fast, but it decides what changed by file name only, a corrupt
package makes it abort, and it writes into the directory clients are reading. So it runs
on a staging copy (hard links) under ``<state_dir>/index/`` and this module adds:

- validation: every new or changed package is read in full (index.json, about.json and
  every compressed member) first; a corrupt one is left out, named in the error, and the
  rest of the channel is still indexed and served;
- same-name rebuilds: a package whose size or mtime changed has its old entry removed
  from the staged repodata, so rattler reads it again;
- atomic publication: new shards first, then the shard index and repodata files, each
  replaced by rename (and only when its bytes changed, so ETags stay stable);
- ``index.html`` at the channel root listing every package with its summary.

The doit task is up to date while the channel's listing (names, sizes, mtimes) matches the
one last indexed: one directory scan, no hashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import html
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubworksError, reports_errors
from .fsutil import atomic_copy, atomic_write_bytes, atomic_write_json, is_package, read_json
from .settings import Settings
from .workspace import current_settings

STATE_VERSION = 1
INDEX_FILES = ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst")
VALIDATION_CONCURRENCY = 8

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
        for item in os.scandir(entry.path):
            if is_package(item.name) and item.is_file(follow_symlinks=False):
                stat = item.stat(follow_symlinks=False)
                files[item.name] = [stat.st_size, stat.st_mtime_ns]
        if files or entry.name == "noarch":
            listing[entry.name] = files
    return listing


def listing_signature(listing: Listing) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def state_path(settings: Settings) -> Path:
    return settings.state("index", "state.json")


def channel_is_indexed(settings: Settings) -> bool:
    """True when nothing in the channel changed since the last successful index."""
    state = read_json(state_path(settings), {}) or {}
    if state.get("version") != STATE_VERSION:
        return False
    listing = channel_listing(settings.channel_dir)
    if state.get("signature") != listing_signature(listing):
        return False
    return all((settings.channel_dir / subdir / "repodata.json").is_file() for subdir in listing)


# ---------------------------------------------------------------- validation

@dataclass
class PackageCheck:
    subdir: str
    filename: str
    size: int
    mtime_ns: int
    meta: dict = field(default_factory=dict)
    error: str = ""


async def _read_package(path: Path) -> dict:
    from rattler.package_streaming import PackageArchive

    archive = await PackageArchive.from_path(path)
    index = await archive.index_json()
    about = await archive.about_json()
    # Streams every member of the payload: truncation or corruption anywhere shows here.
    await archive.list_files("pkg")
    return {"name": str(index.name.normalized), "version": str(index.version),
            "build": str(index.build), "timestamp": int(index.timestamp.timestamp() * 1000)
            if index.timestamp else 0, "summary": about.summary or ""}


async def _validate_all(channel_dir: Path, checks: list[PackageCheck]) -> None:
    gate = asyncio.Semaphore(VALIDATION_CONCURRENCY)

    async def one(check: PackageCheck) -> None:
        async with gate:
            try:
                check.meta = await _read_package(channel_dir / check.subdir / check.filename)
            except Exception as exc:  # any failure to read it means clients cannot either
                check.error = " ".join(str(exc).split()) or type(exc).__name__

    await asyncio.gather(*(one(check) for check in checks))


# ---------------------------------------------------------------- staging and publishing

def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy does the same job
        shutil.copy2(source, target)


def _forget_entries(repodata_path: Path, filenames: set[str]) -> None:
    """Drop entries so rattler re-reads those files (it only compares names)."""
    repodata = read_json(repodata_path)
    if not repodata or not filenames:
        return
    for key in ("packages", "packages.conda"):
        for name in filenames:
            repodata.get(key, {}).pop(name, None)
    repodata_path.write_text(json.dumps(repodata))


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        return a.read_bytes() == b.read_bytes()
    except FileNotFoundError:
        return False


def _publish_subdir(staged: Path, published: Path, previous_shards: set[str]) -> set[str]:
    """Copy staged index files into the served subdir; return the shard names now live."""
    published.mkdir(parents=True, exist_ok=True)
    staged_shards = staged / "shards"
    live = {p.name for p in staged_shards.iterdir()} if staged_shards.is_dir() else set()
    if live:
        (published / "shards").mkdir(exist_ok=True)
    for name in sorted(live):  # content-addressed: a present one is already right
        if not (published / "shards" / name).exists():
            atomic_copy(staged_shards / name, published / "shards" / name)
    # The shard index last-but-two and repodata.json last: whatever a client reads first
    # only names files that already exist.
    for name in ("repodata_shards.msgpack.zst", "repodata.json.zst", "repodata.json"):
        source = staged / name
        if source.is_file() and not _same_bytes(source, published / name):
            atomic_copy(source, published / name)
    # Keep the previous generation of shards for clients that are mid-fetch.
    keep = live | previous_shards
    if (published / "shards").is_dir():
        for shard in (published / "shards").iterdir():
            if shard.name not in keep:
                shard.unlink(missing_ok=True)
    return live


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """One indexer at a time, even across doit processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- the whole pass

@dataclass
class IndexReport:
    packages: int = 0
    read: int = 0
    bad: dict[str, str] = field(default_factory=dict)


def index_channel(settings: Settings) -> IndexReport:
    """Bring every subdir's repodata and the index page in line with the channel's files."""
    from rattler.index import index_fs

    channel_dir = settings.channel_dir
    staging = settings.state("index", "staging")
    with _exclusive(settings.state("index", "lock")):
        (channel_dir / "noarch").mkdir(parents=True, exist_ok=True)
        listing = channel_listing(channel_dir)
        state = read_json(state_path(settings), {}) or {}
        if state.get("version") != STATE_VERSION:
            state = {}
            shutil.rmtree(staging, ignore_errors=True)
        known = state.get("packages", {})  # "subdir/file" -> {size, mtime_ns, meta | error}
        report = IndexReport()

        to_check = []
        for subdir, files in listing.items():
            for filename, (size, mtime_ns) in files.items():
                before = known.get(f"{subdir}/{filename}")
                if not before or [before["size"], before["mtime_ns"]] != [size, mtime_ns]:
                    to_check.append(PackageCheck(subdir, filename, size, mtime_ns))
        asyncio.run(_validate_all(channel_dir, to_check))
        report.read = len(to_check)
        checked = {f"{c.subdir}/{c.filename}": c for c in to_check}

        current = {}
        for subdir, files in listing.items():
            (staging / subdir).mkdir(parents=True, exist_ok=True)
            changed = set()
            for filename, (size, mtime_ns) in files.items():
                key = f"{subdir}/{filename}"
                check = checked.get(key)
                if check is None:
                    current[key] = known[key]
                else:
                    current[key] = {"size": size, "mtime_ns": mtime_ns,
                                    "meta": check.meta, "error": check.error}
                    if key in known:
                        changed.add(filename)
                    if not check.error:
                        _link(channel_dir / subdir / filename, staging / subdir / filename)
            good = {f for f in files if not current[f"{subdir}/{f}"].get("error")}
            for staged_file in (staging / subdir).iterdir():
                if is_package(staged_file.name) and staged_file.name not in good:
                    staged_file.unlink()
                    changed.add(staged_file.name)
            _forget_entries(staging / subdir / "repodata.json", changed)
        # Subdirs that disappeared from the channel leave the staging area too.
        for stale in staging.iterdir():
            if stale.is_dir() and stale.name not in listing:
                shutil.rmtree(stale)

        asyncio.run(index_fs(staging, write_zst=True, write_shards=True))

        shards = state.get("shards", {})
        for subdir in listing:
            shards[subdir] = sorted(_publish_subdir(staging / subdir, channel_dir / subdir,
                                                    set(shards.get(subdir, []))))
        write_index_page(channel_dir, current)

        report.bad = {key: entry["error"] for key, entry in current.items() if entry.get("error")}
        report.packages = len(current) - len(report.bad)
        atomic_write_json(state_path(settings), {
            "version": STATE_VERSION,
            # A channel with corrupt files is never recorded as indexed: the error repeats.
            "signature": listing_signature(listing) if not report.bad else "",
            "packages": current,
            "shards": {k: v for k, v in shards.items() if k in listing},
        })
    return report


# ---------------------------------------------------------------- the index page

def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def write_index_page(channel_dir: Path, packages: dict[str, dict]) -> None:
    from rattler import Version

    good = [(k, e) for k, e in packages.items() if not e.get("error")]
    # Newest version first within a package, packages by name.
    good.sort(key=lambda item: (Version(item[1]["meta"]["version"]), item[1]["meta"]["build"]),
              reverse=True)
    good.sort(key=lambda item: item[1]["meta"]["name"])
    rows = []
    for key, entry in good:
        meta = entry["meta"]
        when = (dt.datetime.fromtimestamp(meta["timestamp"] / 1000, dt.timezone.utc)
                .strftime("%Y-%m-%d %H:%M") if meta.get("timestamp") else "")
        subdir, filename = key.split("/", 1)
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
                meta["name"], meta["version"], meta["build"], subdir))
            + f'<td class="n">{_human_size(entry["size"])}</td><td>{when}</td>'
            f'<td>{html.escape(meta.get("summary", ""))}</td>'
            f'<td><a href="{html.escape(key)}">{html.escape(filename)}</a></td></tr>')
    bad = [f"<li><code>{html.escape(k)}</code>: {html.escape(e['error'])}</li>"
           for k, e in sorted(packages.items()) if e.get("error")]
    subdirs = sorted({key.split("/", 1)[0] for key in packages} | {"noarch"})
    links = " ".join(f'<a href="{s}/repodata.json">{s}</a>' for s in subdirs)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>conda channel</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .2em .8em; text-align: left; }}
tr:nth-child(even) {{ background: #f3f3f3; }} td.n {{ text-align: right; }}
</style></head><body>
<h1>conda channel</h1>
<p>{len(good)} packages. Repodata: {links}. Indexed {generated}.</p>
{"<h2>Not indexed (unreadable files)</h2><ul>" + "".join(bad) + "</ul>" if bad else ""}
<table>
<tr><th>Package</th><th>Version</th><th>Build</th><th>Subdir</th><th>Size</th><th>Date</th>\
<th>Summary</th><th>File</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    atomic_write_bytes(channel_dir / "index.html", page.encode())


# ---------------------------------------------------------------- the doit task

@reports_errors
def run_index_channel() -> None:
    settings = current_settings()
    report = index_channel(settings)
    print(f"   indexed {report.packages} packages ({report.read} read) in "
          f"{settings.channel_dir}")
    if report.bad:
        lines = "\n".join(f"    {settings.channel_dir / key}: {error}"
                          for key, error in sorted(report.bad.items()))
        raise HubworksError(
            f"{len(report.bad)} package file(s) in the channel are unreadable and were left "
            f"out of the index (the other {report.packages} are indexed and served):\n{lines}",
            fix="delete each file named, or rebuild the recipe that makes it "
                "(doit forget build_recipes:<recipe>; doit build_recipes)")


def task_index_channel():
    """Index channel/ (repodata.json, .zst, shards) and write its index.html."""
    settings = current_settings()
    return {
        "actions": [run_index_channel],
        "task_dep": ["build_recipes"],
        "uptodate": [lambda task, values: channel_is_indexed(settings)],
        "verbosity": 2,
    }
