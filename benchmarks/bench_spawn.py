"""Spawn time with the docker spawner: from a user's spawn request to their server answering.

    sudo .venv/bin/python benchmarks/bench_spawn.py [--runs 5] [--storage overlay|vfs]

Makes everything in temporary places and removes it afterwards (a few minutes: a Debian base
image with JupyterHub from mmdebstrap and PyPI, a hub from PyPI and npm): podman with runc and
its own storage (the tests' set-up: CONTAINERS_CONF and CONTAINERS_STORAGE_CONF, nothing of the
machine's podman configuration), one image FROM the base built by `doit build_images`, and a
hub installed by `doit install_hub` with spawner = docker on free ports (dummy
authenticator). Needs root, podman, runc, mmdebstrap.

Each run: POST /hub/api/users/<name>/server, then polls the hub's API until the server is ready
(the spawner has seen jupyterhub-singleuser answer, the proxy routes to it) and the user's
/user/<name>/lab answers 200; then stops it and waits until its container is gone. Prints the
median and slowest of --runs runs (target: ready within 5 s), and where the time goes, each
step timed on its own through the same API: creating, starting, running to its end and
removing a bare container of the image; importing jupyterhub.singleuser inside it; and a
Jupyter server in it (host network) from its start to its first answer.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.hub.containers import docker_client  # noqa: E402
from tasks.core.settings import SETTINGS  # noqa: E402
from tests.podman_fixtures import (make_hub_base_image, make_podman_runtime,  # noqa: E402
                                   remove_podman_runtime)

TARGET_SECONDS = 5.0
USER = "bench"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def doit(root: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"),
                           "-d", str(root), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"doit {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def xsrf(session: requests.Session) -> str:
    found = {c.path: c.value for c in session.cookies if c.name == "_xsrf"}
    return found.get("/hub/") or next(iter(found.values()))


def spawn_once(url: str, session: requests.Session) -> tuple[float, float]:
    """Seconds from the spawn request to 'ready', and to /user/<name>/lab answering 200."""
    headers = {"X-XSRFToken": xsrf(session)}
    api = f"{url}/hub/api/users/{USER}"
    started = time.perf_counter()
    response = session.post(f"{api}/server", json={"image": "lab"}, headers=headers)
    response.raise_for_status()
    while not session.get(api, headers=headers).json()["servers"].get("", {}).get("ready"):
        if time.perf_counter() - started > 120:
            raise SystemExit("the server did not become ready within 120 s")
        time.sleep(0.05)
    ready = time.perf_counter() - started
    lab = f"{url}/user/{USER}/lab"
    while True:
        page = session.get(lab)
        if page.status_code == 200 and page.url == lab:
            break
        time.sleep(0.05)
    answered = time.perf_counter() - started
    session.delete(f"{api}/server", headers=headers)
    while session.get(api, headers=headers).json()["servers"]:
        time.sleep(0.1)
    return ready, answered


def bare_container_seconds(docker_url: str, tag: str, runs: int) -> float:
    client = docker_client(docker_url)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        container = client.containers.create(tag, ["true"])
        container.start()
        container.wait(timeout=60)
        container.remove()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def spawn_phases(docker_url: str, tag: str, runs: int) -> dict[str, float]:
    """Medians of each step a spawn takes in the engine and the container."""
    client = docker_client(docker_url)
    steps: dict[str, list[float]] = {}

    def timed(name: str, call):
        started = time.perf_counter()
        result = call()
        steps.setdefault(name, []).append(time.perf_counter() - started)
        return result

    probe = ("import time; t = time.perf_counter(); import jupyterhub.singleuser; "
             "print(time.perf_counter() - t)")
    for _ in range(runs):
        container = timed("create a container", lambda: client.containers.create(tag, ["true"]))
        timed("start it", container.start)
        timed("run `true` to its end", lambda: container.wait(timeout=60))
        timed("remove it", container.remove)
        container = client.containers.create(tag, ["python", "-c", probe])
        container.start()
        container.wait(timeout=120)
        steps.setdefault("import jupyterhub.singleuser, in the container", []).append(
            float(container.logs().decode().split()[-1]))
        container.remove()
        port = free_ports(1)[0]
        container = client.containers.create(
            tag, ["jupyter", "lab", "--ip=127.0.0.1", f"--port={port}", "--no-browser",
                  "--IdentityProvider.token=", "--ServerApp.password="], network_mode="host")
        started = time.perf_counter()
        container.start()
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/api", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - started > 120:
                raise SystemExit("jupyter lab in the container did not answer within 120 s")
            time.sleep(0.02)
        steps.setdefault("jupyter lab: start to first answer", []).append(
            time.perf_counter() - started)
        container.remove(force=True)
    return {name: statistics.median(values) for name, values in steps.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--storage", choices=("overlay", "vfs"), default="overlay")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the hub's podman API socket is root's")
    scratch = Path(tempfile.mkdtemp(prefix="hubworks-bench-spawn-", dir="/tmp"))
    scratch.chmod(0o755)
    runtime = make_podman_runtime(scratch / "podman")
    if args.storage == "vfs":
        conf = Path(runtime.env["CONTAINERS_STORAGE_CONF"])
        conf.write_text(conf.read_text().replace('"overlay"', '"vfs"'))
    root, prefix = scratch / "ws", scratch / "hub"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBWORKS_")}
    env.update(runtime.env, PYTHONPATH=str(REPO))
    try:
        pins = {s.key: s.default for s in SETTINGS if s.section == "hub"}
        print("making the base image (mmdebstrap, PyPI) ...", flush=True)
        started = time.perf_counter()
        base = make_hub_base_image(runtime, "localhost/hubworks-bench/hub-base:1",
                                   pins["jupyterhub_version"], pins["jupyterlab_version"],
                                   scratch / "mmdebstrap.log")
        print(f"  {time.perf_counter() - started:.0f} s")
        (root / "images" / "lab").mkdir(parents=True)
        (root / "images" / "lab" / "Dockerfile").write_text(f"FROM {base}\n")
        port, hub_port, api_port, images_port = free_ports(4)
        (root / "hubworks.toml").write_text(
            f'[images]\nprefix = "hubworks-bench"\nengine = "podman"\nisolation = "chroot"\n'
            f'[channel]\nport = 0\n[hub]\nprefix = "{prefix}"\nport = {port}\n'
            f'hub_port = {hub_port}\nproxy_api_port = {api_port}\nimages_port = {images_port}\n'
            f'spawner = "docker"\n'
            f'authenticator = "dummy"\nallowed_users = ["{USER}"]\n')
        print("building the image and installing the hub ...", flush=True)
        started = time.perf_counter()
        doit(root, env, "build_images")
        doit(root, env, "install_hub")
        print(f"  {time.perf_counter() - started:.0f} s")
        tag = re.search(r'"tag": "([^"]+)"', (prefix / "etc" / "images.json").read_text())[1]

        url = f"http://127.0.0.1:{port}"
        session = requests.Session()
        session.get(f"{url}/hub/login")
        session.post(f"{url}/hub/login?next=", data={"username": USER, "password": secrets
                                                      .token_hex(4), "_xsrf": xsrf(session)})
        results = [spawn_once(url, session) for _ in range(args.runs)]
        ready = [r for r, _ in results]
        answered = [a for _, a in results]
        print(f"spawn to ready ({args.storage} storage, {args.runs} runs): median "
              f"{statistics.median(ready):.2f} s, slowest {max(ready):.2f} s "
              f"(target under {TARGET_SECONDS:.0f} s); each: "
              + ", ".join(f"{r:.2f}" for r in ready))
        print(f"spawn to /user/{USER}/lab answering 200: median "
              f"{statistics.median(answered):.2f} s, slowest {max(answered):.2f} s")
        docker_url = f"unix://{prefix / 'var' / 'podman.sock'}"
        bare = bare_container_seconds(docker_url, tag, args.runs)
        print(f"a bare container of the image (create, start, exit, remove) through the API: "
              f"median {bare:.2f} s")
        print("where the time goes (medians, each step on its own):")
        for step, seconds in spawn_phases(docker_url, tag, args.runs).items():
            print(f"   {step:50}{seconds:>7.2f} s")
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
        return 0 if statistics.median(ready) < TARGET_SECONDS else 1
    finally:
        subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d",
                        str(root), "hub_stop"], env=env, capture_output=True)
        remove_podman_runtime(runtime)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
