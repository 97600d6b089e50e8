"""Index speed: cold and "+1 package" for synthetic channels of 2,000 and 20,000 packages.

    .venv/bin/python benchmarks/bench_index.py [--sizes 2000 20000]

Packages are real conda packages (.tar.bz2 with index.json, about.json, paths.json and one
file), written with the standard library so that 20,000 take seconds to make; 5 versions
each of N/5 names, as in a channel with history. Prints, per size: hubworks' index_channel
(validation of every new file, staging, atomic publication, index.html) cold and after
adding one package, next to rattler's own index_fs on a plain copy (cold and +1) for
reference. Target: +1 package at 20,000 under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.channel_index import index_channel  # noqa: E402
from tasks.settings import load_settings  # noqa: E402


def make_package(folder: Path, name: str, version: str) -> None:
    def add(tar, path, data: bytes):
        info = tarfile.TarInfo(path)
        info.size, info.mtime = len(data), 1_700_000_000
        tar.addfile(info, io.BytesIO(data))

    payload = f"{name} {version}\n".encode()
    index = {"name": name, "version": version, "build": "0", "build_number": 0,
             "depends": [], "license": "MIT", "noarch": "generic", "subdir": "noarch",
             "timestamp": 1_700_000_000_000}
    paths = {"paths": [{"_path": f"share/{name}/version.txt", "path_type": "hardlink",
                        "size_in_bytes": len(payload)}], "paths_version": 1}
    target = folder / f"{name}-{version}-0.tar.bz2"
    with tarfile.open(target, "w:bz2") as tar:
        add(tar, "info/index.json", json.dumps(index).encode())
        add(tar, "info/about.json", json.dumps({"summary": f"synthetic {name}"}).encode())
        add(tar, "info/paths.json", json.dumps(paths).encode())
        add(tar, f"share/{name}/version.txt", payload)


def make_channel(root: Path, count: int) -> Path:
    noarch = root / "channel" / "noarch"
    noarch.mkdir(parents=True)
    for i in range(count):
        make_package(noarch, f"pkg{i // 5:05d}", f"1.{i % 5}.0")
    return root


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench(count: int, workdir: Path) -> dict[str, float]:
    root = make_channel(workdir / f"ws{count}", count)
    settings = load_settings(root)
    figures = {"hubworks cold": timed(lambda: index_channel(settings))}
    make_package(root / "channel" / "noarch", "extra", "1.0.0")
    figures["hubworks +1"] = timed(lambda: index_channel(settings))
    figures["hubworks no change"] = timed(lambda: index_channel(settings))

    from rattler.index import index_fs

    plain = workdir / f"plain{count}"
    shutil.copytree(root / "channel", plain, ignore=shutil.ignore_patterns(
        "repodata*", "shards", "index.html"))
    (plain / "noarch" / "extra-1.0.0-0.tar.bz2").unlink()
    figures["rattler index_fs cold"] = timed(lambda: asyncio.run(index_fs(plain)))
    make_package(plain / "noarch", "extra", "1.0.0")
    figures["rattler index_fs +1"] = timed(lambda: asyncio.run(index_fs(plain)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.sizes:
            figures = bench(count, Path(tmp))
            print(f"{count:>6} packages: " + "; ".join(
                f"{label} {seconds:.2f} s" for label, seconds in figures.items()), flush=True)


if __name__ == "__main__":
    main()
