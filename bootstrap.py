#!/usr/bin/env python3
"""Prepare this machine for hubworks, then run a command in hubworks' environment.

    python3 bootstrap.py doit build_images    # the main job
    python3 bootstrap.py pytest               # the test suite
    python3 bootstrap.py sphinx-build -W --keep-going -n -b html docs docs/_build/html
                                              # the docs, as CI builds them

Standard library only, so it runs on a fresh Debian or Ubuntu machine. Each run:

1. installs the system packages the command needs and the machine lacks, with apt-get
   (as root, or through sudo); nothing is installed when everything is there;
2. creates ``.venv`` next to this file and installs hubworks into it with its test and docs
   extras (again only when pyproject.toml changed since the last install);
3. runs the command with ``.venv/bin`` first on PATH, from this folder.

Other package managers: the missing packages are named and the run goes on without them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
STAMP = VENV / ".hubworks-installed"

# (how to tell it is there, Debian package) per need.
VENV_SUPPORT = ("python3 -m venv works", "python3-venv")
CONTAINER_ENGINE = ("podman", "podman")
TEST_TOOLS = [
    CONTAINER_ENGINE,
    ("/bin/busybox", "busybox-static"),            # base images for test builds, made offline
    ("/usr/bin/docker-registry", "docker-registry"),  # a local registry for push tests
    ("/usr/bin/pypy3", "pypy3"),                   # a real Python 3.9: the "too old" case
    ("/usr/sbin/runc", "runc"),                    # runs hub tests' containers where crun cannot
    ("/usr/bin/mmdebstrap", "mmdebstrap"),         # a Debian base image with JupyterHub, offline
    ("/usr/bin/openssl", "openssl"),               # certificates for the HTTPS hub tests
    ("/usr/bin/pebble", "pebble"),                 # Let's Encrypt's test ACME server
    ("/usr/bin/chromium", "chromium"),             # a real browser on the hub's pages
    ("/usr/bin/chromedriver", "chromium-driver"),  # selenium drives it, no driver download
]
# bench_server.py: wrk makes the load; nginx, the ceiling the channel server is measured against
BENCHMARK_TOOLS = [("wrk", "wrk"), ("/usr/sbin/nginx", "nginx")]


def say(text: str) -> None:
    print(f"bootstrap: {text}", flush=True)


def have(probe: str) -> bool:
    if probe == VENV_SUPPORT[0]:
        return subprocess.run([sys.executable, "-c", "import ensurepip, venv"],
                              capture_output=True).returncode == 0
    return Path(probe).exists() if probe.startswith("/") else shutil.which(probe) is not None


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def needed_packages(for_tests: bool, for_benchmarks: bool = False,
                    for_docs: bool = False) -> list[str]:
    wanted = [VENV_SUPPORT]
    if for_tests:
        wanted += TEST_TOOLS
    if for_benchmarks:
        wanted += BENCHMARK_TOOLS
    elif not for_docs and not docker_answers():
        # the main job builds with Docker when it runs, else podman; the docs need neither
        wanted.append(CONTAINER_ENGINE)
    return [package for probe, package in wanted if not have(probe)]


def install_system_packages(packages: list[str]) -> None:
    if not packages:
        return
    if shutil.which("apt-get") is None:
        say(f"cannot install {', '.join(packages)}: no apt-get here; install them with this "
            f"system's package manager (continuing without them)")
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        sys.exit(f"bootstrap: {', '.join(packages)} must be installed and this is not root "
                 f"and has no sudo.\n  fix: as root, run: apt-get install -y "
                 f"{' '.join(packages)}")
    say(f"installing {', '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                    *packages], check=True, env=env)


def ensure_venv() -> None:
    wanted = hashlib.sha256((HERE / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == wanted:
        return
    if not (VENV / "bin" / "python").exists():
        say(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    say("installing hubworks, its test tools and its docs tools into .venv")
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "-e", f"{HERE}[test,docs]"], check=True)
    STAMP.write_text(wanted + "\n")


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    for_tests = Path(argv[0]).name in ("pytest", "py.test")
    for_benchmarks = any(Path(arg).parent.name == "benchmarks" for arg in argv[1:])
    for_docs = Path(argv[0]).name == "sphinx-build"
    install_system_packages(needed_packages(for_tests, for_benchmarks, for_docs))
    ensure_venv()
    os.chdir(HERE)
    env = dict(os.environ, VIRTUAL_ENV=str(VENV),
               PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    command = shutil.which(argv[0], path=env["PATH"]) or argv[0]
    os.execve(command, [command, *argv[1:]], env)


if __name__ == "__main__":
    main(sys.argv[1:])
