"""The workspace as doit sees it: its settings, read once, and DOIT_CONFIG.

Task creators read ``current_settings()`` once and pass the settings to their actions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from doit.exceptions import InvalidDodoFile

from .errors import HubworksError
from .reporter import ProgressReporter
from .run_scope import RUN
from .settings import SETTINGS, Settings, load_settings

_settings_cache: dict[Path, Settings] = {}


def current_settings() -> Settings:
    """Settings of the workspace doit runs in (the current directory), read once."""
    root = Path(os.getcwd()).resolve()
    if root not in _settings_cache:
        _settings_cache[root] = load_settings(root)
    return _settings_cache[root]


def doit_config() -> dict[str, Any]:
    """DOIT_CONFIG for dodo.py; also makes the state folder doit's database lives in.

    doit opens that database for every command, `doit list` included (its cmd_base), before
    any task runs: the folder is the one thing loading the graph makes. Settings are first
    read here, while doit imports dodo.py: a bad setting becomes doit's InvalidDodoFile, which
    every doit command prints as one ERROR line (exit 3), no traceback.
    """
    try:
        settings = current_settings()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except HubworksError as exc:
        raise InvalidDodoFile(str(exc)) from None
    except OSError as exc:
        raise InvalidDodoFile(str(HubworksError(
            f"the state folder {exc.filename} cannot be created: {exc.strerror}.",
            fix="set workspace.state_dir (HUBWORKS_WORKSPACE_STATE_DIR) to a folder you "
                "can write"))) from None
    return {
        "default_tasks": ["build_images"],
        # sqlite3 tolerates a second doit process; the default dbm file does not.
        "backend": "sqlite3",
        "dep_file": str(settings.state("doit.sqlite3")),
        # Threads share one process, so image builds under `doit -n N` share one server.
        "par_type": "thread",
        "verbosity": 2,
        "reporter": ProgressReporter,
    }


LOADING_INTERRUPTED = "doit: interrupted while loading the tasks; nothing ran."


def quiet_ctrl_c_while_loading() -> None:
    """Ctrl-C before the run begins (doit importing dodo.py, opening its database, calling
    the task creators) ends with one line instead of doit's traceback. An exception hook
    rather than a signal handler: loading changes no signal handling (``RUN.begin`` does),
    and Python still ends the process by SIGINT, so a shell sees status 130."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt) and not RUN.begun:
            print(LOADING_INTERRUPTED, file=sys.stderr, flush=True)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook


def show_settings(settings: Settings) -> None:
    width = max(len(f"{s.section}.{s.key}") for s in SETTINGS)
    print(f"workspace root: {settings.root}")
    for s in SETTINGS:
        name = (s.section, s.key)
        value = settings.values[name]
        print(f"{s.section + '.' + s.key:<{width}}  {value!s:<30}  ({settings.sources[name]})")


def task_settings():
    """Show every setting's effective value and where it came from."""
    return {"actions": [(show_settings, [current_settings()])], "uptodate": [False],
            "verbosity": 2}
