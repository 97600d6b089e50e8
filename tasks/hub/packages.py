"""Installing things: the system's package manager and install commands run with a log."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from ..core.commands import log_tail, run_logged
from ..core.errors import HubworksError
from .permissions import require_root
from .versions import parse_version


def package_manager() -> str | None:
    for tool in ("apt-get", "dnf"):
        if shutil.which(tool):
            return tool
    return None


def package_candidate(name: str) -> tuple[int, ...] | None:
    """The version the package manager would install for ``name``, if it has the package."""
    # read from the tools' output: python-apt and dnf's bindings are not on PyPI
    tool = package_manager()
    if tool == "apt-get":
        done = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True)
        match = re.search(r"Candidate:\s*(?:\d+:)?(\d[^\s]*)", done.stdout)
    elif tool == "dnf":
        done = subprocess.run(["dnf", "-q", "info", name], capture_output=True, text=True)
        match = re.search(r"^Version\s*:\s*(\S+)", done.stdout, re.M)
    else:
        return None
    return parse_version(match.group(1)) if match else None


def install_packages(names: Iterable[str], log: Path) -> None:
    names = list(names)
    tool = package_manager()
    require_root(f"installing {' '.join(names)} with {tool}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if tool == "apt-get":
        run(["apt-get", "update", "-q"], log=log, env=env)
        run(["apt-get", "install", "-y", "-q", *names], log=log, env=env)
    else:
        run(["dnf", "install", "-y", "-q", *names], log=log, env=env)





def run(cmd: Sequence[str | os.PathLike], *, log: Path, cwd: Path | None = None,
        env: dict[str, str] | None = None, capture: bool = False) -> str:
    """Run an install command: what it writes readable by every user, its output added to
    ``log``, a failure an error with the log's tail. With ``capture`` its standard output is
    returned instead of logged."""
    program = Path(str(cmd[0])).name
    done = run_logged(cmd, log, cwd=cwd, env=env, append=True, capture=capture,
                      public_files=True)
    if done.returncode != 0:
        raise HubworksError(
            f"{program} {' '.join(map(str, cmd[1:3]))} ... failed "
            f"(exit {done.returncode}):\n{log_tail(log, 15)}",
            fix=f"read {log}; fix what it names and run the step again")
    return done.stdout.decode() if capture else ""
