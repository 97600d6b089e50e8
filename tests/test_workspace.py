"""Loading the graph: what a user sees when it cannot start or is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import DODO


def test_an_uncreatable_state_folder_is_one_error_naming_it_and_the_fix(workspace):
    (workspace.root / "afile").write_text("not a folder\n")
    workspace.env["HUBWORKS_WORKSPACE_STATE_DIR"] = "afile/state"
    run = workspace.doit("list", check=False)
    assert run.returncode == 3
    assert "Traceback" not in run.output
    error, fix = [line for line in run.output.splitlines() if line.strip()]
    assert error == (f"ERROR: the state folder {workspace.root / 'afile' / 'state'} cannot be "
                     f"created: Not a directory."), run.output
    assert fix.strip().startswith("fix: set workspace.state_dir (HUBWORKS_WORKSPACE_STATE_DIR)")


def test_ctrl_c_while_the_tasks_load_prints_one_line_and_no_traceback(workspace):
    # Enough recipes that reading them (the first time, nothing cached) takes a while.
    for number in range(40):
        workspace.add_recipe(f"tool{number}")
    doit = subprocess.Popen(
        [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(workspace.root), "list"],
        env=workspace.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # doit_config() makes the state folder as dodo.py finishes importing: the task
        # creators, which read the recipes, run next.
        deadline = time.monotonic() + 60
        while not workspace.state.is_dir() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert workspace.state.is_dir(), "doit never loaded dodo.py"
        os.kill(doit.pid, signal.SIGINT)
        output, _ = doit.communicate(timeout=60)
    finally:
        doit.kill()
    # Python ends an interrupted process by SIGINT itself: a shell shows status 130
    assert doit.returncode == -signal.SIGINT, f"not interrupted ({doit.returncode}):\n{output}"
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.strip() == "doit: interrupted while loading the tasks; nothing ran."
