"""doit's console output for hubworks: seconds per task, and a closing summary a person can follow.

How a run ends is said here, in ``ProgressReporter.complete_run`` (the last thing doit runs):
the summary names what failed, what was not built and why, and the problems met; a run with
problems exits 1, an interrupted one 130 without a traceback. doit tells its reporter, and
nothing else, when a run starts and ends, so the reporter also brackets the run's shared
resources (``run_scope.RUN``); it prints, RUN stops.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from .run_scope import RUN, ignore_stop_signals


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
        RUN.begin()

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
            ignore_stop_signals()
        # Stop run-wide resources before printing, so a slow summary never keeps a port open.
        ended = RUN.end()
        problems = ended.problems
        super().complete_run()
        if interrupted:
            for problem in problems:  # met before the interruption: still there to fix
                self.write(f"problem: {problem}\n")
            self._report_interruption(ended.stopped)
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
