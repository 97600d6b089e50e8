"""install_hub on an installed server: what a re-run costs.

    sudo .venv/bin/python benchmarks/bench_install_hub.py [--workspace DIR] [--runs 5]

With --workspace, measures the hub of that workspace as it stands (install it first).
Without, installs a hub into a temporary prefix on free ports (a few minutes: PyPI and npm),
measures, then stops the hub and removes everything.

Prints the wall time of `doit install_hub` (median and slowest of --runs runs of the real
command in a subprocess; target under 3 s), how many steps executed (must be 0), and the
time each step's up-to-date check takes in-process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.hub.layout import HubLayout  # noqa: E402
from tasks.hub.steps import STEPS  # noqa: E402
from tasks.core.settings import load_settings  # noqa: E402

TARGET_SECONDS = 3.0


def doit(root: Path, *args: str) -> tuple[float, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBWORKS_")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"),
                           "-d", str(root), *args], env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout + done.stderr, done.returncode


def temporary_hub() -> tuple[Path, Path]:
    """A workspace and a prefix (under a folder every user can enter) on free ports."""
    root = Path(tempfile.mkdtemp(prefix="hubworks-bench-ws-"))
    outer = Path(tempfile.mkdtemp(prefix="hubworks-bench-hub-", dir="/tmp"))
    outer.chmod(0o755)
    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    port, hub_port, api_port = (s.getsockname()[1] for s in sockets)
    for s in sockets:
        s.close()
    (root / "hubworks.toml").write_text(
        f'[hub]\nprefix = "{outer / "hub"}"\nport = {port}\nhub_port = {hub_port}\n'
        f"proxy_api_port = {api_port}\n")
    return root, outer


def check_times(root: Path) -> list[tuple[str, float, bool]]:
    hub = HubLayout(load_settings(root, environ={}))
    times = []
    for step in STEPS:
        if step.wanted(hub):
            started = time.perf_counter()
            ok = step.check(hub).ok
            times.append((step.name, time.perf_counter() - started, ok))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, help="an installed workspace to measure")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    outer = None
    if args.workspace:
        root = args.workspace.resolve()
    else:
        root, outer = temporary_hub()
        print(f"installing a hub into {outer / 'hub'} (once) ...", flush=True)
        seconds, output, code = doit(root, "install_hub")
        if code != 0:
            print(output)
            return 1
        print(f"  installed in {seconds:.0f} s")
    try:
        walls, executed = [], 0
        for _ in range(args.runs):
            seconds, output, code = doit(root, "install_hub")
            if code != 0:
                print(output)
                return 1
            walls.append(seconds)
            executed = max(executed, len(re.findall(r"^\.  install_hub:", output, re.M)))
        median = statistics.median(walls)
        print(f"doit install_hub on an installed server: median {median:.2f} s, "
              f"slowest {max(walls):.2f} s over {args.runs} runs "
              f"(target under {TARGET_SECONDS:.0f} s); steps executed: {executed}")
        print("up-to-date checks in-process:")
        for name, seconds, ok in check_times(root):
            print(f"  {name:<13} {seconds * 1000:7.1f} ms  {'up to date' if ok else 'WOULD RUN'}")
        return 0 if median < TARGET_SECONDS and executed == 0 else 1
    finally:
        if outer is not None:
            doit(root, "hub_stop")
            shutil.rmtree(outer, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
