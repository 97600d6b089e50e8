"""What hub_stop, hub_status and the install steps read about processes, on real processes:
liveness (a zombie is not alive), command lines, start times, the tree below a process,
signals and waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.hub.processes import (descendants, is_alive, process_cmdline, process_started_at,
                                 signal_all, wait_gone)

# A parent that forks a child which exits at once, never reaps it, and prints its pid:
# a zombie that belongs to another process, as a dead server under a stuck hub would be.
ZOMBIE_PARENT = ("import os, sys, time\n"
                 "child = os.fork()\n"
                 "if child == 0:\n    os._exit(0)\n"
                 "print(child, flush=True)\ntime.sleep(60)\n")
IGNORES_SIGTERM = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "print('ready', flush=True)\ntime.sleep(60)\n")


@pytest.fixture
def started():
    """Start commands; whatever still runs at the end is killed and reaped."""
    processes: list[subprocess.Popen] = []

    def start(*command: str, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True, **kwargs)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def children_of(pid: int, count: int, seconds: float = 10) -> set[int]:
    deadline = time.monotonic() + seconds
    while len(found := descendants(pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_running_process_is_alive_with_its_command_line_and_start_time(started):
    before = time.time()
    sleeper = started("sleep", "30")
    assert is_alive(sleeper.pid)
    assert process_cmdline(sleeper.pid) == ["sleep", "30"]
    assert before - 1 <= process_started_at(sleeper.pid) <= time.time() + 1


def test_an_exited_process_is_not_alive_even_before_its_parent_reads_its_status(started):
    quick = started("true")
    deadline = time.monotonic() + 10
    while is_alive(quick.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(quick.pid)  # a zombie of this test's until the wait below
    assert process_cmdline(quick.pid) == []
    quick.wait()
    assert not is_alive(quick.pid)
    assert process_cmdline(quick.pid) == [] and process_started_at(quick.pid) is None
    assert descendants(quick.pid) == set()


def test_a_zombie_of_another_process_counts_as_gone(started):
    parent = started(sys.executable, "-c", ZOMBIE_PARENT)
    zombie = int(parent.stdout.readline())
    begun = time.monotonic()
    assert wait_gone([zombie], 10) == set()
    assert time.monotonic() - begun < 2
    assert Path(f"/proc/{zombie}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not is_alive(zombie)
    assert is_alive(parent.pid)


def test_descendants_are_every_process_below_also_in_new_sessions(started):
    # a child, and a grandchild in a session of its own (as the hub starts users' servers)
    shell = started("sh", "-c", "sleep 30 & sh -c 'setsid sleep 31 & wait' & wait")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sleeps = {" ".join(process_cmdline(pid)): pid for pid in descendants(shell.pid)}
        if {"sleep 30", "sleep 31"} <= set(sleeps):
            break
        time.sleep(0.05)
    assert {"sleep 30", "sleep 31"} <= set(sleeps)
    assert os.getsid(sleeps["sleep 31"]) != os.getsid(shell.pid)
    assert shell.pid not in descendants(shell.pid)


def test_signal_all_stops_a_tree_and_wait_gone_names_what_outlives_it(started):
    shell = started("sh", "-c", "sleep 30 & sleep 31 & wait")
    tree = children_of(shell.pid, 2) | {shell.pid}
    stubborn = started(sys.executable, "-c", IGNORES_SIGTERM)
    assert stubborn.stdout.readline() == "ready\n"
    signal_all(tree | {stubborn.pid})
    assert wait_gone(tree, 10) == set()
    assert wait_gone([stubborn.pid], 0.5) == {stubborn.pid}
    signal_all([stubborn.pid], signal.SIGKILL)
    assert wait_gone([stubborn.pid], 10) == set()
    signal_all([stubborn.pid])  # gone: nothing to signal, no error


def test_pids_that_name_no_process_are_not_alive():
    for pid in (0, -1, 2 ** 22 + 1):
        assert not is_alive(pid)
        assert process_cmdline(pid) == [] and process_started_at(pid) is None
        assert descendants(pid) == set() and wait_gone([pid], 1) == set()
