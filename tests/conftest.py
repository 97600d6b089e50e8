"""Shared fixtures: throwaway workspaces driven by the real doit, and recipe writers.

Every test workspace is a temporary folder with recipes/, channel/ and images/, run with
``doit -f <repo>/dodo.py -d <workspace>`` in a subprocess, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DODO = REPO / "dodo.py"

pytest_plugins = ["tests.podman_fixtures"]


def pytest_configure(config):
    """Give SIGINT back its default when the suite was started with it ignored.

    A non-interactive shell starts its background jobs (``pytest &``) with SIGINT ignored,
    and every process the tests start would inherit that: the Ctrl-C tests would see doit
    go on, and a hub's servers would ignore the hub's SIGINT. A handled signal is reset to
    its default in a child, so the tests' processes start as they do from a terminal.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class DoitRun:
    returncode: int
    output: str

    @property
    def executed(self) -> list[str]:
        """Tasks whose actions ran (doit prints '.  <task>' as each starts)."""
        return re.findall(r"^\.  (\S+)", self.output, re.MULTILINE)

    @property
    def up_to_date(self) -> list[str]:
        return re.findall(r"^-- (\S+)", self.output, re.MULTILINE)


class Workspace:
    """A hubworks workspace in a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        for folder in ("recipes", "channel", "images"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HUBWORKS_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    @property
    def channel(self) -> Path:
        return self.root / "channel"

    @property
    def state(self) -> Path:
        return self.root / ".hubworks"

    def doit(self, *args: str, check: bool = True, timeout: float = 900) -> DoitRun:
        proc = subprocess.run(
            [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(self.root), *args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout)
        run = DoitRun(proc.returncode, proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}")
        return run

    def configure(self, toml: str) -> None:
        (self.root / "hubworks.toml").write_text(textwrap.dedent(toml))

    def add_recipe(self, folder: str, *, name: str | None = None, version: str = "1.0.0",
                   run: list[str] = (), host: list[str] = (), script: list[str] = (),
                   summary: str = "", fmt: str = "") -> Path:
        """A noarch: generic recipe.yaml that installs share/<name>/version.txt."""
        name = name or folder
        lines = [f"mkdir -p $PREFIX/share/{name}",
                 f"echo {name} {version} > $PREFIX/share/{name}/version.txt", *script]
        recipe = {
            "package": {"name": name, "version": version},
            "build": {"number": 0, "noarch": "generic", "script": lines},
            "requirements": {"host": list(host), "run": list(run)},
            "about": {"summary": summary or f"test package {name}", "license": "MIT"},
        }
        path = self.root / "recipes" / folder / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe, indent=1) + "\n")  # JSON is YAML, unquoted-safe
        return path

    def packages(self, subdir: str = "noarch") -> list[str]:
        folder = self.channel / subdir
        return sorted(p.name for p in folder.glob("*.conda")) if folder.is_dir() else []


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


@pytest.fixture
def example_workspace(tmp_path) -> Workspace:
    """A workspace holding a copy of the recipes this repository ships."""
    ws = Workspace(tmp_path / "ws")
    shutil.rmtree(ws.root / "recipes")
    shutil.copytree(REPO / "recipes", ws.root / "recipes")
    return ws


def free_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on (the OS just handed them out, all different)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_refuses(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``port``, False when something accepts; anything else
    (a timeout) is an error, not an answer."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def interrupted_output(doit: subprocess.Popen) -> str:
    """The output of a doit run stopped by a signal, checked to end as a user should see it:
    exit status 130 and no traceback."""
    output = doit.communicate(timeout=60)[0]
    assert doit.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    return output
