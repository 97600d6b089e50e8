"""The channel server against `python -m http.server` and nginx, same files, same run.

    python benchmarks/bench_server.py [--seconds 5] [--connections 64] [--rounds 3]

Serves one synthetic channel with each server (each in its own process) and prints
requests/s, bytes and the ratios ours / http.server (the floor: what users ran before) and
ours / nginx (the ceiling: Debian's nginx with 2 worker processes and sendfile, the
`nginx` package; skipped with a note when it is not installed) for:

1. repodata.json of 20,000 packages (a client's first fetch);
2. a conditional re-fetch of it (a client's second run): requests/s of the conditional
   request each server understands, and the bytes a real rattler client receives on a
   repeat fetch a minute later (through a counting relay), with sharded repodata
   (rattler's default) and with sharding off; a repeat fetch that fails says so;
3. package downloads over concurrent keep-alive connections: 500 small files of 2-10 KB
   (the typical noarch package) and 200 files of 1 MiB;
4. tail latency: p99 of small downloads with 256 connections, and the errors;
5. an idle flood: 3,000 connections opened and left idle, then the slowest of five normal
   requests (each on a new connection) while they are open, and again right after they
   all close at once.

The channel is real: 20,000 tiny .tar.bz2 packages indexed by rattler (repodata.json, .zst,
sharded repodata), which takes about half a minute to make.

The load generator is `wrk` (Debian package `wrk`) when it is on PATH, else threads with
http.client keep-alive; the output says which. Each round runs every load, the
servers taking turns; the table shows each figure's median over the rounds and the most
errors of any round. The figures come last. It prints
figures; it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = 20_000
PACKAGES = 200
PACKAGE_SIZE = 1 << 20
SMALL_PACKAGES = 500
SMALL_SIZES = (2 << 10, 10 << 10)
FLOOD = 3000
SERVERS = ("hubworks", "http.server", "nginx")
NGINX = "/usr/sbin/nginx"
NGINX_CONF = """
worker_processes 2;
user root;
daemon off;
pid %(scratch)s/nginx.pid;
error_log %(scratch)s/nginx-error.log;
events { worker_connections 8192; }
http {
    access_log %(scratch)s/nginx-access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 30s;
    types { application/json json; application/zstd zst; text/html html; }
    default_type application/octet-stream;
    client_body_temp_path %(scratch)s/nginx-body;
    proxy_temp_path %(scratch)s/nginx-proxy;
    fastcgi_temp_path %(scratch)s/nginx-fastcgi;
    uwsgi_temp_path %(scratch)s/nginx-uwsgi;
    scgi_temp_path %(scratch)s/nginx-scgi;
    server { listen 127.0.0.1:%(port)d backlog=1024; root %(channel)s; }
}
"""


# The channel --------------------------------------------------------------------------

def make_channel(root: Path, entries: int) -> None:
    """``entries`` packages indexed by rattler, then unindexed download files: PACKAGES of
    1 MiB and SMALL_PACKAGES of 2-10 KB."""
    from rattler.index import index_fs

    rng = random.Random(42)
    noarch = root / "noarch"
    noarch.mkdir(parents=True)
    for i in range(entries):
        name, version = f"pkg-{i // 10:04d}", f"1.{i % 10}.0"
        index = json.dumps({
            "name": name, "version": version, "build": "py_0", "build_number": 0,
            "depends": [f"pkg-{rng.randrange(entries // 10):04d} >=1.0", "python >=3.10"],
            "license": "BSD-3-Clause", "noarch": "python", "subdir": "noarch",
            "timestamp": 1_700_000_000_000 + i}).encode()
        # .tar.bz2 needs only the standard library; rattler indexes it like a .conda
        package = io.BytesIO()
        with tarfile.open(fileobj=package, mode="w:bz2", compresslevel=1) as tar:
            member = tarfile.TarInfo("info/index.json")
            member.size, member.mtime = len(index), 1_700_000_000
            tar.addfile(member, io.BytesIO(index))
        (noarch / f"{name}-{version}-py_0.tar.bz2").write_bytes(package.getvalue())
    asyncio.run(index_fs(root))
    for i in range(PACKAGES):
        (noarch / f"file-{i:04d}-1.0-0.conda").write_bytes(os.urandom(PACKAGE_SIZE))
    for i in range(SMALL_PACKAGES):
        size = rng.randrange(*SMALL_SIZES)
        (noarch / f"small-{i:04d}-1.0-0.conda").write_bytes(os.urandom(size))


# The servers, each in its own process -------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_ours(channel: str, port: str, log: str) -> None:
    """Entry point of the child process that runs our server."""
    sys.path.insert(0, str(ROOT))
    from tasks.channel.server import served_channel

    with served_channel(Path(channel), port=int(port), access_log=Path(log)):
        threading.Event().wait()


@contextmanager
def running(name: str, channel: Path, scratch: Path):
    port = free_port()
    if name == "hubworks":
        command = [sys.executable, __file__, "--serve", str(channel), str(port),
                   str(scratch / "access.log")]
    elif name == "nginx":  # every server writes an access log line per request
        conf = scratch / "nginx.conf"
        conf.write_text(NGINX_CONF % {"scratch": scratch, "port": port, "channel": channel})
        command = [NGINX, "-c", str(conf), "-e", str(scratch / "nginx-error.log")]
    else:
        command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                   "--directory", str(channel)]
    # http.server logs every request to stderr; ours to a file: both pay for a log line.
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise SystemExit(f"{name} did not start on port {port}")
                time.sleep(0.05)
        yield port
    finally:
        child.terminate()
        child.wait(10)


# Load generators ----------------------------------------------------------------------

WRK_SCRIPT = """
paths = {%(paths)s}
headers = {%(headers)s}
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1], headers)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%f %%d %%f\\n", summary.requests, summary.bytes,
    summary.duration / 1e6, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(99) / 1e3))
end
"""


def load_wrk(port: int, paths: list[str], headers: dict[str, str], seconds: float,
             connections: int, scratch: Path) -> dict:
    script = scratch / "bench.lua"
    script.write_text(WRK_SCRIPT % {
        "paths": ", ".join(json.dumps(p) for p in paths),
        "headers": ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()),
    })
    run = subprocess.run(
        ["wrk", "-t", str(min(connections, os.cpu_count() or 1)), "-c", str(connections),
         "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"wrk failed: {run.stderr or run.stdout}")
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT"))
    requests, received, duration, errors, p99 = line.split()[1:]
    return {"requests": int(requests), "bytes": int(received), "seconds": float(duration),
            "errors": int(errors), "p99_ms": float(p99)}


def load_threads(port: int, paths: list[str], headers: dict[str, str], seconds: float,
                 connections: int, scratch: Path) -> dict:
    totals = {"requests": 0, "bytes": 0, "errors": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(offset: int) -> None:
        done = received = errors = 0
        took = []
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            try:
                started = time.monotonic()
                connection.request("GET", paths[(offset + done) % len(paths)], headers=headers)
                answer = connection.getresponse()
                received += len(answer.read())
                took.append(time.monotonic() - started)
                done += 1
                if answer.will_close:  # HTTP/1.0 servers close after each answer
                    connection.close()
            except (OSError, http.client.HTTPException):
                errors += 1
                connection.close()
        with lock:
            totals["requests"] += done
            totals["bytes"] += received
            totals["errors"] += errors
            latencies.extend(took)

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    return {**totals, "seconds": time.monotonic() - started, "p99_ms": p99}


# An idle flood: many connections that send nothing, and one normal client --------------

def raise_open_file_limit() -> int:
    """The soft limit on open files, raised to the hard one: the flood needs thousands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def slowest_request(port: int, path: str, tries: int = 5, timeout: float = 30) -> float:
    """Seconds the slowest of ``tries`` requests took, each on a new connection, as a
    client arriving during the flood would; inf when one failed or took over ``timeout``."""
    slowest = 0.0
    for _ in range(tries):
        started = time.monotonic()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            connection.request("GET", path)
            answer = connection.getresponse()
            answer.read()
            connection.close()
            if answer.status != 200:
                return float("inf")
        except (OSError, http.client.HTTPException):
            return float("inf")
        slowest = max(slowest, time.monotonic() - started)
    return slowest


def idle_flood(port: int, path: str, count: int, budget: float = 20) -> dict:
    """Open ``count`` idle connections (for at most ``budget`` seconds), time normal
    requests while they are open, close them all at once, time requests again."""
    flood: list[socket.socket] = []
    started = time.monotonic()
    try:
        while len(flood) < count and time.monotonic() - started < budget:
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:  # a full accept queue: the client retries later
                continue
        opened, open_seconds = len(flood), time.monotonic() - started
        during = slowest_request(port, path)
    finally:
        for sock in flood:
            sock.close()
    after = slowest_request(port, path)
    return {"opened": opened, "open_seconds": open_seconds, "during": during, "after": after}


# A real client's repeat fetch, through a relay that counts what the server sends ------

class CountingRelay:
    """A TCP relay to the server on ``port`` that counts the bytes flowing to the client."""

    def __init__(self, port: int):
        self.upstream, self.received = port, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self.pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, True), daemon=True).start()

    def pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
                if counted:
                    with self.lock:
                        self.received += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


class RattlerClient:
    """rattler's repodata gateway reaching one server through a CountingRelay.

    Each fetch makes a new Gateway, so only the on-disk cache carries over, as between two
    runs of a conda client.
    """

    def __init__(self, port: int, cache: Path, sharded: bool):
        self.relay, self.cache, self.sharded = CountingRelay(port), cache, sharded

    def fetch(self) -> dict:
        from rattler import Gateway, SourceConfig

        async def query() -> None:
            gateway = Gateway(cache_dir=self.cache,
                              default_config=SourceConfig(sharded_enabled=self.sharded))
            await gateway.query([f"http://127.0.0.1:{self.relay.port}/"], ["noarch"],
                                ["pkg-0001"], recursive=False)

        before, outcome = self.relay.received, "ok"
        try:
            asyncio.run(query())
        except Exception as exc:  # rattler rejects a 304 without validators (issue 2719)
            outcome = "failed: " + str(exc).splitlines()[0].split(" when ")[0]
        return {"bytes": self.relay.received - before, "outcome": outcome}


# The run ------------------------------------------------------------------------------

def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mib(count: float) -> str:
    return f"{count / (1 << 20):,.1f} MiB"


LOADS = [  # key, title, connections (None: --connections), paths
    ("repodata", "1. repodata.json", None, "repodata"),
    ("conditional", "2. conditional re-fetch (304)", None, "repodata"),
    ("small", "3. small package downloads (2-10 KB)", None, "small"),
    ("packages", "3. 1 MiB package downloads", None, "packages"),
    ("tail", "4. small downloads, 256 connections", 256, "small"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="duration of each load run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each load, median shown")
    parser.add_argument("--entries", type=int, default=ENTRIES, help="packages in repodata")
    parser.add_argument("--flood", type=int, default=FLOOD, help="idle connections")
    parser.add_argument("--repeat-after", type=float, default=65,
                        help="seconds between a client's first and repeat fetch (rattler "
                             "trusts a shard index without Cache-Control for about a minute)")
    parser.add_argument("--loads", default=",".join(key for key, *_ in LOADS),
                        help="which loads to run (comma-separated keys)")
    parser.add_argument("--no-client", action="store_true",
                        help="skip the rattler client's repeat fetch (it waits --repeat-after)")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_ours(*args.serve)
        return

    use_wrk = shutil.which("wrk") is not None
    servers = SERVERS
    if not os.access(NGINX, os.X_OK):
        servers = SERVERS[:2]
        print(f"nginx is not installed ({NGINX}; Debian package nginx): no ceiling measured")
    load = load_wrk if use_wrk else load_threads
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"open files {raise_open_file_limit()}")
    generator = ("wrk (bytes count headers)" if use_wrk else
                 "Python threads + http.client keep-alive (bytes count bodies only)")
    print(f"load generator: {generator}, {args.connections} connections, "
          f"{args.seconds:g} s per run, {args.rounds} round(s)")

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        scratch = Path(tmp)
        channel = scratch / "channel"
        started = time.monotonic()
        make_channel(channel, args.entries)
        sizes = {name: mib((channel / "noarch" / name).stat().st_size) for name in
                 ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst")}
        print(f"channel ({time.monotonic() - started:.0f} s to make): {args.entries:,} packages;"
              f" " + ", ".join(f"{name} {size}" for name, size in sizes.items())
              + f"; {PACKAGES} download files of {mib(PACKAGE_SIZE)}, {SMALL_PACKAGES} of "
              f"{SMALL_SIZES[0] >> 10}-{SMALL_SIZES[1] >> 10} KB\n")
        paths = {"repodata": ["/noarch/repodata.json"],
                 "packages": [f"/noarch/file-{i:04d}-1.0-0.conda" for i in range(PACKAGES)],
                 "small": [f"/noarch/small-{i:04d}-1.0-0.conda" for i in range(SMALL_PACKAGES)]}
        with ExitStack() as stack:
            ports = {name: stack.enter_context(running(name, channel, scratch))
                     for name in servers}
            clients = {(name, sharded): RattlerClient(port, scratch / f"{name}-{sharded}", sharded)
                       for name, port in ports.items() for sharded in (True, False)}
            first = {} if args.no_client else {key: client.fetch()
                                                for key, client in clients.items()}
            first_fetched = time.monotonic()
            runs: dict[tuple[str, str], list[dict]] = {}
            wanted = args.loads.split(",")
            print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            # Each round runs every load, so loads compared with each other (a 304 against
            # a small download) see the same spells of the machine's other work.
            for _ in range(args.rounds):
                for key, title, connections, kind in LOADS:
                    if key not in wanted:
                        continue
                    for name, port in ports.items():  # the servers take turns
                        headers = conditional_headers(port) if key == "conditional" else {}
                        result = load(port, paths[kind], headers, args.seconds,
                                      connections or args.connections, scratch)
                        runs.setdefault((name, key), []).append(result)
                        print(f"  {title}, {name}: {rate(result):,.0f} req/s, "
                              f"p99 {result['p99_ms']:,.1f} ms, {result['errors']} errors",
                              flush=True)
            loads = {name: {key: median_run(runs[name, key]) for key, *_ in LOADS
                            if key in wanted} for name in servers}
            floods = {} if not args.flood else {
                name: idle_flood(port, paths["small"][0], args.flood)
                      for name, port in ports.items()}
            # A client's next run comes after its cache's heuristic freshness has run out.
            if first:
                time.sleep(max(0.0, first_fetched + args.repeat_after - time.monotonic()))
            repeat = {key: client.fetch() for key, client in clients.items()} if first else {}
        print()
        report(loads, floods, first, repeat, args.repeat_after)


def rate(result: dict) -> float:
    return result["requests"] / result["seconds"]


def median_run(results: list[dict]) -> dict:
    """Each figure's median over the rounds (the lower middle one of an even count): the
    machine's other load moves single runs, the tail latency most."""
    def middle(values: list[float]) -> float:
        return sorted(values)[(len(values) - 1) // 2]

    per_second = middle([rate(result) for result in results])
    return {"requests": per_second, "seconds": 1.0,
            "bytes": middle([r["bytes"] / r["seconds"] for r in results]),
            "errors": max(result["errors"] for result in results),
            "p99_ms": middle([result["p99_ms"] for result in results])}


def conditional_headers(port: int) -> dict[str, str]:
    """What a client sends back: the ETag where it got one, else the date."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("HEAD", "/noarch/repodata.json")
    validators = connection.getresponse().headers
    connection.close()
    if validators["ETag"]:
        return {"If-None-Match": validators["ETag"]}
    return {"If-Modified-Since": validators["Last-Modified"]}


def seconds(value: float) -> str:
    return "no answer" if value == float("inf") else f"{value:.3f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(loads: dict, floods: dict, first: dict, repeat: dict, repeat_after: float) -> None:
    names = list(loads)
    ceiling = "nginx" in names
    head = "".join(f"{name:>20}" for name in names)
    print(f"{'':38}{head}{'/ http.server':>15}" + (f"{'/ nginx':>10}" if ceiling else ""))

    def row(title: str, values: list[str], ratios: str = "") -> None:
        print(f"{title:38}" + "".join(f"{value:>20}" for value in values) + ratios)

    for key, title, connections, _ in LOADS:
        if key not in loads[names[0]]:
            continue
        runs = [loads[name][key] for name in names]
        rates = [rate(run) for run in runs]
        row(title, [f"{r:,.0f} req/s" for r in rates],
            f"{ratio(rates[0], rates[1]):>15}" + (f"{ratio(rates[0], rates[2]):>10}"
                                                  if ceiling else ""))
        received = [run["bytes"] / run["seconds"] for run in runs]
        row("   received per second", [mib(b) + "/s" for b in received],
            f"{ratio(received[0], received[1]):>15}" + (f"{ratio(received[0], received[2]):>10}"
                                                        if ceiling else ""))
        row("   bytes per answer", [f"{run['bytes'] / max(run['requests'], 1):,.0f}"
                                    for run in runs])
        row("   p99 latency", [f"{run['p99_ms']:,.1f} ms" for run in runs])
        if any(run["errors"] for run in runs) or key == "tail":
            row("   errors (most in a round)", [str(run["errors"]) for run in runs])
    goals(loads)
    if floods:
        row("5. idle flood: opened", [
            f"{floods[n]['opened']:,} in {floods[n]['open_seconds']:.1f} s" for n in names])
        row("   slowest request, flood open", [seconds(floods[n]["during"]) for n in names])
        row("   slowest request, after all closed", [seconds(floods[n]["after"]) for n in names])
    for sharded, title in [(True, "sharded repodata (default)"), (False, "repodata.json.zst")]:
        if not first:
            break
        print(f"2. rattler client, {title}; repeat {repeat_after:g} s after the first fetch")
        pairs = [(first[name, sharded], repeat[name, sharded]) for name in names]
        row("   first fetch, bytes received", [f"{f['bytes']:,}" for f, _ in pairs])
        row("   repeat fetch, bytes received", [f"{r['bytes']:,}" for _, r in pairs])
        row("   repeat fetch outcome", [r["outcome"][:19] for _, r in pairs])
        # A failed repeat leaves a fetch without cache (the first fetch's bytes) as the way on.
        working = [f["bytes"] if r["outcome"] != "ok" else r["bytes"] for f, r in pairs]
        row("   bytes of a working repeat", [f"{w:,}" for w in working],
            f"{working[1] / max(working[0], 1):>9,.0f}x fewer")


def goals(loads: dict) -> None:
    """Each serving goal of the channel server, met or not, from the medians above."""
    names = list(loads)
    got = {name: {key: rate(run) for key, run in loads[name].items()} for name in names}
    ours, floor = got["hubworks"], got["http.server"]
    ceiling = got.get("nginx")
    checks = []
    if "small" in ours:
        checks.append(("small downloads >= 5x http.server", ours["small"] / floor["small"], 5))
        if ceiling:
            checks.append(("small downloads >= 0.25x nginx", ours["small"] / ceiling["small"],
                           0.25))
    if "conditional" in ours:
        checks.append(("304 re-fetch >= 4x http.server",
                       ours["conditional"] / floor["conditional"], 4))
        if "small" in ours:
            checks.append(("304 re-fetch >= small downloads (req/s)",
                           ours["conditional"] / ours["small"], 1))
    if "packages" in ours and ceiling:
        checks.append(("1 MiB downloads >= 0.8x nginx", ours["packages"] / ceiling["packages"],
                       0.8))
    print("goals:")
    for title, value, wanted in checks:
        print(f"   {title:46}{value:>8.2f}x  {'met' if value >= wanted else 'NOT met'}")
    if "tail" in loads["hubworks"]:
        tail = loads["hubworks"]["tail"]
        met = tail["p99_ms"] < 100 and not tail["errors"]
        print(f"   {'p99 at 256 connections < 100 ms, no errors':46}{tail['p99_ms']:>6.1f} ms"
              f"  {tail['errors']} errors  {'met' if met else 'NOT met'}")
    print(f"   load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

if __name__ == "__main__":
    main()
