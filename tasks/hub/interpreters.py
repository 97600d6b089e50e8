"""The Pythons and Node.js binaries this server has, read from disk or asked once."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HubworksError
from .versions import parse_version, show_version


@dataclass(frozen=True)
class Python:
    path: Path
    version: tuple[int, ...]
    can_make_venvs: bool

    def describe(self) -> str:
        return f"Python {show_version(self.version)} at {self.path}"


def python_on_disk(path: Path) -> Python | None:
    """Read an interpreter's version and venv support from its files, without running it.

    ``pythonX.Y`` resolves next to ``lib/pythonX.Y/os.py``; ``ensurepip`` is what Debian's
    python3-venv adds. None when the layout says nothing certain.
    """
    real = Path(os.path.realpath(path))
    match = re.fullmatch(r"python(\d)\.(\d+)", real.name)
    if not match or not real.is_file():
        return None
    stdlib = real.parent.parent / "lib" / f"python{match[1]}.{match[2]}"
    if not (stdlib / "os.py").is_file():
        return None
    return Python(Path(path), (int(match[1]), int(match[2])),
                  (stdlib / "ensurepip" / "__init__.py").is_file()
                  and (stdlib / "venv" / "__init__.py").is_file())


_PROBE = ("import sys\nprint(*sys.version_info[:3])\n"
          "try:\n import ensurepip, venv\nexcept ImportError:\n print(0)\nelse:\n print(1)\n")


def probe_python(path: Path) -> Python:
    """Run the interpreter once to learn what it is (install steps only)."""
    try:
        done = subprocess.run([str(path), "-c", _PROBE], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HubworksError(f"{path} does not run: {exc}.",
                            fix="name a working interpreter in hub.python") from None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) < 4:
        raise HubworksError(f"{path} is not a usable Python: {done.stderr.strip()[-300:]}",
                            fix="name a CPython >= 3.10 in hub.python (HUBWORKS_HUB_PYTHON)")
    return Python(Path(path), tuple(int(x) for x in lines[:3]), lines[3] == "1")


def python_candidates() -> list[Path]:
    """Interpreters to consider, in order: python3 and python3.N on PATH, then system places."""
    names = ["python3"] + [f"python3.{minor}" for minor in range(20, 9, -1)]
    folders = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    found: dict[str, Path] = {}
    for folder in folders:
        for name in names:
            path = Path(folder or ".") / name
            if path.is_file() and os.access(path, os.X_OK):
                found.setdefault(str(path), path)
    return list(found.values())





@functools.lru_cache(maxsize=None)
def _node_version(path: str, stamp: tuple) -> tuple[int, ...]:
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise HubworksError(f"{path} --version failed: {done.stderr.strip()[-300:]}",
                            fix="repair that Node.js or name another in hub.node")
    return parse_version(done.stdout)


def node_version(path: Path) -> tuple[int, ...]:
    """``node --version``, asked once per binary (it is not a Python or npm start-up)."""
    st = os.stat(path)
    return _node_version(str(path), (st.st_ino, st.st_mtime_ns, st.st_size))


def node_candidates() -> list[Path]:
    folders = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    found: dict[str, Path] = {}
    for folder in folders:
        path = Path(folder or ".") / "node"
        if path.is_file() and os.access(path, os.X_OK):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def npm_for(node: Path) -> Path | None:
    beside = Path(node).parent / "npm"
    if beside.is_file():
        return beside
    found = shutil.which("npm")
    return Path(found) if found else None
