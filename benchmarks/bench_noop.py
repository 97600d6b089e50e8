"""No-op and serving overhead: what an unchanged workspace costs.

    .venv/bin/python benchmarks/bench_noop.py [--runs 5]

Makes a workspace of 20 recipes (noarch, with internal dependencies) and 5 Dockerfile images
(built with podman on a base image made from busybox-static, so no registry is needed),
builds everything once, then prints:

- wall time of `doit build_recipes index_channel` with nothing changed (target under 0.25 s);
- wall time of `doit build_images` with nothing changed (target under 0.5 s);
- the serving overhead around a build: channel server start and stop, in ms.

Each doit figure is the median of --runs runs of the real command in a subprocess, with
bytecode caching on (in a temporary cache folder), as in a venv that has run once; the
figures without it (PYTHONDONTWRITEBYTECODE=1, every module compiled on each run) follow.
Needs podman and /bin/busybox (Debian's podman and busybox-static).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.channel.server import served_channel  # noqa: E402
from tests.podman_fixtures import busybox_rootfs  # noqa: E402

BASE = "localhost/hubworks-bench/busybox:latest"


def make_workspace(root: Path) -> None:
    for i in range(20):
        folder = root / "recipes" / f"pkg{i:02d}"
        folder.mkdir(parents=True)
        run = [f"pkg{i - 1:02d}"] if i % 4 else []  # chains of four
        folder.joinpath("recipe.yaml").write_text(json.dumps({
            "package": {"name": f"pkg{i:02d}", "version": "1.0.0"},
            "build": {"noarch": "generic", "script": [f"mkdir -p $PREFIX/share/pkg{i:02d}"]},
            "requirements": {"run": run},
        }))
    for i in range(5):
        folder = root / "images" / f"image{i}"
        folder.mkdir(parents=True)
        folder.joinpath("Dockerfile").write_text(
            f"FROM {BASE}\nARG CHANNEL_URL\n"
            f"RUN wget -q -O /tmp/repodata.json \"${{CHANNEL_URL}}noarch/repodata.json\"\n"
            f"# uses pkg{i * 4 + 3:02d}\n")
    (root / "hubworks.toml").write_text('[channel]\nport = 0\n[images]\nprefix = "bench"\n')


def doit(root: Path, *args: str, env: dict | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"),
                           "-d", str(root), *args], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return elapsed


def median_of(runs: int, action) -> float:
    return statistics.median(action() for _ in range(runs))


def serving_overhead(channel: Path, runs: int) -> tuple[float, float]:
    starts, stops = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        with served_channel(channel, port=0, access_log=None):
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        starts.append((t1 - t0) * 1000)
        stops.append((t2 - t1) * 1000)
    return statistics.median(starts), statistics.median(stops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        store = Path(tmp) / "podman"
        store.mkdir()
        (store / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{store}/run"\ngraphroot = "{store}/graph"\n')
        os.environ.update(CONTAINERS_STORAGE_CONF=str(store / "storage.conf"),
                          BUILDAH_ISOLATION="chroot")
        subprocess.run(["podman", "import", "-", BASE], input=busybox_rootfs(),
                       capture_output=True, check=True)
        make_workspace(root)
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        uncached = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        first = doit(root, "build_images", env=cached)
        lines = [f"machine: {os.cpu_count()} cores, load average at start "
                 f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.runs}",
                 f"first build of 20 recipes and 5 images: {first:.1f} s"]
        print(lines[-1], flush=True)
        for label, env in (("", cached), (", no bytecode cache", uncached)):
            recipes = median_of(args.runs, lambda: doit(
                root, "build_recipes", "index_channel", env=env))
            lines.append(f"no-op doit build_recipes index_channel (20 recipes){label}: "
                         f"{recipes:.2f} s (target < 0.25 s)")
            print(lines[-1], flush=True)
            images = median_of(args.runs, lambda: doit(root, "build_images", env=env))
            lines.append(f"no-op doit build_images (5 images, 20 recipes){label}: "
                         f"{images:.2f} s (target < 0.5 s)")
            print(lines[-1], flush=True)
        start, stop = serving_overhead(root / "channel", 20)
        lines.append(f"serving overhead: server start {start:.1f} ms, stop {stop:.1f} ms "
                     f"(median of 20)")
        print("\n=== figures ===\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
