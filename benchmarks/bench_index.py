"""Index speed and memory: hubworks next to rattler's index_fs and conda-index, in one run.

    .venv/bin/python benchmarks/bench_index.py [--sizes 2000 20000] [--runs 3]

Packages are real conda packages (.tar.bz2 with index.json, about.json, paths.json and one
file), written with the standard library so that 20,000 take seconds to make; 5 versions
each of N/5 names, as in a channel with history. For each size, --runs times, in turns:

- cold, as whole commands on a fresh copy of the channel (hard links of the same files):
  `doit index_channel` in a workspace without index state; rattler's own `index_fs` with
  its defaults (`python -c`, which writes repodata.json, .zst and shards like hubworks);
  the same without .zst (rattler's level-19 zstd is much of its time); `python -m
  conda_index` when conda-index is importable (it needs conda, which is not on PyPI);
- the peak memory of a cold `doit index_channel`: of the doit process (max RSS, over every
  run) and of all its processes together (reading pool, early index; sampled in a run of
  its own);
- "+1 package": one package added, then index_channel in-process (what each recipe build
  runs) and `doit index_channel` as a command; rattler's index_fs +1 for reference;
- start: `doit index_channel` with nothing new and hubworks' `doit list`, next to `doit list`
  on a dodo.py of one task in the same venv (what doit itself costs), in turns.

Subprocesses run with bytecode caching on (in a temporary cache folder), as in a venv that
has run once. Medians; ratios are of medians of the same run. The figures print last.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.channel.index import index_channel  # noqa: E402
from tasks.core.settings import load_settings  # noqa: E402


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


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a channel folder whose package files are hard links of the originals."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def tree_memory(root: int) -> int:
    """Resident bytes of process ``root`` and every process below it, now (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


class TreeSampler(threading.Thread):
    """The highest resident memory of a process tree (the doit process, its reading
    processes and the early index), sampled every 20 ms while it runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, tree_memory(self.pid))

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak / 2**20


class Commands:
    """Runs commands as a user would, timing each and noting its peak memory."""

    def __init__(self, cache: Path):
        self.env = {k: v for k, v in os.environ.items()
                    if k != "PYTHONDONTWRITEBYTECODE" and not k.startswith("HUBWORKS_")}
        self.env["PYTHONPYCACHEPREFIX"] = str(cache)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

    crashes_at_exit = 0
    cpu = 0.0  # CPU seconds (user and system, every thread) of the last command
    sample_trees = False  # sampling costs a little CPU: only for the memory run
    tree_peak = 0.0

    def run(self, command: list[str], cwd: Path | None = None, done: bytes = b""
            ) -> tuple[float, float]:
        """Wall seconds and peak resident memory (MiB) of ``command``. With ``done``, a
        command that printed it finished its work even if it then crashed on exit (rattler's
        runtime now and then does, after the index is written): counted, not fatal."""
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid) if self.sample_trees else None
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        self.cpu = usage.ru_utime + usage.ru_stime
        self.tree_peak = sampler.stop() if sampler else 0.0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 and done and done in output:
            self.crashes_at_exit += 1
        elif proc.returncode != 0:
            sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n"
                     f"{output.decode(errors='replace')}")
        return elapsed, usage.ru_maxrss / 1024

    def doit(self, workspace: Path, *args: str, dodo: Path = REPO / "dodo.py"
             ) -> tuple[float, float]:
        return self.run([sys.executable, "-m", "doit", "-f", str(dodo),
                         "-d", str(workspace), *args])

    def index_fs(self, channel: Path, zst: bool) -> tuple[float, float]:
        return self.run([sys.executable, "-c",
                         "import asyncio, sys; from rattler.index import index_fs; "
                         "asyncio.run(index_fs(sys.argv[1], write_zst=sys.argv[2] == '1')); "
                         "print('indexed', flush=True)",
                         str(channel), "1" if zst else "0"], done=b"indexed")

    def conda_index(self, channel: Path) -> tuple[float, float]:
        return self.run([sys.executable, "-m", "conda_index", str(channel)])


def conda_index_problem() -> str:
    """Why conda-index cannot run here; empty when it can."""
    if importlib.util.find_spec("conda_index") is None:
        return "conda-index is not installed"
    if importlib.util.find_spec("conda") is None:
        return "conda-index is installed but needs conda, which is not installed (not on PyPI)"
    return ""


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench(count: int, workdir: Path, runs: int, commands: Commands) -> dict[str, float]:
    source = make_channel(workdir / f"source{count}", count) / "channel"
    problem = conda_index_problem()
    times: dict[str, list[float]] = {}
    memory: list[float] = []
    rattler_memory: list[float] = []

    def hubworks(n: int) -> None:
        ws = workdir / f"ws{count}-{n}"
        linked_copy(source, ws / "channel")
        seconds, peak = commands.doit(ws, "index_channel")
        times.setdefault("hubworks cold", []).append(seconds)
        times.setdefault("hubworks cold, CPU", []).append(commands.cpu)
        memory.append(peak)

    def rattler(n: int, zst: bool) -> None:
        label = "rattler index_fs cold" + ("" if zst else ", no .zst")
        folder = linked_copy(source, workdir / f"rattler{count}-{n}-{int(zst)}")
        seconds, peak = commands.index_fs(folder, zst)
        times.setdefault(label, []).append(seconds)
        times.setdefault(label + ", CPU", []).append(commands.cpu)
        rattler_memory.append(peak)
        shutil.rmtree(folder)

    def conda_index(n: int) -> None:
        folder = linked_copy(source, workdir / f"conda-index{count}-{n}")
        times.setdefault("conda-index cold", []).append(commands.conda_index(folder)[0])
        shutil.rmtree(folder)

    contenders = [hubworks, lambda n: rattler(n, True), lambda n: rattler(n, False)]
    if not problem:
        contenders.append(conda_index)
    for n in range(runs):  # in turns, each run starting with the next one
        for step in range(len(contenders)):
            contenders[(n + step) % len(contenders)](n)
        if n < runs - 1:
            shutil.rmtree(workdir / f"ws{count}-{n}")

    # Memory, in a run of its own (sampling costs CPU): the doit process's own peak, and
    # the peak of all its processes together.
    ws = workdir / f"ws{count}-memory"
    linked_copy(source, ws / "channel")
    commands.sample_trees = True
    _, process_peak = commands.doit(ws, "index_channel")
    commands.sample_trees = False
    memory.append(process_peak)
    tree_peaks = [commands.tree_peak]
    shutil.rmtree(ws)

    # +1 package on the last workspace: in-process (what a recipe build runs), then as a
    # command; rattler's own +1 on a folder it indexed.
    ws = workdir / f"ws{count}-{runs - 1}"
    empty = workdir / "empty" / "dodo.py"
    empty.parent.mkdir(exist_ok=True)
    empty.write_text('def task_nothing():\n    return {"actions": []}\n')
    for n in range(max(runs, 5)):  # short commands: a few more turns
        for label, args, dodo in [("doit list, empty dodo.py", ["list"], empty),
                                  ("hubworks doit list", ["list"], REPO / "dodo.py"),
                                  ("hubworks nothing new, doit index_channel",
                                   ["index_channel"], REPO / "dodo.py")]:
            times.setdefault(label, []).append(commands.doit(ws, *args, dodo=dodo)[0])
            times.setdefault(label + ", CPU", []).append(commands.cpu)
    settings = load_settings(ws)
    index_channel(settings)  # imports done, caches warm, as in a doit process
    for n in range(runs):
        make_package(ws / "channel" / "noarch", f"extra{n}", "1.0.0")
        started = time.perf_counter()
        index_channel(settings)
        times.setdefault("hubworks +1, in-process", []).append(time.perf_counter() - started)
        make_package(ws / "channel" / "noarch", f"extracmd{n}", "1.0.0")
        times.setdefault("hubworks +1, doit index_channel", []).append(
            commands.doit(ws, "index_channel")[0])
        started = time.perf_counter()
        index_channel(settings)
        times.setdefault("hubworks nothing new, in-process", []).append(
            time.perf_counter() - started)
    plain = linked_copy(source, workdir / f"plain{count}")
    from rattler.index import index_fs

    asyncio.run(index_fs(plain))
    for n in range(runs):
        make_package(plain / "noarch", f"extra{n}", "1.0.0")
        started = time.perf_counter()
        asyncio.run(index_fs(plain))
        times.setdefault("rattler index_fs +1", []).append(time.perf_counter() - started)
    shutil.rmtree(plain)
    shutil.rmtree(ws)

    figures = {label: median(values) for label, values in times.items()}
    figures["hubworks cold peak memory, doit process, MiB"] = max(memory)
    figures["hubworks cold peak memory, all its processes together, MiB"] = max(tree_peaks)
    figures["rattler index_fs cold peak memory, MiB"] = max(rattler_memory)
    return figures


def report(count: int, figures: dict[str, float]) -> list[str]:
    lines = [f"{count:,} packages:"]
    for label, value in figures.items():
        unit = "" if "MiB" in label else " s"
        lines.append(f"  {label}: {value:.2f}{unit}")
    cold = figures["hubworks cold"]
    lines.append(f"  hubworks cold / rattler index_fs cold: "
                 f"{cold / figures['rattler index_fs cold']:.2f}x (goal: at most 1.0x)")
    noop = figures["hubworks nothing new, doit index_channel"]
    lines.append(f"  hubworks +1 / nothing new, as doit commands: "
                 f"{figures['hubworks +1, doit index_channel'] / noop:.2f}x (goal: within 1.3x)")
    empty = figures["doit list, empty dodo.py"]
    lines.append(f"  start: nothing new `doit index_channel` / empty `doit list`: "
                 f"{noop / empty:.2f}x; hubworks `doit list` / empty `doit list`: "
                 f"{figures['hubworks doit list'] / empty:.2f}x (goals: within 1.5x)")
    cpu = {label[:-5]: value for label, value in figures.items() if label.endswith(", CPU")}
    empty_cpu = cpu["doit list, empty dodo.py"]
    lines.append(f"  the same in CPU seconds (what a busy machine does not move as much): cold "
                 f"{cpu['hubworks cold'] / cpu['rattler index_fs cold']:.2f}x; nothing new "
                 f"{cpu['hubworks nothing new, doit index_channel'] / empty_cpu:.2f}x and "
                 f"`doit list` {cpu['hubworks doit list'] / empty_cpu:.2f}x the empty `doit list`")
    lines.append(f"  hubworks cold / rattler index_fs cold without .zst: "
                 f"{cold / figures['rattler index_fs cold, no .zst']:.2f}x")
    if "conda-index cold" in figures:
        lines.append(f"  conda-index cold / hubworks cold: "
                     f"{figures['conda-index cold'] / cold:.2f}x (goal: at least 3x)")
    else:
        lines.append(f"  conda-index: not measured ({conda_index_problem()})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    summary = [f"machine: {os.cpu_count()} cores, load average at start "
               f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.runs} runs each, medians"]
    with tempfile.TemporaryDirectory() as tmp:
        commands = Commands(Path(tmp) / "pycache")
        warm = make_channel(Path(tmp) / "warm", 10)  # bytecode compiled before any timing
        commands.doit(warm, "index_channel")
        commands.index_fs(warm / "channel", True)
        for count in args.sizes:
            figures = bench(count, Path(tmp), args.runs, commands)
            lines = report(count, figures)
            print("\n".join(lines), flush=True)
            summary += lines
        if commands.crashes_at_exit:
            summary.append(f"rattler's index_fs crashed on exit, after writing its index, in "
                           f"{commands.crashes_at_exit} of the timed commands (kept: the work "
                           f"was done)")
    print("\n=== figures ===\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
