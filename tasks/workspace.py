"""The workspace as doit sees it: its settings, DOIT_CONFIG, the reporter, run-wide resources.

What one doit run shares lives in ``RUN``: resources entered once (the channel server that
image builds share), the build processes running, and the problems met that do not stop the
run but fail it (an unreadable package left out of the index). The reporter closes it when
the run completes, which doit guarantees after success, after failures and on Ctrl-C; an
atexit hook and a SIGTERM handler cover the remaining exits. doit setup/teardown tasks are
not used for this: under ``doit -n N`` they fire once per worker and before or while
consumers run.

How a run ends is decided in one place, ``ProgressReporter.complete_run`` (the last thing
doit runs): it prints the summary, names what failed, what was not built and why, and the
problems met; a run with problems exits 1, an interrupted one 130 without a traceback.
"""

from __future__ import annotations

import atexit
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from doit.exceptions import InvalidDodoFile, UnmetDependency
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
    """What the tasks of one doit run share: resources entered once and closed at its end,
    the build processes running, and problems that fail the run without stopping it."""

    STOP_SECONDS = 10  # a build process told to stop gets this long before it is killed

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._values: dict[str, Any] = {}
        self._processes: set[subprocess.Popen] = set()
        self._problems: dict[str, HubworksError] = {}

    def shared(self, key: str, factory: Callable[[], AbstractContextManager]) -> Any:
        """Enter ``factory()`` the first time ``key`` is asked for; return its value."""
        with self._lock:
            if key not in self._values:
                self._values[key] = self._stack.enter_context(factory())
            return self._values[key]

    def note_problem(self, key: str, problem: HubworksError | None) -> None:
        """Record the problem ``key`` (None: it is solved); the last word on a key counts."""
        with self._lock:
            if problem is None:
                self._problems.pop(key, None)
            else:
                self._problems[key] = problem

    def problems(self) -> list[HubworksError]:
        with self._lock:
            return list(self._problems.values())

    @contextmanager
    def process(self, process: subprocess.Popen) -> Iterator[subprocess.Popen]:
        """Track a build process; stop it (and its children) if the run is interrupted."""
        with self._lock:
            self._processes.add(process)
        try:
            yield process
        except BaseException as exc:  # Ctrl-C above all: the build must not outlive doit
            if isinstance(exc, KeyboardInterrupt):
                _ignore_stop_signals()  # a second Ctrl-C must not cut the stopping short
            _stop_process_group(process, self.STOP_SECONDS)
            raise
        finally:
            with self._lock:
                self._processes.discard(process)

    def close(self) -> list[str]:
        """Stop running build processes and shared resources; return what was stopped."""
        with self._lock:
            processes, self._processes = list(self._processes), set()
            stopped = sorted(self._values)
            self._values.clear()
            self._problems.clear()
            stack, self._stack = self._stack, ExitStack()
        for process in processes:  # only after an interruption: builds end before the run
            _stop_process_group(process, self.STOP_SECONDS)
        stack.close()
        return stopped


def _stop_process_group(process: subprocess.Popen, seconds: float) -> None:
    """SIGTERM to a process started in a session of its own and to everything it started;
    SIGKILL to what is still there after ``seconds``."""
    if not _signal_group(process.pid, signal.SIGTERM):
        return
    deadline = time.monotonic() + seconds
    # The process may end before its children (repo2docker before podman): wait for all.
    while time.monotonic() < deadline:
        if process.poll() is not None and not _signal_group(process.pid, 0):
            return
        time.sleep(0.05)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


RUN = RunScope()
atexit.register(RUN.close)


def _handle_stop_signals() -> None:
    """Make SIGTERM unwind like Ctrl-C, so servers stop and files are not left half-written,
    and make both take effect at once, whichever thread the kernel hands them to.

    The kernel may deliver a signal to any thread (a doit worker, the channel server, a
    library's runtime); Python then only notes it, and the main thread, blocked in a system
    call (waiting for a build, or on doit's result queue), would not act on it until that
    call returned, minutes later for a build. A watcher thread hears of every signal through
    the wakeup fd and interrupts the main thread's call with a signal whose handler does
    nothing; the stop signal's own handler then runs there.
    """
    global _wakeup_pair
    if threading.current_thread() is not threading.main_thread() or _wakeup_pair:
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def handler(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, handler)
    reader, writer = _wakeup_pair = socket.socketpair()  # kept: closing it ends the watch
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    signal.signal(_WAKE_MAIN, lambda signum, frame: None)
    main, stops = threading.main_thread().ident, {signal.SIGINT, signal.SIGTERM}

    def watch() -> None:
        while True:
            if stops & set(reader.recv(64)):
                signal.pthread_kill(main, _WAKE_MAIN)

    threading.Thread(target=watch, name="stop-signal-watcher", daemon=True).start()


_WAKE_MAIN = signal.SIGUSR2
_wakeup_pair: tuple[socket.socket, socket.socket] | None = None


class ProgressReporter(ConsoleReporter):
    """doit's console output plus seconds per task and a summary a person can follow.

    Tasks may say who they are to a person in ``meta``: ``what`` ("recipe 'x'") names them
    when something they need failed, ``interrupted`` says what Ctrl-C leaves behind.
    """

    desc = "hubworks: timings per task and a closing summary"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._tasks: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self._counts = {"ran": 0, "up to date": 0, "failed": 0, "not built": 0}
        self._failed: list[str] = []
        self._not_built: dict[str, list[str]] = {}  # task -> the dependencies it lacked
        self._write_lock = threading.Lock()

    def write(self, text):
        with self._write_lock:
            self.outstream.write(text)
            self.outstream.flush()

    def initialize(self, tasks, selected_tasks):
        self._tasks = tasks

    def _seconds(self, task) -> str:
        start = self._started.pop(task.name, None)
        return f"{time.monotonic() - start:.1f} s" if start is not None else ""

    def execute_task(self, task):
        if task.actions:
            self._started[task.name] = time.monotonic()
            if task.name[0] != "_":
                self.write(f".  {task.title()}\n")

    def add_success(self, task):
        if task.actions and task.name[0] != "_":
            self._counts["ran"] += 1
            self.write(f"ok {task.name} ({self._seconds(task)})\n")

    def add_failure(self, task, fail):
        if isinstance(fail, UnmetDependency):
            # doit did not run it because a task it needs failed: say which, in names.
            self._not_built[task.name] = fail.message.split()
            if task.actions:  # a group is only a name for its members: nothing to say
                self._counts["not built"] += 1
                self.write(self._why_not_built(task.name) + "\n")
            return
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

    def _meta(self, name: str, key: str) -> str:
        task = self._tasks.get(name)
        return str(((task.meta if task is not None else None) or {}).get(key) or "")

    def _what(self, name: str) -> str:
        return self._meta(name, "what") or f"task '{name}'"

    def _why_not_built(self, name: str) -> str:
        return f"{self._what(name)} not built: it needs {self._lacking(name)}"

    def _lacking(self, name: str) -> str:
        """The dependencies ``name`` lacked, each with why: what failed, or what was not
        built and why, down to what failed; a failure said once."""
        deps = self._members(name)
        told = set().union(*(self._failed_under(d) for d in deps if d in self._not_built))
        reasons = []
        for dep in deps:
            if dep in self._not_built:
                reasons.append(f"{self._what(dep)}, which was not built (it needs "
                               f"{self._lacking(dep)})")
            elif dep not in told:
                reasons.append(f"{self._what(dep)}, which failed")
        return "; ".join(reasons)

    def _members(self, name: str) -> list[str]:
        """The tasks ``name`` lacked, a group replaced by its members."""
        found = []
        for dep in self._not_built.get(name, []):
            task = self._tasks.get(dep)
            grouped = dep in self._not_built and task is not None and not task.actions
            found += [m for m in self._members(dep) if m not in found] if grouped else [dep]
        return found

    def _failed_under(self, name: str) -> set[str]:
        if name not in self._not_built:
            return {name}
        return set().union(*(self._failed_under(d) for d in self._members(name)))

    def _not_built_tasks(self) -> list[str]:
        """Tasks doit did not run because one they need failed (groups left out)."""
        return [name for name in self._not_built
                if (task := self._tasks.get(name)) is not None and task.actions]

    def _tally(self) -> str:
        """"2 ran, 1 failed (build_recipes:x)": what happened to the tasks of this run."""
        names = {"failed": self._failed, "not built": self._not_built_tasks()}
        return ", ".join(f"{n} {label}" + (f" ({', '.join(names[label])})" if label in names
                                           else "")
                         for label, n in self._counts.items() if n)

    def complete_run(self):
        # doit calls this while a Ctrl-C (or SIGTERM) is unwinding the run, if one is.
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        if interrupted:
            _ignore_stop_signals()  # a second Ctrl-C must not cut the summary short
        problems = RUN.problems()
        # Stop run-wide resources before printing, so a slow summary never keeps a port open.
        stopped = RUN.close()
        super().complete_run()
        if interrupted:
            self._report_interruption(stopped)
            _end_output()
            raise SystemExit(130)  # replaces the KeyboardInterrupt: no traceback
        for name in self._not_built_tasks():
            self.write(self._why_not_built(name) + "\n")
        for problem in problems:
            self.write(f"problem: {problem}\n")
        parts = [self._tally()] if any(self._counts.values()) else []
        if problems:
            parts.append(f"{len(problems)} problem" + ("s" if len(problems) > 1 else ""))
        if parts:
            self.write("hubworks: " + ", ".join(parts) + "\n")
        if problems and not (self._failed or self._not_built):
            raise SystemExit(1)  # the tasks succeeded, the run did not: say so to callers

    def _report_interruption(self, stopped: list[str]) -> None:
        running = list(self._started)
        for name in running:
            note = self._meta(name, "interrupted")
            self.write(f"interrupted: {name}" + (f" ({note})" if note else "") + "\n")
        if not running:
            self.write("interrupted between tasks: the ones that finished are recorded\n")
        if stopped:
            self.write(f"stopped: {', '.join(key.replace('-', ' ') for key in stopped)}\n")
        tally = self._tally()
        self.write("hubworks: interrupted" + (f"; before that {tally}" if tally else "") + "\n")


def _ignore_stop_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


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
    _handle_stop_signals()
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


def build_environment(**extra: str) -> dict[str, str]:
    """The environment of a build command: this one without hubworks' own settings, so a
    channel token set as HUBWORKS_CHANNEL_TOKEN never reaches a recipe's build script."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HUBWORKS_")}
    env.update(extra)
    return env


def run_logged(command: list[str], log: Path, *, title: str, cwd: Path,
               env: dict[str, str] | None = None, hide: Sequence[str] = ()) -> int:
    """Run a build command with all its output in ``log`` (replaced), headed by what ran.

    It runs in a session of its own, so that stopping it on Ctrl-C or SIGTERM also stops
    what it started (repo2docker's podman, a recipe's build script); see RunScope.process.
    Every string in ``hide`` (a channel token) is written as ``<token>``, in the command
    line and in the output alike; the output then reaches the log through a pipe.
    """
    hidden = [text.encode() for text in hide if text]

    def cleaned(data: bytes) -> bytes:
        for text in hidden:
            data = data.replace(text, b"<token>")
        return data

    with log.open("wb") as handle:
        handle.write(cleaned(f"# {title}\n# {shlex.join(command)}\n".encode()))
        handle.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE if hidden else handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                   start_new_session=True,
                                   env=dict(env or build_environment(), PYTHONUNBUFFERED="1"))
        with RUN.process(process):
            for line in process.stdout if hidden else ():
                handle.write(cleaned(line))
                handle.flush()
            return process.wait()


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
        if not _output_ended:
            stream.write(text + "\n")
            stream.flush()


def _end_output() -> None:
    """After an interrupted run's summary, worker threads still unwinding stay silent."""
    global _output_ended
    with _print_lock:
        _output_ended = True


_print_lock = threading.Lock()
_output_ended = False
