"""index_channel over packages built for real: repodata, shards, index.html, bad files."""

from __future__ import annotations

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

from tasks.channel_index import index_channel
from tasks.settings import load_settings
from tests.conftest import DODO


def repodata(ws, subdir: str = "noarch") -> dict:
    data = json.loads((ws.channel / subdir / "repodata.json").read_text())
    return {**data.get("packages", {}), **data.get("packages.conda", {})}


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
    shutil.copy(ws.channel / "noarch" / one, ws.channel / "noarch" / "by-hand-1.0-0.conda")
    (ws.channel / "noarch" / one).unlink()
    shutil.rmtree(ws.root / "recipes" / "one")
    ws.doit("index_channel")
    assert sorted(repodata(ws)) == ["by-hand-1.0-0.conda", two]


def test_same_file_name_rebuild_gets_new_metadata(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes", "index_channel")
    [(filename, old)] = repodata(ws).items()
    ws.add_recipe("tool", script=["echo more > $PREFIX/share/tool/more.txt"])
    ws.doit("build_recipes", "index_channel")
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
    assert "fix: delete each file named" in problem
    assert "hubworks: 1 ran, 1 problem" in run.output
    assert {r["name"] for r in repodata(ws).values()} == {"good", "other"}
    assert "truncated-1.0-0.conda" in (ws.channel / "index.html").read_text()  # listed as bad
    assert truncated.exists() and garbage.exists()  # nothing is deleted

    # The error repeats until the file is dealt with; then the index is clean again.
    assert ws.doit("index_channel", check=False).returncode != 0
    truncated.unlink()
    garbage.unlink()
    ws.doit("index_channel")


def test_readers_never_see_a_partial_index(workspace):
    ws = workspace
    for n in range(3):
        ws.add_recipe(f"pkg{n}")
    ws.doit("build_recipes", "index_channel")
    settings = load_settings(ws.root)
    target = ws.channel / "noarch" / "repodata.json"
    stop = threading.Event()
    failures, reads = [], [0]

    def reader():
        while not stop.is_set():
            try:
                json.loads(target.read_bytes())
                reads[0] += 1
            except ValueError as exc:
                failures.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        source = ws.channel / "noarch" / ws.packages()[0]
        for n in range(15):  # each pass adds a package, so every pass rewrites the index
            shutil.copy(source, ws.channel / "noarch" / f"copy{n}-1.0-0.conda")
            index_channel(settings)
    finally:
        stop.set()
        thread.join()
    assert reads[0] > 0 and failures == []
    assert len(repodata(ws)) == 18


def test_ctrl_c_during_index_channel_says_what_is_left_and_exits_130(workspace):
    ws = workspace
    ws.add_recipe("one")
    ws.doit("build_recipes")
    noarch = ws.channel / "noarch"
    before = (noarch / "repodata.json").read_bytes()
    shutil.copy(noarch / ws.packages()[0], noarch / "two-1.0-0.conda")
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
        output = seen + doit.communicate(timeout=60)[0]
    assert doit.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "interrupted: index_channel (index files are replaced whole: clients see the " \
        "previous index or the new one; the next run indexes again)" in output
    assert (noarch / "repodata.json").read_bytes() == before
    assert "indexed 2 packages" in ws.doit("index_channel").output
