"""build_recipes with real rattler-build builds, in throwaway workspaces."""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DODO


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
    before = (ws.channel / "noarch" / package_file(ws, "app")).read_bytes()

    ws.add_recipe("base", script=["echo changed > $PREFIX/share/base/extra.txt"])
    run = ws.doit("build_recipes")
    assert sorted(run.executed) == ["build_recipes:app", "build_recipes:base"]

    # Touching a file in one folder without changing it rebuilds nothing (content, not mtime).
    recipe = ws.root / "recipes" / "loner" / "recipe.yaml"
    os.utime(recipe, (time.time() + 5, time.time() + 5))
    assert ws.doit("build_recipes").executed == []
    assert (ws.channel / "noarch" / package_file(ws, "app")).read_bytes() != before


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
    output = doit.communicate(timeout=60)[0]
    assert doit.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
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


def _locked(lock_file) -> bool:
    if not lock_file.exists():
        return False
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_two_doit_processes_building_one_recipe_take_turns(workspace):
    ws = workspace
    ws.add_recipe("slow", script=["sleep 4"])
    command = [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root),
               "build_recipes"]

    def start():
        return subprocess.Popen(command, env=ws.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = start()
    lock = ws.state / "recipes" / "slow" / "lock"
    deadline = time.monotonic() + 60
    while not _locked(lock):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    second = start()
    outputs = [proc.communicate(timeout=600)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    # The second run waited instead of wiping the first one's scratch folder mid-build.
    assert "waiting for another run to finish with recipe 'slow'" in outputs[1]
    package = ws.channel / "noarch" / package_file(ws, "slow")
    assert zipfile.ZipFile(package).testzip() is None


def test_dependency_cycle_is_an_error_naming_the_recipes(workspace):
    ws = workspace
    ws.add_recipe("alpha", run=["beta"])
    ws.add_recipe("beta", run=["alpha"])
    ws.add_recipe("gamma")
    run = ws.doit("--continue", "build_recipes", check=False)
    assert run.returncode != 0
    assert "cycle: alpha -> beta -> alpha" in run.output
    package_file(ws, "gamma")


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


def test_rebuilt_package_replaces_the_old_file_atomically(workspace):
    ws = workspace
    ws.add_recipe("tool")
    ws.doit("build_recipes")
    name = package_file(ws, "tool")
    ws.add_recipe("tool", script=["echo v2 > $PREFIX/share/tool/new.txt"])
    ws.doit("build_recipes")
    assert package_file(ws, "tool") == name  # same file name: same version and build
    with zipfile.ZipFile(ws.channel / "noarch" / name) as archive:
        assert any("pkg-" in n for n in archive.namelist())
    record = json.loads((ws.state / "recipes" / "tool" / "record.json").read_text())
    assert record["packages"][0]["file"] == f"noarch/{name}"
