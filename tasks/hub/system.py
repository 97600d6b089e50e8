"""What the server offers: permissions, interpreters, Node.js, package managers, ports, processes.

Everything here that an up-to-date check calls reads files and /proc only; running a program
(an interpreter, node, a package manager) is left to the steps that install.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..commands import log_tail, run_logged
from ..errors import HubworksError

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


# ---- permissions -------------------------------------------------------------------------

def blocked_for_others(path: Path | str) -> str | None:
    """Why a user other than the owner cannot execute ``path`` (None: every user can).

    Every directory on the way, as written and as resolved, needs "x" for others, and so
    does the file itself: an interpreter under /root runs for root only.
    """
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    for place in dict.fromkeys([*reversed(given.parents), *reversed(real.parents), real]):
        try:
            mode = os.stat(place).st_mode
        except OSError as exc:
            return f"{place} cannot be read ({exc.strerror})"
        if not mode & stat.S_IXOTH:
            what = "is closed to" if stat.S_ISDIR(mode) else "is not executable by"
            return f"{place} {what} other users (mode {stat.S_IMODE(mode):o})"
    return None


def first_writable_by_others(tree: Path) -> Path | None:
    """The first file or folder under ``tree`` that group or others may write, if any."""
    try:
        if os.lstat(tree).st_mode & OTHERS_WRITE:
            return tree
    except FileNotFoundError:
        return None
    stack = [str(tree)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    continue
                if mode & OTHERS_WRITE:
                    return Path(entry.path)
                if stat.S_ISDIR(mode):
                    stack.append(entry.path)
    return None


def make_readable_not_writable(tree: Path, *, readable: bool = True) -> None:
    """Drop group/other write everywhere under ``tree``; with ``readable`` also grant a+rX."""
    for root, dirs, files in os.walk(tree):
        for name in [None, *files]:
            path = root if name is None else os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode) & ~OTHERS_WRITE
            if readable:
                mode |= 0o444
                if stat.S_ISDIR(st.st_mode) or mode & 0o100:
                    mode |= 0o111
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(path, mode)


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` with ``mode`` from the first byte on (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def user_name(uid: int | None = None) -> str:
    import pwd
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def require_root(doing: str) -> None:
    if os.geteuid() != 0:
        raise HubworksError(
            f"{doing} needs root; this runs as {user_name()}.",
            fix="run it as root, e.g. sudo doit install_hub")


# ---- versions ----------------------------------------------------------------------------

def parse_version(text: str) -> tuple[int, ...]:
    """'v20.1.0' -> (20, 1, 0); pre-release suffixes are ignored."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def show_version(version: Sequence[int]) -> str:
    return ".".join(str(part) for part in version)


def satisfies(version: Sequence[int], spec: str) -> bool:
    """Whether ``version`` meets an npm ``engines`` range (>=, >, <, <=, =, x, ||)."""
    for alternative in spec.split("||"):
        words = re.findall(r"(>=|<=|>|<|=|\^|~)?\s*v?([\dx*]+(?:\.[\dx*]+)*)", alternative)
        if words and all(_meets(version, op, bound) for op, bound in words):
            return True
    return not spec.strip() or spec.strip() == "*"


def _meets(version: Sequence[int], op: str, bound: str) -> bool:
    parts = [p for p in bound.split(".") if p not in ("x", "*")]
    want = tuple(int(p) for p in parts)
    have = tuple(version[: len(want)]) if op in ("", "=", "^", "~") else tuple(version)
    if op == "^":
        return tuple(version) >= want and version[0] == want[0]
    if op == "~":
        return tuple(version) >= want and tuple(version[:2]) == want[:2]
    return {">=": have >= want, ">": have > want, "<=": have <= want, "<": have < want,
            "=": have == want, "": have == want}[op]


# ---- Python ------------------------------------------------------------------------------

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


# ---- Node.js -----------------------------------------------------------------------------

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


# ---- package managers --------------------------------------------------------------------

def package_manager() -> str | None:
    for tool in ("apt-get", "dnf"):
        if shutil.which(tool):
            return tool
    return None


def package_candidate(name: str) -> tuple[int, ...] | None:
    """The version the package manager would install for ``name``, if it has the package."""
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


# ---- running programs --------------------------------------------------------------------

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


# ---- ports -------------------------------------------------------------------------------

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


# ---- processes ---------------------------------------------------------------------------

def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def process_started_at(pid: int) -> float | None:
    """Wall-clock start of ``pid`` from /proc (field 22, ticks since boot)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in open("/proc/stat")
                    if line.startswith("btime"))
    except (OSError, IndexError, StopIteration):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (servers run in their own sessions but stay its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def signal_all(pids: Iterable[int], signum: int = signal.SIGTERM) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_gone(pids: Iterable[int], seconds: float) -> set[int]:
    """Wait until the processes exit; the ones still alive after ``seconds``."""
    alive = set(pids)
    deadline = time.monotonic() + seconds
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if is_alive(pid)}
        if alive:
            time.sleep(0.1)
    return {pid for pid in alive if is_alive(pid)}
