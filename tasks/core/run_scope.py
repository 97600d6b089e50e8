"""What one doit run shares, and how it ends: ``RUN``.

Resources entered once (the channel server that image builds share), the build processes
running, and the problems met that do not stop the run but fail it (an unreadable package left
out of the index). ``RUN.begin()`` and ``RUN.end()`` bracket a run: doit tells a run's start and
end, in every way a run ends (success, failure, Ctrl-C), to one object only, its reporter, so
``reporter.ProgressReporter`` calls them; what they do lives here. An atexit hook covers the
remaining exits. doit setup/teardown tasks are not used for this: under ``doit -n N`` they fire
once per worker and before or while consumers run.

Ctrl-C and SIGTERM both unwind the run as a KeyboardInterrupt, whichever thread the kernel
hands them to; a build process is stopped with its children when that happens.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import HubworksError


@dataclass
class RunEnd:
    """What closing a run found: the shared resources it stopped, the problems it met."""
    stopped: list[str] = field(default_factory=list)
    problems: list[HubworksError] = field(default_factory=list)


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
        self.begun = False

    def begin(self) -> None:
        """A run starts: from now on Ctrl-C and SIGTERM stop it at once (main thread only;
        loading the graph, `doit list`, installs nothing)."""
        self.begun = True
        _handle_stop_signals()

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

    @contextmanager
    def process(self, process: subprocess.Popen) -> Iterator[subprocess.Popen]:
        """Track a build process; stop it (and its children) if the run is interrupted."""
        with self._lock:
            self._processes.add(process)
        try:
            yield process
        except BaseException as exc:  # Ctrl-C above all: the build must not outlive doit
            if isinstance(exc, KeyboardInterrupt):
                ignore_stop_signals()  # a second Ctrl-C must not cut the stopping short
            _stop_process_group(process, self.STOP_SECONDS)
            raise
        finally:
            with self._lock:
                self._processes.discard(process)

    def end(self) -> RunEnd:
        """Stop running build processes and shared resources; say what was stopped and which
        problems the run met. Safe to call again: a second call finds nothing."""
        with self._lock:
            processes, self._processes = list(self._processes), set()
            ended = RunEnd(sorted(self._values), list(self._problems.values()))
            self._values.clear()
            self._problems.clear()
            stack, self._stack = self._stack, ExitStack()
        for process in processes:  # only after an interruption: builds end before the run
            _stop_process_group(process, self.STOP_SECONDS)
        stack.close()
        return ended


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
atexit.register(RUN.end)


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


def ignore_stop_signals() -> None:
    """While a run stops: a second Ctrl-C must not cut the stopping or the summary short."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
