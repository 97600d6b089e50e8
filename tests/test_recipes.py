"""build_recipes with real rattler-build builds, in throwaway workspaces."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import rattler
from rattler.package_streaming import PackageArchive

from tasks.core.errors import HubworksError
from tasks.core.fsutil import is_package
from tasks.core.settings import load_settings
from tasks.recipes.build import _publish, scratch_dir
from tasks.recipes.recipe import find_cycles
from tests.conftest import DODO, interrupted_output


def package_file(ws, prefix: str) -> str:
    matches = [p for p in ws.packages() if p.startswith(prefix + "-")]
    assert len(matches) == 1, (prefix, ws.packages())
    return matches[0]


def test_example_recipes_build_in_dependency_order(example_workspace):
    ws = example_workspace
    run = ws.doit("build_recipes")
    assert set(run.executed) == {"index_channel", "build_recipes:lab-templates",
                                 "build_recipes:lab-settings", "build_recipes:new-notebook"}
    # new-notebook requires lab-templates, so it starts only after lab-templates is done.
    assert run.executed.index("build_recipes:lab-templates") < \
        run.executed.index("build_recipes:new-notebook")
    for name in ("lab-templates-1.2.0", "lab-settings-2024.6.0", "new-notebook-0.3.1"):
        package_file(ws, name.rsplit("-", 1)[0])
    # The recipe's own test ran (it needs lab-templates from the private channel).
    log = (ws.state / "logs" / "recipes" / "new-notebook.log").read_text()
    assert "all tests passed" in log
    # Scratch space stays out of the channel.
    assert not list(ws.channel.rglob("bld")) and not list(ws.channel.rglob("*.tmp"))


def test_second_run_with_nothing_changed_builds_nothing(example_workspace):
    ws = example_workspace
    ws.doit("build_recipes")
    run = ws.doit("build_recipes")
    assert run.executed == []
    assert len(run.up_to_date) == 4  # the recipes, and the index their builds updated


def test_changing_a_dependency_rebuilds_its_dependents_only(workspace):
    ws = workspace
    ws.add_recipe("base")
    ws.add_recipe("app", run=["base"], host=["base"])
    ws.add_recipe("loner")
    ws.doit("build_recipes")

    ws.add_recipe("base", script=["echo changed > $PREFIX/share/base/extra.txt"])
    run = ws.doit("build_recipes")
    assert sorted(run.executed) == ["build_recipes:app", "build_recipes:base"]
    # app was built again against the new base; what it holds did not change, so the
    # published file stays.
    assert "base: 1.0.0 build 0 is already published with other contents" in run.output
    assert f"app: {package_file(ws, 'app')} is already published with the same contents" \
        in run.output

    # Touching a file in one folder without changing it rebuilds nothing (content, not mtime).
    recipe = ws.root / "recipes" / "loner" / "recipe.yaml"
    os.utime(recipe, (time.time() + 5, time.time() + 5))
    assert ws.doit("build_recipes").executed == []


def test_a_package_missing_from_the_channel_is_rebuilt(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    (ws.channel / "noarch" / package_file(ws, "tool")).unlink()
    assert ws.doit("build_recipes").executed == ["index_channel", "build_recipes:tool"]
    package_file(ws, "tool")


def test_failing_recipe_reports_its_log_and_others_continue(workspace):
    ws = workspace
    ws.add_recipe("good")
    ws.add_recipe("broken", script=["echo 'compiling the widget'", "exit 7"])
    ws.add_recipe("needs-broken", run=["broken"])
    run = ws.doit("--continue", "build_recipes", check=False)
    assert run.returncode != 0
    assert "recipe 'broken' failed to build" in run.output
    assert "compiling the widget" in run.output          # the tail of its log
    log = ws.state / "logs" / "recipes" / "broken.log"
    assert str(log) in run.output and "exit 7" in log.read_text()
    assert "build_recipes:needs-broken" not in run.executed   # depends on it
    package_file(ws, "good")                                  # independent: built
    assert not [p for p in ws.packages() if p.startswith("broken")]


def indexed_names(ws) -> set[str]:
    """Package names in the channel's published noarch repodata (none: not indexed)."""
    path = ws.channel / "noarch" / "repodata.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return {record["name"] for section in ("packages", "packages.conda")
            for record in data.get(section, {}).values()}


@pytest.mark.parametrize("jobs", [[], ["-n", "2"]], ids=["serial", "threads"])
def test_a_failed_recipe_leaves_the_rest_built_indexed_and_names_what_it_stopped(
        workspace, jobs):
    ws = workspace
    ws.add_recipe("good")
    ws.add_recipe("broken", script=["exit 7"])
    ws.add_recipe("needs-broken", run=["broken"])
    ws.add_recipe("needs-that", run=["needs-broken"])
    run = ws.doit(*jobs, "--continue", "build_recipes", "index_channel", check=False)
    assert run.returncode != 0
    assert "FAILED build_recipes:broken" in run.output
    assert "FAILED index_channel" not in run.output
    assert indexed_names(ws) == {"good"}       # built, indexed, ready to serve
    # What doit did not run is named with the reason, in words, not doit's jargon.
    assert "recipe 'needs-broken' not built: it needs recipe 'broken', which failed" \
        in run.output
    assert "recipe 'needs-that' not built: it needs recipe 'needs-broken', which was not " \
        "built (it needs recipe 'broken', which failed)" in run.output
    assert "UnmetDependency" not in run.output
    assert "hubworks: 2 ran, 1 failed (build_recipes:broken), 2 not built " \
        "(build_recipes:needs-broken, build_recipes:needs-that)" in run.output


def test_without_continue_what_was_built_before_a_failure_is_indexed(workspace):
    ws = workspace
    ws.add_recipe("a-good")
    ws.add_recipe("b-broken", script=["exit 7"])   # built after a-good: names are sorted
    run = ws.doit("build_recipes", check=False)
    assert run.returncode != 0
    assert run.executed[-2:] == ["build_recipes:a-good", "build_recipes:b-broken"]
    assert indexed_names(ws) == {"a-good"}


def send_to_a_thread_other_than_main(pid: int, signum: int) -> None:
    """What the kernel may do with any process-directed signal: hand it to another thread."""
    others = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if int(t.name) != pid)
    assert others, "doit runs more than one thread here"
    assert ctypes.CDLL(None, use_errno=True).tgkill(pid, others[-1], signum) == 0


@pytest.mark.parametrize("how, jobs", [("ctrl-c", []), ("sigterm", ["-n", "2"]),
                                       ("ctrl-c-to-another-thread", ["-n", "2"])])
def test_interrupted_build_says_what_stopped_and_leaves_nothing_running(workspace, how, jobs):
    ws = workspace
    pid_file = ws.root / "build-script.pid"
    ws.add_recipe("slow", script=[f"echo $$ > {pid_file}", "sleep 120"])
    doit = subprocess.Popen(
        [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root), *jobs,
         "build_recipes"], env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline and doit.poll() is None, doit.communicate()[0]
        time.sleep(0.05)
    script = int(pid_file.read_text())
    if how == "ctrl-c":
        os.killpg(doit.pid, signal.SIGINT)   # a terminal sends it to the foreground group
    elif how == "sigterm":
        os.kill(doit.pid, signal.SIGTERM)    # a service manager or `kill`: doit alone
    else:
        send_to_a_thread_other_than_main(doit.pid, signal.SIGINT)
    output = interrupted_output(doit)
    assert "interrupted: build_recipes:slow (packages reach the channel whole or not at " \
        "all; the next run builds and indexes what did not finish)" in output
    assert "hubworks: interrupted" in output
    assert ws.packages() == []
    # The build stopped with doit: nothing is left running that writes into its scratch.
    assert not is_running(script)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may never reap an orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_parallel_builds(workspace):
    ws = workspace
    ws.add_recipe("base")
    for n in range(4):
        ws.add_recipe(f"leaf{n}", run=["base"])
    run = ws.doit("-n", "2", "build_recipes")
    assert len(run.executed) == 6  # and index_channel
    assert len(ws.packages()) == 5


def read_until(proc, text: str, timeout: float = 120) -> str:
    """Output of ``proc`` up to the line holding ``text`` (fails if it exits first)."""
    seen = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                return "".join(seen)
    finally:
        timer.cancel()
    raise AssertionError(f"never printed {text!r}:\n{''.join(seen)}")


def test_a_second_run_waits_for_the_lock_on_the_recipe_it_builds(workspace):
    ws = workspace
    ws.add_recipe("slow")
    lock_file = scratch_dir(load_settings(ws.root), "slow") / "lock"
    lock_file.parent.mkdir(parents=True)
    # What a first run has in the scratch space mid-build; a second one must leave it alone.
    mid_build = lock_file.parent / "out" / "noarch" / "half-built.conda"
    mid_build.parent.mkdir(parents=True)
    mid_build.write_bytes(b"the first run is still writing this")

    with lock_file.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # this test is the first run, holding the recipe
        second = subprocess.Popen(
            [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root), "build_recipes"],
            env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            read_until(second, "waiting for another run to finish with recipe 'slow'")
            assert second.poll() is None                 # still waiting, not failed
            assert mid_build.read_bytes() == b"the first run is still writing this"
            assert ws.packages() == []
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    assert zipfile.ZipFile(ws.channel / "noarch" / package_file(ws, "slow")).testzip() is None


def test_a_recipe_edited_between_runs_is_read_again(workspace):
    """What each recipe.yaml renders to is kept between runs; an edit is seen at once."""
    ws = workspace
    ws.add_recipe("base")
    ws.add_recipe("app", summary="the first words")
    ws.doit("build_recipes")
    assert "the first words" in ws.doit("list", "--all").output

    # Same size, same mtime: only the bytes tell the new recipe from the old one.
    recipe = ws.root / "recipes" / "app" / "recipe.yaml"
    stat = recipe.stat()
    recipe.write_text(recipe.read_text().replace("the first words", "the other words"))
    os.utime(recipe, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "the other words" in ws.doit("list", "--all").output

    # A new requirement on another recipe's package orders the builds anew.
    ws.add_recipe("app", run=["base"], summary="the other words")
    ws.add_recipe("base", script=["echo changed > $PREFIX/share/base/extra.txt"])
    run = ws.doit("build_recipes")
    assert run.executed == ["build_recipes:base", "build_recipes:app"]  # app waits for base


def test_dependency_cycle_is_an_error_naming_the_recipes(workspace):
    ws = workspace
    ws.add_recipe("alpha", run=["beta"])
    ws.add_recipe("beta", run=["alpha"])
    ws.add_recipe("gamma")
    run = ws.doit("--continue", "build_recipes", check=False)
    assert run.returncode != 0
    assert "cycle: alpha -> beta -> alpha" in run.output
    package_file(ws, "gamma")


def test_every_cycle_is_found_with_every_recipe_in_it():
    graph = {"app": {"lib"}, "lib": {"core"}, "core": {"app", "base"}, "base": set(),
             "left": {"right"}, "right": {"left"}, "tool": {"base", "left"}, "self": set()}
    assert find_cycles(graph) == [["app", "core", "lib"], ["left", "right"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_broken_recipe_file_names_the_recipe(workspace):
    ws = workspace
    folder = ws.root / "recipes" / "garbled"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("package: [\n")
    (ws.root / "recipes" / "empty").mkdir()
    ws.add_recipe("fine")
    run = ws.doit("--continue", "build_recipes", check=False)
    assert "recipe 'garbled' cannot be read" in run.output
    assert "recipe 'empty' has no recipe.yaml or meta.yaml" in run.output
    assert ws.doit("list").returncode == 0   # the graph still loads
    package_file(ws, "fine")


@pytest.mark.skipif(shutil.which("conda-build") is not None, reason="conda-build is installed")
def test_meta_yaml_without_conda_build_names_both_ways_out(workspace):
    ws = workspace
    folder = ws.root / "recipes" / "legacy"
    folder.mkdir()
    (folder / "meta.yaml").write_text(
        "{% set version = '0.1' %}\npackage:\n  name: legacy\n  version: {{ version }}\n"
        "build:\n  noarch: generic\nrequirements:\n  run:\n    - modern\n")
    ws.add_recipe("modern")
    run = ws.doit("build_recipes", check=False)
    assert run.returncode != 0
    assert "recipe 'legacy' is a legacy meta.yaml recipe and conda-build is not installed" \
        in run.output
    assert "conda install conda-build" in run.output and "recipe.yaml" in run.output
    # It was still read: its dependency on 'modern' orders the build.
    assert run.executed.index("build_recipes:modern") < run.executed.index("build_recipes:legacy")


def payload(package: Path) -> list[str]:
    async def paths():
        archive = await PackageArchive.from_path(package)
        return sorted(str(p.relative_path) for p in (await archive.paths_json()).paths)

    return asyncio.run(paths())


def untouched(path: Path) -> tuple:
    stat = path.stat()
    return path.read_bytes(), stat.st_ino, stat.st_mtime_ns


def solved_build(ws, tmp_path, spec: str) -> int:
    """The build number a conda client picks for ``spec`` from the indexed channel."""
    async def solve():
        gateway = rattler.Gateway(cache_dir=tmp_path / "client-cache")
        return await rattler.solve([rattler.Channel(ws.channel.as_uri())], [spec],
                                   gateway=gateway, platforms=["noarch"])

    ws.doit("index_channel")
    [record] = asyncio.run(solve())
    return record.build_number


def test_published_package_files_never_change(workspace, tmp_path):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    [first] = ws.packages()
    assert first.endswith("_0.conda")
    published = ws.channel / "noarch" / first
    before = untouched(published)

    # Rebuilt with the same contents (a file beside the recipe changed): the file stays.
    (ws.root / "recipes" / "tool" / "NOTES.txt").write_text("not part of the package")
    run = ws.doit("build_recipes")
    assert run.executed == ["build_recipes:tool"]
    assert f"tool: {first} is already published with the same contents; kept it" in run.output
    assert ws.packages() == [first] and untouched(published) == before

    # Rebuilt with other contents: published as the next build number, the old file as it was.
    ws.add_recipe("tool", script=["echo v2 > $PREFIX/share/tool/new.txt"])
    run = ws.doit("build_recipes")
    assert "tool: 1.0.0 build 0 is already published with other contents; built as build 1" \
        in run.output
    second = first.replace("_0.conda", "_1.conda")
    assert ws.packages() == [first, second]
    assert untouched(published) == before
    assert "share/tool/new.txt" in payload(ws.channel / "noarch" / second)
    assert "share/tool/new.txt" not in payload(published)
    record = json.loads(record_file(ws, "tool").read_text())
    assert [p["file"] for p in record["packages"]] == [f"noarch/{second}"]
    assert solved_build(ws, tmp_path, "tool") == 1  # clients get the new contents

    # Reverted to the first contents: build 0 holds them, but clients would keep build 1.
    ws.add_recipe("tool")
    run = ws.doit("build_recipes")
    assert "tool: 1.0.0 build 1 is already published, newer than this build (0); " \
        "built as build 2" in run.output
    third = first.replace("_0.conda", "_2.conda")
    assert ws.packages() == [first, second, third]
    assert "share/tool/new.txt" not in payload(ws.channel / "noarch" / third)
    assert solved_build(ws, tmp_path / "again", "tool") == 2


def record_file(ws, recipe: str) -> Path:
    return scratch_dir(load_settings(ws.root), recipe) / "record.json"


def test_republish_error_setting_names_the_recipe_the_file_and_the_fix(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    [first] = ws.packages()
    before = untouched(ws.channel / "noarch" / first)
    recipe = ws.add_recipe("tool", script=["echo v2 > $PREFIX/share/tool/new.txt"])

    ws.env["HUBWORKS_RECIPES_REPUBLISH"] = "error"
    run = ws.doit("build_recipes", check=False)
    assert run.returncode != 0
    assert "recipe 'tool' rebuilt package(s) that are already published" in run.output
    assert f"{ws.channel / 'noarch' / first}: tool 1.0.0 build 0 is already published with " \
           f"other contents" in run.output
    assert f"fix: bump the version or the build number in {recipe}" in run.output
    assert "Traceback" not in run.output
    assert ws.packages() == [first] and untouched(ws.channel / "noarch" / first) == before

    ws.env["HUBWORKS_RECIPES_REPUBLISH"] = "sometimes"
    run = ws.doit("build_recipes", check=False)
    assert "recipes.republish is 'sometimes' (from $HUBWORKS_RECIPES_REPUBLISH)" in run.output
    assert "Traceback" not in run.output


def _built_package(folder: Path, data: bytes) -> Path:
    built = folder / "out" / "noarch" / "tool-1.0-0.conda"
    built.parent.mkdir(parents=True)
    built.write_bytes(data)
    return built


@pytest.mark.parametrize("build_elsewhere", [False, True], ids=["same-fs", "other-fs"])
def test_publishing_never_replaces_a_file_in_the_channel(workspace, tmp_path, build_elsewhere):
    ws = workspace
    settings = load_settings(ws.root)
    if build_elsewhere:  # scratch space on another filesystem than the channel
        if not Path("/dev/shm").is_dir() or \
                os.stat("/dev/shm").st_dev == os.stat(ws.channel).st_dev:
            pytest.skip("needs a second filesystem")
        scratch = Path(tempfile.mkdtemp(dir="/dev/shm"))
    else:
        scratch = tmp_path / "scratch"
    try:
        target = ws.channel / "noarch" / "tool-1.0-0.conda"
        record = _publish(settings, _built_package(scratch / "1", b"first build"))
        assert target.read_bytes() == b"first build" and record["file"] == "noarch/tool-1.0-0.conda"
        assert oct(target.stat().st_mode & 0o777) == oct(0o644)

        second = _built_package(scratch / "2", b"second build")
        with pytest.raises(HubworksError, match="published files never change"):
            _publish(settings, second)
        assert target.read_bytes() == b"first build"
        assert second.read_bytes() == b"second build"
        assert [p.name for p in target.parent.iterdir()] == [target.name]  # no leftovers
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class FolderEvents:
    """What the kernel reports happening to the files of one folder (Linux inotify)."""

    CREATE, MOVED_TO, MODIFY, CLOSE_WRITE = 0x100, 0x80, 0x2, 0x8

    def __init__(self, folder: Path):
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        mask = self.CREATE | self.MOVED_TO | self.MODIFY | self.CLOSE_WRITE
        if self._fd < 0 or self._libc.inotify_add_watch(self._fd, str(folder).encode(), mask) < 0:
            pytest.skip("inotify is not available")

    def read(self) -> dict[str, int]:
        """File name -> every event mask seen for it, or-ed together."""
        seen: dict[str, int] = {}
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                os.close(self._fd)
                return seen
            offset = 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
                seen[name] = seen.get(name, 0) | mask
                offset += 16 + length


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_packages_appear_in_the_channel_in_one_step(workspace):
    ws = workspace
    ws.add_recipe("tool")
    (ws.channel / "noarch").mkdir()
    events = FolderEvents(ws.channel / "noarch")
    ws.doit("build_recipes")
    seen = events.read()
    [package] = ws.packages()
    # Made whole elsewhere, then linked or renamed in: never written under its own name.
    assert seen[package] & (FolderEvents.CREATE | FolderEvents.MOVED_TO), seen
    written = FolderEvents.MODIFY | FolderEvents.CLOSE_WRITE
    assert not [name for name, mask in seen.items() if is_package(name) and mask & written], seen


def test_recipe_folders_named_with_spaces_and_shell_characters_build(workspace):
    ws = workspace
    folders = {"my recipe": "my-recipe", "it's $HOME \"quoted\" `x` & (more); done": "odd"}
    for folder, name in folders.items():
        # Build scripts that use their paths unquoted, as many do.
        ws.add_recipe(folder, name=name, script=[
            f"cp $RECIPE_DIR/data.txt $PREFIX/share/{name}/data.txt",
            f"cd $SRC_DIR && pwd > $PREFIX/share/{name}/built-in.txt"])
        (ws.root / "recipes" / folder / "data.txt").write_text(f"data of {folder}\n")
    ws.doit("build_recipes")
    for folder, name in folders.items():
        assert f"share/{name}/data.txt" in payload(ws.channel / "noarch" / package_file(ws, name))
        assert (ws.state / "logs" / "recipes" / f"{folder}.log").is_file()  # readable names
    for scratch in (ws.state / "recipes").iterdir():
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", scratch.name), scratch.name
    assert ws.doit("build_recipes").executed == []  # and they are up to date afterwards



def test_build_commands_get_no_hubworks_settings_such_as_the_channel_token(tmp_path,
                                                                          monkeypatch):
    """rattler-build already runs scripts in an environment of its own; conda-build and
    repo2docker pass more through, so every build command starts without HUBWORKS_*."""
    from tasks.core.commands import run_logged

    monkeypatch.setenv("HUBWORKS_CHANNEL_TOKEN", "a-fixed-token-of-the-office-0123")
    log = tmp_path / "build.log"
    assert run_logged(["env"], log, title="a build", cwd=tmp_path).returncode == 0
    text = log.read_text()
    assert "PATH=" in text and "HUBWORKS_" not in text
