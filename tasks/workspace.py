"""The workspace as doit sees it: its settings, DOIT_CONFIG, the reporter, run-wide resources.

Run-wide resources (today: the channel server that image builds share) live in ``RUN``, an
ExitStack for one doit run. The reporter closes it when the run completes, which doit
guarantees after success, after failures and on Ctrl-C; an atexit hook and a SIGTERM
handler cover the remaining exits. doit setup/teardown tasks are not used for this: under
``doit -n N`` they fire once per worker and before or while consumers run.
"""

from __future__ import annotations

import atexit
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

from doit.exceptions import InvalidDodoFile
from doit.reporter import ConsoleReporter

from .errors import HubworksError
from .settings import SETTINGS, Settings, load_settings

_settings_cache: dict[Path, Settings] = {}


def current_settings() -> Settings:
    """Settings of the workspace doit runs in (the current directory), read once."""
    root = Path(os.getcwd()).resolve()
    if root not in _settings_cache:
        _settings_cache[root] = load_settings(root)
    return _settings_cache[root]


def forget_settings() -> None:
    """Drop cached settings (tests run several workspaces in one process)."""
    _settings_cache.clear()


class RunScope:
    """Resources shared by the tasks of one doit run, entered once and closed at its end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._values: dict[str, Any] = {}

    def shared(self, key: str, factory: Callable[[], AbstractContextManager]) -> Any:
        """Enter ``factory()`` the first time ``key`` is asked for; return its value."""
        with self._lock:
            if key not in self._values:
                self._values[key] = self._stack.enter_context(factory())
            return self._values[key]

    def close(self) -> None:
        with self._lock:
            self._values.clear()
            stack, self._stack = self._stack, ExitStack()
        stack.close()


RUN = RunScope()
atexit.register(RUN.close)


def _stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so servers stop and files are not left half-written."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def handler(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, handler)


class ProgressReporter(ConsoleReporter):
    """doit's console output plus seconds per task and a summary a person can follow."""

    desc = "hubworks: timings per task and a closing summary"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._started: dict[str, float] = {}
        self._counts = {"ran": 0, "up to date": 0, "failed": 0}
        self._failed: list[str] = []
        self._write_lock = threading.Lock()

    def write(self, text):
        with self._write_lock:
            self.outstream.write(text)
            self.outstream.flush()

    def _seconds(self, task) -> str:
        start = self._started.pop(task.name, None)
        return f"{time.monotonic() - start:.1f} s" if start is not None else ""

    def execute_task(self, task):
        self._started[task.name] = time.monotonic()
        if task.actions and task.name[0] != "_":
            self.write(f".  {task.title()}\n")

    def add_success(self, task):
        if task.actions and task.name[0] != "_":
            self._counts["ran"] += 1
            self.write(f"ok {task.name} ({self._seconds(task)})\n")

    def add_failure(self, task, fail):
        # A group task (no actions) "fails" only because a subtask did: count that once.
        if task.actions:
            self._counts["failed"] += 1
            self._failed.append(task.name)
            seconds = self._seconds(task)
            self.write(f"FAILED {task.name}" + (f" ({seconds})" if seconds else "") + "\n")
        super().add_failure(task, fail)

    def skip_uptodate(self, task):
        if task.actions and task.name[0] != "_":
            self._counts["up to date"] += 1
        super().skip_uptodate(task)

    def complete_run(self):
        # Stop run-wide resources before printing, so a slow summary never keeps a port open.
        RUN.close()
        super().complete_run()
        if any(self._counts.values()):
            parts = [f"{n} {label}" for label, n in self._counts.items() if n]
            line = "hubworks: " + ", ".join(parts)
            if self._failed:
                line += " (" + ", ".join(self._failed) + ")"
            self.write(line + "\n")


def doit_config() -> dict[str, Any]:
    """DOIT_CONFIG for dodo.py; also prepares the state directory doit's database lives in.

    Settings are first read here, while doit imports dodo.py: a bad setting becomes doit's
    InvalidDodoFile, which every doit command prints as one ERROR line (exit 3), no traceback.
    """
    try:
        settings = current_settings()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except HubworksError as exc:
        raise InvalidDodoFile(str(exc)) from None
    except OSError as exc:
        raise InvalidDodoFile(
            f"the state folder {exc.filename} cannot be created: {exc.strerror}.\n"
            f"  fix: set workspace.state_dir (HUBWORKS_WORKSPACE_STATE_DIR) to a folder you "
            f"can write") from None
    _stop_on_sigterm()
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


def show_settings() -> None:
    settings = current_settings()
    width = max(len(f"{s.section}.{s.key}") for s in SETTINGS)
    print(f"workspace root: {settings.root}")
    for s in SETTINGS:
        name = (s.section, s.key)
        value = settings.values[name]
        print(f"{s.section + '.' + s.key:<{width}}  {value!s:<30}  ({settings.sources[name]})")


def task_settings():
    """Show every setting's effective value and where it came from."""
    return {"actions": [show_settings], "uptodate": [False], "verbosity": 2}


def log_path(settings: Settings, *parts: str) -> Path:
    """A log file under the state directory, its folder created."""
    path = settings.state("logs", *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_logged(command: list[str], log: Path, *, title: str, cwd: Path,
               env: dict[str, str] | None = None, hide: Sequence[str] = ()) -> int:
    """Run a build command with all its output in ``log`` (replaced), headed by what ran.

    Every string in ``hide`` (a channel token) is written as ``<token>``, in the command
    line and in the output alike.
    """
    if any(hide):
        return _run_logged_hiding(command, log, title=title, cwd=cwd, env=env, hide=hide)
    with log.open("w") as handle:
        handle.write(f"# {title}\n# {shlex.join(command)}\n")
        handle.flush()
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=cwd,
                              env=dict(env or os.environ, PYTHONUNBUFFERED="1")).returncode


def _run_logged_hiding(command: list[str], log: Path, *, title: str, cwd: Path,
                       env: dict[str, str] | None, hide: Sequence[str]) -> int:
    """run_logged through a pipe, so that each line is cleaned before it reaches the disk."""
    hidden = [text.encode() for text in hide if text]

    def cleaned(line: bytes) -> bytes:
        for text in hidden:
            line = line.replace(text, b"<token>")
        return line

    with log.open("wb") as handle:
        handle.write(cleaned(f"# {title}\n# {shlex.join(command)}\n".encode()))
        handle.flush()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=cwd,
                              env=dict(env or os.environ, PYTHONUNBUFFERED="1")) as process:
            try:
                for line in process.stdout:
                    handle.write(cleaned(line))
                    handle.flush()
            except BaseException:  # Ctrl-C: stop the build, as subprocess.run does
                process.kill()
                raise
        return process.returncode


def log_tail(log: Path, lines: int) -> str:
    """The last lines of a log, indented to sit under an error message."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def print_line(text: str) -> None:
    """Progress output that bypasses doit's capture, safe from worker threads."""
    stream = sys.__stdout__ or sys.stdout
    with _print_lock:
        stream.write(text + "\n")
        stream.flush()


_print_lock = threading.Lock()
