"""index_channel: repodata for every subdir of channel/, and a browsable index.html.

rattler's indexer (``rattler.index.index_fs``) reads packages and writes repodata.json and
sharded repodata. Used directly it decides what changed by file name only, aborts on a
corrupt package, rewrites every shard and recompresses everything on each pass (seconds
at 20,000 packages), and writes into the directory clients are reading. So here:

- validation: every new or changed package is read in full first (index.json, about.json,
  every compressed member); an unreadable one is left out and named in the error, and the
  rest of the channel is still indexed and served;
- only the package names a change touches go to rattler, in a fresh folder of hard links
  (so a package rebuilt under the same file name is read again); their records and shards
  replace the old ones in a staged copy of the index under ``<state_dir>/index/``;
- repodata.json.zst is compressed at a fast level;
- atomic publication: new shards first, then the shard index and the repodata files, each
  replaced by rename, so a client never reads a partial file or a dangling shard;
- ``index.html`` at the channel root lists every package with its summary.

The doit task is up to date while the channel's listing (names, sizes, mtimes) matches the
one last indexed: one directory scan, no hashing of packages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import html
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .errors import HubworksError, reports_errors
from .fsutil import atomic_copy, atomic_write_bytes, exclusive_lock, is_package, read_json
from .settings import Settings
from .workspace import RUN, current_settings

STATE_VERSION = 2
VALIDATION_CONCURRENCY = 8
ZST_LEVEL = 3  # 1.3 MB in 0.03 s for 20,000 packages; level 19 saves 20% in 5 s

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
    return hashlib.sha256(orjson.dumps(listing, option=orjson.OPT_SORT_KEYS)).hexdigest()


def state_path(settings: Settings) -> Path:
    return settings.state("index", "state.json")


def channel_is_indexed(settings: Settings) -> bool:
    """True when nothing in the channel changed since the last successful index."""
    state = read_json(state_path(settings), {})
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
    built = index.timestamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M") \
        if index.timestamp else ""
    return {"name": str(index.name.normalized), "version": str(index.version),
            "build": str(index.build), "date": built, "summary": about.summary or ""}


async def _validate_all(channel_dir: Path, checks: list[PackageCheck]) -> None:
    gate = asyncio.Semaphore(VALIDATION_CONCURRENCY)

    async def one(check: PackageCheck) -> None:
        async with gate:
            try:
                check.meta = await _read_package(channel_dir / check.subdir / check.filename)
            except Exception as exc:  # any failure to read it means clients cannot either
                check.error = " ".join(str(exc).split()) or type(exc).__name__

    await asyncio.gather(*(one(check) for check in checks))


# ---------------------------------------------------------------- rattler on what changed

def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy does the same job
        shutil.copy2(source, target)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=ZST_LEVEL, threads=-1).compress(data)


def _unzstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _records_without(section: dict, names: set[str]) -> dict:
    return {fn: rec for fn, rec in section.items() if rec.get("name") not in names}


def _merge_repodata(full: dict | None, fresh: dict, names: set[str]) -> dict:
    """``full`` with every record of ``names`` replaced by those in ``fresh``."""
    if full is None:
        return fresh
    merged = dict(full)
    for key, section in fresh.items():
        if key in ("packages", "packages.conda"):
            kept = _records_without(full.get(key, {}), names)
            kept.update(section)
            merged[key] = dict(sorted(kept.items()))
        elif key not in merged:
            merged[key] = section
    for key in ("packages", "packages.conda"):
        if key not in fresh and key in full:
            merged[key] = _records_without(full[key], names)
    return merged


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


def _update_subdir(fresh: Path, staged: Path, names: set[str]) -> None:
    """Fold rattler's output for ``names`` (in ``fresh``) into the staged subdir."""
    staged.mkdir(parents=True, exist_ok=True)
    old = read_json(staged / "repodata.json")
    repodata = _merge_repodata(old, read_json(fresh / "repodata.json"), names)
    data = orjson.dumps(repodata)
    (staged / "repodata.json").write_bytes(data)
    (staged / "repodata.json.zst").write_bytes(_zstd(data))

    shard_index = staged / "repodata_shards.msgpack.zst"
    old_index = shard_index.read_bytes() if shard_index.is_file() else None
    shard_index.write_bytes(_merge_shard_index(
        old_index, (fresh / "repodata_shards.msgpack.zst").read_bytes(), names))
    (staged / "shards").mkdir(exist_ok=True)
    for shard in (fresh / "shards").glob("*.msgpack.zst"):
        os.replace(shard, staged / "shards" / shard.name)


def _live_shards(staged: Path) -> set[str]:
    import msgpack

    index_file = staged / "repodata_shards.msgpack.zst"
    if not index_file.is_file():
        return set()
    index = msgpack.unpackb(_unzstd(index_file.read_bytes()))
    return {f"{bytes(h).hex()}.msgpack.zst" for h in index["shards"].values()}


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
    live = _live_shards(staged)
    if live:
        (published / "shards").mkdir(exist_ok=True)
    for name in sorted(live):  # content-addressed: a present one is already right
        if not (published / "shards" / name).exists():
            atomic_copy(staged / "shards" / name, published / "shards" / name)
    # The shard index and repodata.json last: whatever a client reads first only names
    # files that already exist.
    for name in ("repodata_shards.msgpack.zst", "repodata.json.zst", "repodata.json"):
        source = staged / name
        if source.is_file() and not _same_bytes(source, published / name):
            atomic_copy(source, published / name)
    _prune(staged / "shards", keep=live)
    # Served shards of the previous generation stay for clients that are mid-fetch.
    _prune(published / "shards", keep=live | previous_shards)
    return live


def _prune(folder: Path, keep: set[str]) -> None:
    if folder.is_dir():
        for shard in folder.iterdir():
            if shard.name not in keep:
                shard.unlink(missing_ok=True)


# ---------------------------------------------------------------- the whole pass

@dataclass
class IndexReport:
    packages: int = 0
    read: int = 0
    bad: dict[str, str] = field(default_factory=dict)


def _name(entry: dict | None) -> str | None:
    """The package name of a readable file's entry (None: absent or unreadable)."""
    return entry["meta"].get("name") if entry and not entry.get("error") else None


def index_channel(settings: Settings) -> IndexReport:
    """Bring every subdir's repodata and the index page in line with the channel's files.

    Only the package names touched by a change are handed to rattler (in a fresh folder of
    hard links, so a same-name rebuild is read again); their records and shards replace the
    old ones in the staged index, which is then published.
    """
    from rattler.index import index_fs

    channel_dir = settings.channel_dir
    staging = settings.state("index", "staging")
    work = settings.state("index", "work")
    with exclusive_lock(settings.state("index", "lock"), "the channel index"):
        (channel_dir / "noarch").mkdir(parents=True, exist_ok=True)
        listing = channel_listing(channel_dir)
        state = read_json(state_path(settings), {})
        if state.get("version") != STATE_VERSION:
            state = {}
            shutil.rmtree(staging, ignore_errors=True)
        known: dict[str, dict] = state.get("packages", {})
        report = IndexReport()

        # Entries of files unchanged since the last pass are kept as they are (the same
        # objects, which is how the comparison below tells them from new ones).
        current: dict[str, dict] = {}
        to_check = []
        for subdir, files in listing.items():
            for filename, (size, mtime_ns) in files.items():
                before = known.get(f"{subdir}/{filename}")
                if before and [before["size"], before["mtime_ns"]] == [size, mtime_ns]:
                    current[f"{subdir}/{filename}"] = before
                else:
                    to_check.append(PackageCheck(subdir, filename, size, mtime_ns))
        asyncio.run(_validate_all(channel_dir, to_check))
        report.read = len(to_check)
        for check in to_check:
            current[f"{check.subdir}/{check.filename}"] = {
                "size": check.size, "mtime_ns": check.mtime_ns, "meta": check.meta,
                "error": check.error}

        # Package names whose records change, per subdir: new, changed, removed, gone bad.
        touched: dict[str, set[str]] = {}
        for key in set(current) | set(known):
            if known.get(key) is current.get(key):
                continue
            subdir = key.split("/", 1)[0]
            for name in (_name(known.get(key)), _name(current.get(key))):
                if name:
                    touched.setdefault(subdir, set()).add(name)
        for subdir in listing:  # a subdir never indexed gets everything it has
            if not (staging / subdir / "repodata.json").is_file():
                names = (_name(current[f"{subdir}/{f}"]) for f in listing[subdir])
                touched.setdefault(subdir, set()).update(n for n in names if n)

        if touched:
            shutil.rmtree(work, ignore_errors=True)
            (work / "noarch").mkdir(parents=True)
            for subdir, names in touched.items():
                (work / subdir).mkdir(exist_ok=True)
                for filename in listing.get(subdir, {}):
                    if _name(current[f"{subdir}/{filename}"]) in names:
                        _link(channel_dir / subdir / filename, work / subdir / filename)
            asyncio.run(index_fs(work, write_zst=False, write_shards=True))
            for subdir, names in touched.items():
                _update_subdir(work / subdir, staging / subdir, names)
            shutil.rmtree(work, ignore_errors=True)
        for stale in staging.iterdir() if staging.is_dir() else ():
            if stale.is_dir() and stale.name not in listing:
                shutil.rmtree(stale)

        shards = state.get("shards", {})
        for subdir in listing:
            published = channel_dir / subdir / "repodata.json"
            if subdir in touched or not published.is_file():
                shards[subdir] = sorted(_publish_subdir(
                    staging / subdir, channel_dir / subdir, set(shards.get(subdir, []))))
        bad_before = {k for k, e in known.items() if e.get("error")}
        report.bad = {key: entry["error"] for key, entry in current.items() if entry.get("error")}
        if touched or set(report.bad) != bad_before or not (channel_dir / "index.html").exists():
            write_index_page(channel_dir, current)
        report.packages = len(current) - len(report.bad)
        atomic_write_bytes(state_path(settings), orjson.dumps({
            "version": STATE_VERSION,
            # A channel with unreadable files is never recorded as indexed: the error repeats.
            "signature": listing_signature(listing) if not report.bad else "",
            "packages": current,
            "shards": {k: v for k, v in shards.items() if k in listing},
        }))
    return report


# ---------------------------------------------------------------- the index page

def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def write_index_page(channel_dir: Path, packages: dict[str, dict]) -> None:
    """index.html: every package, newest version first within each name."""
    from rattler import Version

    newest_first = sorted(
        ((Version(e["meta"]["version"]), e["meta"]["build"], key, e)
         for key, e in packages.items() if not e.get("error")),
        key=lambda item: item[:2], reverse=True)
    good = sorted(((key, e) for _, _, key, e in newest_first),
                  key=lambda item: item[1]["meta"]["name"])  # stable: keeps version order
    escape = html.escape
    # Names, versions, builds and so file names are limited to [A-Za-z0-9._+!-] by conda;
    # only the summary needs escaping.
    rows = [f'<tr><td>{m["name"]}</td><td>{m["version"]}</td><td>{m["build"]}</td>'
            f'<td>{subdir}</td><td class="n">{_human_size(entry["size"])}</td>'
            f'<td>{m.get("date", "")}</td><td>{escape(m.get("summary", ""))}</td>'
            f'<td><a href="{key}">{filename}</a></td></tr>'
            for key, entry in good for m in (entry["meta"],)
            for subdir, _, filename in (key.partition("/"),)]
    bad = [f"<li><code>{escape(k)}</code>: {escape(e['error'])}</li>"
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
            f"{len(report.bad)} package file(s) in the channel are unreadable and were left "
            f"out of the index (the other {report.packages} are indexed and served):\n{lines}",
            fix="delete each file named, or rebuild the recipe that makes it "
                "(doit forget build_recipes:<recipe>; doit build_recipes)")
        print(f"   left out of the index: {problem.message}")
    RUN.note_problem("channel index: unreadable files", problem)
    return report


@reports_errors
def run_index_channel() -> None:
    index_and_report(current_settings())


def task_index_channel():
    """Index channel/ as it is (repodata.json, .zst, shards) and write its index.html."""
    settings = current_settings()
    # No task_dep on build_recipes: each recipe build indexes what it publishes, so the
    # index never lags the packages, and a failed recipe never keeps the rest unindexed.
    return {
        "actions": [run_index_channel],
        "uptodate": [lambda task, values: channel_is_indexed(settings)],
        "verbosity": 2,
        "meta": {"what": "the channel index",
                 "interrupted": "index files are replaced whole: clients see the previous "
                                "index or the new one; the next run indexes again"},
    }
