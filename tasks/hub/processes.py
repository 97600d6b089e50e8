"""Processes and ports: what runs, since when, what is below it (psutil), what is free.

psutil is imported inside each function: the hub's tasks import this module while doit loads
its graph, and only an action asks about processes.
"""

from __future__ import annotations

import errno
import signal
import socket
import time
from pathlib import Path
from typing import Iterable


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (TIME_WAIT leftovers do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _process(pid: int):
    """psutil's handle of ``pid`` if it runs, else None (0 and below name no one process)."""
    import psutil

    try:
        return psutil.Process(pid) if pid > 0 else None
    except psutil.NoSuchProcess:
        return None


def _processes(pids: Iterable[int]) -> list:
    return [process for process in map(_process, pids) if process]


def _running(process) -> bool:
    """Still running: a zombie has exited and only waits for its parent to read its status."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_cmdline(pid: int) -> list[str]:
    import psutil

    process = _process(pid)
    try:
        return process.cmdline() if process else []
    except psutil.Error:
        return []


def is_alive(pid: int) -> bool:
    process = _process(pid)
    return bool(process) and _running(process)


def process_started_at(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), None if it does not run."""
    import psutil

    process = _process(pid)
    try:
        return process.create_time() if process else None
    except psutil.Error:
        return None


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (servers run in their own sessions but stay its children)."""
    import psutil

    process = _process(pid)
    try:
        return {child.pid for child in process.children(recursive=True)} if process else set()
    except psutil.NoSuchProcess:
        return set()


def signal_all(pids: Iterable[int], signum: int = signal.SIGTERM) -> None:
    import psutil

    for process in _processes(pids):
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            # callers answer os.kill's PermissionError with "needs root"
            raise PermissionError(errno.EPERM, f"not allowed to signal pid {process.pid}") \
                from None


def wait_gone(pids: Iterable[int], seconds: float) -> set[int]:
    """Wait until the processes exit; the ones still alive after ``seconds``."""
    import psutil

    alive = _processes(pids)
    deadline = time.monotonic() + seconds
    while True:
        alive = [process for process in alive if _running(process)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return {process.pid for process in alive}
        # reaps those that are this process's children; zombies of others are dropped above
        _, alive = psutil.wait_procs(alive, timeout=min(0.1, left))
