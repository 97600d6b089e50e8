"""index_channel over packages built for real: repodata, shards, index.html, bad files."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from html.parser import HTMLParser
from urllib.parse import unquote

import msgpack
import pytest
import zstandard

from tasks.channel.index import STATE_VERSION, index_channel
from tasks.core.settings import load_settings
from tests.conftest import DODO, interrupted_output
from tests.package_copies import package_as


def repodata(ws, subdir: str = "noarch") -> dict:
    data = json.loads((ws.channel / subdir / "repodata.json").read_text())
    return {**data.get("packages", {}), **data.get("packages.conda", {})}


def sharded_names(ws, subdir: str = "noarch") -> set[str]:
    """Package names in the served shard index, each with its shard file present."""
    compressed = (ws.channel / subdir / "repodata_shards.msgpack.zst").read_bytes()
    index = msgpack.unpackb(zstandard.ZstdDecompressor().decompressobj().decompress(compressed))
    for digest in index["shards"].values():
        assert (ws.channel / subdir / "shards" / f"{bytes(digest).hex()}.msgpack.zst").is_file()
    return set(index["shards"])


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_index_writes_repodata_shards_and_index_page(example_workspace):
    ws = example_workspace
    ws.doit("build_recipes")  # each build indexes what it published
    noarch = ws.channel / "noarch"
    records = repodata(ws)
    assert {r["name"] for r in records.values()} == {"lab-templates", "lab-settings",
                                                    "new-notebook"}
    for filename, record in records.items():
        assert record["sha256"] == sha256(noarch / filename)
    assert (noarch / "repodata.json.zst").stat().st_size > 0
    assert (noarch / "repodata_shards.msgpack.zst").is_file()
    assert len(list((noarch / "shards").glob("*.msgpack.zst"))) == 3
    page = (ws.channel / "index.html").read_text()
    row = re.search(r"<tr><td>new-notebook</td>.*?</tr>", page).group(0)
    for cell in ("0.3.1", "h4616a5c_0", "noarch", "KiB",
                 "Command-line tool that starts a notebook from a lab-templates template"):
        assert cell in row
    assert re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d</td>", row)


def test_index_is_incremental(workspace):
    ws = workspace
    ws.add_recipe("one")
    ws.doit("build_recipes", "index_channel")
    assert ws.doit("index_channel").executed == []          # nothing changed: no work

    ws.add_recipe("two")
    run = ws.doit("build_recipes", "index_channel")
    assert "indexed 2 packages (1 read)" in run.output      # only the new one is read
    assert {r["name"] for r in repodata(ws).values()} == {"one", "two"}

    # A file dropped in by hand is indexed too; a deleted one (recipe gone) leaves the index.
    one, two = ws.packages()
    package_as(ws.channel / "noarch" / one, ws.channel / "noarch", name="by-hand",
               version="1.0", build="0")
    (ws.channel / "noarch" / one).unlink()
    shutil.rmtree(ws.root / "recipes" / "one")
    ws.doit("index_channel")
    assert sorted(repodata(ws)) == ["by-hand-1.0-0.conda", two]
    # The page lists what is indexed: the removed file is gone from it, the new one is there.
    page = (ws.channel / "index.html").read_text()
    assert one not in page and "by-hand-1.0-0.conda" in page and two in page
    shutil.rmtree(ws.root / "recipes" / "two")
    (ws.channel / "noarch" / two).unlink()
    ws.doit("index_channel")
    assert ">two<" not in (ws.channel / "index.html").read_text()


def test_a_file_replaced_under_the_same_name_gets_new_metadata(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes", "index_channel")
    [(filename, old)] = repodata(ws).items()
    # Builds never replace a published file; a person copying one over it can.
    ws.add_recipe("tool", script=["echo more > $PREFIX/share/tool/more.txt"])
    ws.doit("build_recipes")
    [rebuilt] = [name for name in ws.packages() if name != filename]
    # Moved over it, its index.json saying the replaced file's build: the name stays true.
    package_as(ws.channel / "noarch" / rebuilt, ws.state, build=old["build"]).replace(
        ws.channel / "noarch" / filename)
    (ws.channel / "noarch" / rebuilt).unlink()
    index_channel(load_settings(ws.root))  # the index alone: a build would make it again
    [(same_name, new)] = repodata(ws).items()
    assert same_name == filename
    assert new["sha256"] != old["sha256"]
    assert new["sha256"] == sha256(ws.channel / "noarch" / filename)


def test_corrupt_package_is_named_and_the_rest_still_indexed(workspace):
    ws = workspace
    ws.add_recipe("good")
    ws.add_recipe("other")
    ws.doit("build_recipes", "index_channel")
    good = ws.channel / "noarch" / ws.packages()[0]
    truncated = ws.channel / "noarch" / "truncated-1.0-0.conda"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = ws.channel / "noarch" / "garbage-2.0-0.tar.bz2"
    garbage.write_bytes(b"this is not a package")

    run = ws.doit("index_channel", check=False)
    # The task succeeds, so what needs the index goes ahead; the run fails at its end,
    # naming the files and what to do.
    assert "ok index_channel" in run.output
    assert run.returncode == 1
    problem = run.output[run.output.index("problem: "):]
    assert str(truncated) in problem and str(garbage) in problem
    assert "the other 2 are indexed and served" in problem
    assert "delete any other file named" in problem
    assert "hubworks: 1 ran, 1 problem" in run.output
    assert {r["name"] for r in repodata(ws).values()} == {"good", "other"}
    assert "truncated-1.0-0.conda" in (ws.channel / "index.html").read_text()  # listed as bad
    assert truncated.exists() and garbage.exists()  # nothing is deleted

    # The error repeats until the file is dealt with; then the index is clean again.
    assert ws.doit("index_channel", check=False).returncode != 0
    truncated.unlink()
    garbage.unlink()
    ws.doit("index_channel")
    # No name's records changed, but the list of files left out did: the page follows it.
    assert "truncated-1.0-0.conda" not in (ws.channel / "index.html").read_text()


def _damaged_copies(package, folder) -> list:
    """Copies of ``package`` cut short or with one byte changed: in its payload (which
    rattler's indexer does not read), in its metadata, near its end."""
    data = package.read_bytes()
    stem, suffix = package.name.split("-", 1)[0], package.name[len(package.name.split("-", 1)[0]):]
    if package.name.endswith(".conda"):
        with zipfile.ZipFile(package) as archive:
            [payload] = [m for m in archive.infolist() if m.filename.startswith("pkg-")]
        positions = {"payload": payload.header_offset + 30 + len(payload.filename) + 20
                     + payload.compress_size // 2}
    else:
        positions = {"payload": len(data) // 2}
    positions.update(metadata=len(data) // 3, end=len(data) - 3)
    copies = []
    for where, position in positions.items():
        changed = bytearray(data)
        changed[position] ^= 0x55
        copies.append(folder / f"{stem}{where}{suffix}")
        copies[-1].write_bytes(bytes(changed))
    copies.append(folder / f"{stem}cut{suffix}")
    copies[-1].write_bytes(data[: len(data) * 2 // 3])
    return copies


def test_a_first_index_names_every_damaged_file_and_indexes_the_rest(workspace):
    ws = workspace
    ws.add_recipe("good")
    ws.doit("build_recipes")
    ws.configure('[recipes]\npackage_format = "tar.bz2"\n')
    ws.add_recipe("classic")
    ws.doit("build_recipes")
    noarch = ws.channel / "noarch"
    [conda] = noarch.glob("good-*.conda")
    [tar_bz2] = noarch.glob("classic-*.tar.bz2")
    damaged = _damaged_copies(conda, noarch) + _damaged_copies(tar_bz2, noarch)
    misplaced = ws.channel / "linux-64" / conda.name
    misplaced.parent.mkdir()
    shutil.copy(conda, misplaced)
    # No index state: the first index of a channel reads every file while rattler indexes.
    shutil.rmtree(ws.state / "index")

    run = ws.doit("index_channel", check=False)
    assert run.returncode == 1
    problem = run.output[run.output.index("problem: "):]
    for path in damaged + [misplaced]:
        assert str(path) in problem, path
    assert "the other 2 are indexed and served" in problem
    assert sorted(repodata(ws)) == sorted([conda.name, tar_bz2.name])
    assert sharded_names(ws) == {"good", "classic"}
    assert repodata(ws, "linux-64") == {} and sharded_names(ws, "linux-64") == set()


@pytest.mark.parametrize("kinds, first", [
    (("payload", "metadata", "end", "cut"), True), (("payload",), True),
    (("payload", "metadata", "end", "cut"), False)],
    ids=["first-index-rattler-stops-at-some", "first-index-rattler-reads-them-all",
         "added-to-an-index-read-by-several-processes"])
def test_many_packages_are_read_side_by_side_and_damage_is_still_named(workspace, kinds, first):
    """Many packages at once: in a first index rattler indexes every file while they are
    checked, and what the check refuses leaves the index (whether or not rattler could read
    it); added to an indexed channel, they are checked by several processes first."""
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    noarch = ws.channel / "noarch"
    [built] = noarch.glob("*.conda")
    for n in range(300):  # enough for reading side by side and for the early index
        package_as(built, noarch, build=f"copy{n}_0")
    damaged = []
    for path in _damaged_copies(built, noarch):
        if any(path.name.startswith(f"tool{kind}-") for kind in kinds):
            damaged.append(path)
        else:
            path.unlink()
    if first:
        shutil.rmtree(ws.state / "index")

    run = ws.doit("index_channel", check=False)
    assert run.returncode == 1
    assert f"indexed 301 packages ({300 + len(kinds) + first} read)" in run.output
    assert "panicked" not in run.output and "backtrace" not in run.output
    problem = run.output[run.output.index("problem: "):]
    assert sorted(re.findall(r"\S+\.conda(?=:)", problem)) == sorted(map(str, damaged))
    assert len(repodata(ws)) == 301 and not set(repodata(ws)) & {p.name for p in damaged}
    assert sharded_names(ws) == {"tool"}


def whole_zstd(data: bytes) -> bytes:
    """The text of one zstd frame; a frame cut short is an error, not a shorter text."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    text = decompressor.decompress(data)
    if not decompressor.eof:
        raise ValueError("zstd frame cut short")
    return text


# What a conda client reads first, each decoded whole as the client does.
INDEX_FILES = {
    "repodata.json": json.loads,
    "repodata.json.zst": lambda data: json.loads(whole_zstd(data)),
    "repodata_shards.msgpack.zst": lambda data: msgpack.unpackb(whole_zstd(data)),
}


def test_readers_never_see_a_partial_index(workspace):
    ws = workspace
    for n in range(3):
        ws.add_recipe(f"pkg{n}")
    ws.doit("build_recipes", "index_channel")
    settings = load_settings(ws.root)
    stop = threading.Event()
    failures, reads = [], dict.fromkeys(INDEX_FILES, 0)

    def reader():
        while not stop.is_set():
            for name, decode in INDEX_FILES.items():
                try:
                    decode((ws.channel / "noarch" / name).read_bytes())
                    reads[name] += 1
                except Exception as exc:  # missing included: a file is replaced, never removed
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        source = ws.channel / "noarch" / ws.packages()[0]
        for n in range(15):  # each pass adds a package, so every pass rewrites the index
            package_as(source, ws.channel / "noarch", build=f"copy{n}")
            index_channel(settings)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and all(reads.values()), (failures[:5], reads)
    assert len(repodata(ws)) == 18


def test_ctrl_c_during_index_channel_says_what_is_left_and_exits_130(workspace):
    ws = workspace
    ws.add_recipe("one")
    ws.doit("build_recipes")
    noarch = ws.channel / "noarch"
    before = (noarch / "repodata.json").read_bytes()
    package_as(noarch / ws.packages()[0], noarch, name="two", version="1.0", build="0")
    # Another run holds the index: this one waits inside index_channel, where Ctrl-C lands.
    with (ws.state / "index" / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doit = subprocess.Popen(
            [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root), "index_channel"],
            env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        seen = ""
        while "waiting for another run to finish with the channel index" not in seen:
            line = doit.stdout.readline()
            assert line, seen
            seen += line
        os.killpg(doit.pid, signal.SIGINT)   # Ctrl-C in a terminal
        output = seen + interrupted_output(doit)
    assert "interrupted: index_channel (index files are replaced whole: clients see the " \
        "previous index or the new one; the next run indexes again)" in output
    assert (noarch / "repodata.json").read_bytes() == before
    assert "indexed 2 packages" in ws.doit("index_channel").output


def _cut_to_1000_bytes(path):  # what a write cut short leaves: `head -c 1000`
    path.write_bytes(path.read_bytes()[:1000])


def _not_msgpack(path):
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\xc1 not msgpack"))


def _one_entry_of_another_shape(path):
    state = json.loads(path.read_text())
    first = sorted(state["packages"])[0]
    state["packages"][first] = {**state["packages"][first], "meta": "not a mapping"}
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("state_file, damage", [
    ("staging/noarch/repodata.json", _cut_to_1000_bytes),
    ("staging/noarch/repodata.json", lambda path: path.write_bytes(b'{"packages": {}}')),
    ("staging/noarch/repodata.json.zst", _cut_to_1000_bytes),
    ("staging/noarch/records.msgpack", _cut_to_1000_bytes),
    ("staging/noarch/repodata_shards.msgpack.zst", lambda path: path.write_bytes(b"\0" * 40)),
    ("staging/noarch/repodata_shards.msgpack.zst", _not_msgpack),
    ("state.json", _cut_to_1000_bytes),
    ("state.json", lambda path: path.write_text(f'{{"version": {STATE_VERSION}, "packages": []}}')),
    ("state.json", _one_entry_of_another_shape),
], ids=["repodata-cut", "repodata-emptied", "zst-cut", "records-cut", "shard-index-zeros",
        "shard-index-not-msgpack", "state-cut", "state-wrong-shape", "state-entry-wrong-shape"])
def test_an_unreadable_state_file_means_reindex_never_empty(workspace, state_file, damage):
    ws = workspace
    names = {f"pkg{n}" for n in range(6)}
    for name in names:
        ws.add_recipe(name)
    ws.doit("build_recipes")
    target = ws.state / "index" / state_file
    assert target.stat().st_size > 1000 or not state_file.endswith(".json")
    damage(target)

    ws.add_recipe("late")
    run = ws.doit("build_recipes")
    assert "indexed 7 packages" in run.output
    assert {r["name"] for r in repodata(ws).values()} == names | {"late"}
    assert sharded_names(ws) == names | {"late"}
    # The rebuilt staged index is whole again: the next change folds into it.
    ws.add_recipe("later")
    ws.doit("build_recipes")
    assert {r["name"] for r in repodata(ws).values()} == names | {"late", "later"}
    assert sharded_names(ws) == names | {"late", "later"}


def test_a_staged_shard_that_went_missing_is_rebuilt(workspace):
    ws = workspace
    for name in ("one", "two"):
        ws.add_recipe(name)
    ws.doit("build_recipes")
    for shard in (ws.state / "index" / "staging" / "noarch" / "shards").iterdir():
        shard.unlink()
    shutil.rmtree(ws.channel / "noarch" / "shards")  # and the served copies with them
    ws.add_recipe("three")
    ws.doit("build_recipes")
    assert sharded_names(ws) == {"one", "two", "three"}


def test_package_in_a_folder_its_subdir_disagrees_with_is_refused_by_name(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    built = ws.channel / "noarch" / ws.packages()[0]
    misplaced = ws.channel / "linux-64" / built.name
    misplaced.parent.mkdir()
    shutil.copy(built, misplaced)

    run = ws.doit("index_channel", check=False)
    assert run.returncode != 0
    assert f"{misplaced}: its index.json says subdir 'noarch'" in run.output
    assert "the other 1 are indexed and served" in run.output
    assert repodata(ws, "linux-64") == {}
    assert sharded_names(ws, "linux-64") == set()
    assert [r["name"] for r in repodata(ws).values()] == ["tool"]
    assert "linux-64/" + built.name in (ws.channel / "index.html").read_text()


def test_a_package_whose_file_name_disagrees_with_its_index_json_is_refused_by_name(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    noarch = ws.channel / "noarch"
    [built] = ws.packages()
    # Each copy's file name says another name, version or build than its index.json.
    misnamed = [noarch / name for name in ("toolz-1.0.0-h4616a5c_0.conda",
                                           "tool-2.0.0-h4616a5c_0.conda",
                                           "tool-1.0.0-h4616a5c_1.conda")]
    for path in misnamed:
        shutil.copy(noarch / built, path)

    run = ws.doit("index_channel", check=False)
    assert run.returncode != 0
    problem = run.output[run.output.index("problem: "):]
    for path in misnamed:
        assert f"{path}: its index.json says it is {built} (name, version, build), not " \
               f"{path.name}" in problem, problem
    assert "are unreadable, misplaced or misnamed" in problem
    assert "rename a misnamed one to the file name it gives" in problem
    assert "the other 1 are indexed and served" in problem
    assert list(repodata(ws)) == [built] and sharded_names(ws) == {"tool"}
    page = (ws.channel / "index.html").read_text()
    not_indexed = page[page.index("Not indexed"):page.index("<table>")]
    assert all(f"noarch/{path.name}" in not_indexed for path in misnamed)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 2 MiB tmpfs: a real filesystem that runs out of space."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill_disk(folder) -> None:
    """Write a file in ``folder`` until its filesystem has no block left."""
    with (folder / "filler").open("wb", buffering=0) as filler:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    filler.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def test_index_channel_on_a_full_disk_keeps_the_index_and_names_the_folder(workspace,
                                                                          small_disk):
    ws = workspace
    ws.add_recipe("one")
    ws.add_recipe("two")
    ws.doit("build_recipes")
    one, two = ws.packages()
    # The channel on a disk of its own (a volume or a share); doit's state is elsewhere.
    channel = small_disk / "channel"
    ws.env["HUBWORKS_CHANNEL_DIR"] = str(channel)
    noarch = channel / "noarch"
    noarch.mkdir(parents=True)
    shutil.copy(ws.channel / "noarch" / one, noarch)
    ws.doit("index_channel")
    before = {name: (noarch / name).read_bytes() for name in INDEX_FILES}

    shutil.copy(ws.channel / "noarch" / two, noarch)
    fill_disk(small_disk)
    run = ws.doit("index_channel", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert f"index_channel ran out of disk space writing in {channel}" in run.output
    assert f"the channel {channel} keeps its previous index" in run.output
    assert f"fix: free space on the disk that holds {channel}" in run.output
    assert {name: (noarch / name).read_bytes() for name in INDEX_FILES} == before

    (small_disk / "filler").unlink()
    assert "indexed 2 packages" in ws.doit("index_channel").output
    assert sorted(json.loads((noarch / "repodata.json").read_text())["packages.conda"]) == \
        [one, two]


class PageParts(HTMLParser):
    """The tags, attributes, link targets and text of a page, as a browser would parse it."""

    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.hrefs, self.text = set(), set(), [], []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            self.attributes.add(name)
            if name == "href":
                self.hrefs.append(value)

    def handle_data(self, data):
        self.text.append(data)


def assert_page_shows_but_does_not_run(ws, shown: list[str], links: int) -> None:
    page = PageParts()
    page.feed((ws.channel / "index.html").read_text())
    assert page.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "a",
                         "ul", "li", "code", "table", "tr", "th", "td"}, page.tags
    assert not [name for name in page.attributes if name.startswith("on")]
    text = "".join(page.text)
    for value in shown:
        assert value in text
    assert len(page.hrefs) == links
    for href in page.hrefs:
        assert re.fullmatch(r"[A-Za-z0-9%._~/-]+", href), href
        assert (ws.channel / unquote(href)).is_file(), href


def test_index_page_escapes_every_value_and_encodes_every_link(workspace):
    ws = workspace
    recipe = ws.add_recipe("evil", summary="<script>alert('summary')</script>")
    spec = json.loads(recipe.read_text())
    spec["build"]["string"] = "x<b onmouseover=alert(1)>&amp;_0"  # a build string, as crafted
    recipe.write_text(json.dumps(spec))
    ws.doit("build_recipes")
    [built] = ws.packages()
    assert "<b onmouseover" in built
    hostile_file = package_as(ws.channel / "noarch" / built, ws.channel / "noarch",
                              build="<img src=x onerror=alert(2)>").name
    ws.doit("index_channel")
    shown = ["<script>alert('summary')</script>", "x<b onmouseover=alert(1)>&amp;_0",
             hostile_file]
    assert_page_shows_but_does_not_run(ws, shown, links=2 + 1)  # packages, noarch's repodata

    # A folder named by a hostile uploader: refused (not a subdir), and named harmlessly.
    hostile_folder = ws.channel / "\"><svg onload=alert(3)>"
    hostile_folder.mkdir()
    shutil.copy(ws.channel / "noarch" / built, hostile_folder / "pkg-1.0-0.conda")
    run = ws.doit("index_channel", check=False)
    assert run.returncode != 0 and "is not a subdir of a conda channel" in run.output
    assert_page_shows_but_does_not_run(ws, shown + [hostile_folder.name], links=2 + 1)


def test_a_file_where_noarch_belongs_is_named_with_the_fix(workspace):
    ws = workspace
    shutil.rmtree(ws.channel)
    ws.channel.mkdir()
    (ws.channel / "noarch").write_text("not a folder")
    run = ws.doit("index_channel", check=False)
    assert run.returncode != 0
    assert f"{ws.channel / 'noarch'} must be a folder of the channel" in run.output
    assert f"fix: move {ws.channel / 'noarch'} out of the channel" in run.output
    assert "Traceback" not in run.output
