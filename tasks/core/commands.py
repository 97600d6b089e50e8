"""Running the programs hubworks drives (rattler-build, repo2docker, pip, npm, apt): one runner,
one log style, one way to show a log's tail under an error."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

from .errors import HubworksError
from .run_scope import RUN
from .settings import Settings


def log_path(settings: Settings, *parts: str) -> Path:
    """A log file under the state directory, its folder created."""
    path = settings.state("logs", *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build_environment(**extra: str) -> dict[str, str]:
    """The environment of a command: this one without hubworks' own settings, so a channel
    token set as HUBWORKS_CHANNEL_TOKEN never reaches a recipe's build script."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HUBWORKS_")}
    env.update(extra)
    return env


def run_logged(command: Sequence[str | os.PathLike], log: Path, *, title: str = "",
               cwd: Path | None = None, env: dict[str, str] | None = None,
               hide: Sequence[str] = (), append: bool = False, capture: bool = False,
               public_files: bool = False) -> subprocess.CompletedProcess:
    """Run ``command`` with its output in ``log``, headed by ``title`` (what it is for, when
    the command line does not say) and the command line, each a "# " line.

    The log is replaced, or with ``append`` added to (an install step's log tells every
    command it ran). With ``capture`` standard output is returned in the result instead of
    logged (standard error still goes to the log). Every string in ``hide`` (a channel token)
    is written as ``<token>``, in the command line and in the output alike. ``public_files``
    runs it with umask 022: what it installs is readable by every user.

    It runs in a session of its own, so that stopping it on Ctrl-C or SIGTERM also stops what
    it started (repo2docker's podman, a recipe's build script); see RunScope.process. A program
    that cannot start at all is a HubworksError.
    """
    command = [str(part) for part in command]
    hidden = [text.encode() for text in hide if text]

    def cleaned(data: bytes) -> bytes:
        for text in hidden:
            data = data.replace(text, b"<token>")
        return data

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab" if append else "wb") as handle:
        gap = b"\n" if append and handle.tell() else b""
        header = "".join(f"# {line}\n" for line in (title, shlex.join(command)) if line)
        handle.write(gap + cleaned(header.encode()))
        handle.flush()
        try:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE if hidden or capture else handle,
                stderr=handle if capture else subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, start_new_session=True, umask=0o022 if public_files else -1,
                env=dict(env or build_environment(), PYTHONUNBUFFERED="1"))
        except OSError as exc:
            raise HubworksError(f"{command[0]} could not start: {exc.strerror}.",
                                fix=f"check that {command[0]} is installed") from None
        output = None
        with RUN.process(process):
            if capture:
                output = process.stdout.read()
            elif hidden:
                for line in process.stdout:
                    handle.write(cleaned(line))
                    handle.flush()
            return subprocess.CompletedProcess(command, process.wait(), output)


def log_tail(log: Path, lines: int) -> str:
    """The last lines of a log, indented to sit under an error message."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def failed_build_log(log: Path, lines: int) -> str:
    """What a failed build's error shows of its log: the last lines, and where the rest is."""
    return f"  last lines of its log:\n{log_tail(log, lines)}\n  full log: {log}"
