"""The Docker API the hub's DockerSpawner talks to, and podman's API service that provides it.

``docker_api(hub)`` says where users' containers run (``hub.spawner = "docker"``):

- ``hub.docker_url`` when set: an existing Docker API endpoint, used as it is;
- Docker, when ``images.engine`` chooses it: its socket (``DOCKER_HOST``, else
  ``unix:///var/run/docker.sock``);
- podman otherwise: ``podman system service`` on ``<prefix>/var/podman.sock``, root-only like
  the rest of ``var/``. install_hub runs it: a systemd unit where systemd runs, else a
  background process that ``hub_start``/``hub_stop`` manage together with the hub.

podman reads its configuration files from ``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF`` and
``CONTAINERS_REGISTRIES_CONF`` when they are set. The service gets the values install_hub ran
with (recorded in ``etc/podman-service.env``), so it sees the images that build_images made
under the same variables, and a later ``doit hub_start`` needs none of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.commands import log_tail
from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_bytes
from ..images.engines import select_engine
from .layout import HubLayout
from .processes import is_alive, process_cmdline, read_pid, wait_gone

PODMAN_VARIABLES = ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF")
DOCKER_SOCKET = "unix:///var/run/docker.sock"
API_VERSION = "1.41"  # Docker 20.10 and podman 4 both speak it
PING_SECONDS = 5
SERVICE_START_SECONDS = 30
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_HEADER = ("# Written by `doit install_hub`: podman's configuration for its API service,\n"
              "# taken from the environment install_hub ran in.\n")


@dataclass(frozen=True)
class DockerAPI:
    url: str  # what DockerSpawner and the image checks connect to
    engine: str  # "docker", "podman", or "" for an endpoint named by hub.docker_url
    managed: bool  # install_hub runs it (podman's API service)
    origin: str  # why this endpoint, for messages


def docker_api(hub: HubLayout) -> DockerAPI:
    """The Docker API endpoint users' containers run through."""
    if hub.hub_settings.docker_url:
        return DockerAPI(hub.hub_settings.docker_url, "", False, "hub.docker_url")
    choice = hub.settings.images.engine
    if choice in ("docker", "podman"):
        name, reason = choice, f"images.engine is {choice}"
    else:  # where build_images put the images: the same probes decide
        try:
            engine = select_engine(choice)
        except HubworksError as exc:
            raise HubworksError(f"hub.spawner is docker, but {exc.message[0].lower()}"
                                f"{exc.message[1:]}", fix=exc.fix) from None
        name, reason = engine.name, engine.reason
    if name == "docker":
        return DockerAPI(os.environ.get("DOCKER_HOST") or DOCKER_SOCKET, "docker", False,
                         f"Docker's socket; {reason}")
    return DockerAPI(f"unix://{hub.podman_socket}", "podman", True,
                     f"podman's API service, run by install_hub; {reason}")


def docker_client(url: str, timeout: float = 60):
    """A docker-py client for ``url`` (imported here: most doit runs never need it)."""
    import docker

    return docker.DockerClient(base_url=url, version=API_VERSION, timeout=timeout)


def api_problem(url: str) -> str:
    """Why the Docker API at ``url`` does not answer a ping ('' when it does)."""
    try:
        docker_client(url, timeout=PING_SECONDS).ping()
    except Exception as exc:  # docker-py raises requests' and its own errors alike
        return describe_engine_error(exc)
    return ""


def describe_engine_error(exc: Exception) -> str:
    """One line a person can act on, for an error that talking to an engine raised."""
    text = " ".join(str(exc).split())
    for needle, says in (("No such file", "the socket does not exist"),
                         ("Connection refused", "it refused the connection"),
                         ("Permission denied", "permission denied (the socket is root's)"),
                         ("timed out", f"it did not answer within {PING_SECONDS} s")):
        if needle in text:
            return says
    return text[:300] or type(exc).__name__


# ---- podman's API service ----------------------------------------------------------------

def podman_environment() -> dict[str, str]:
    """podman's configuration variables in this process's environment."""
    return {name: os.environ[name] for name in PODMAN_VARIABLES if os.environ.get(name)}


def render_podman_env(env: dict[str, str]) -> str:
    return ENV_HEADER + "".join(f"{name}={value}\n" for name, value in sorted(env.items()))


def recorded_podman_env(hub: HubLayout) -> dict[str, str] | None:
    """What install_hub recorded for the service; None before it did."""
    try:
        text = hub.podman_env_file.read_text()
    except OSError:
        return None
    pairs = (line.split("=", 1) for line in text.splitlines()
             if "=" in line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def write_podman_env(hub: HubLayout, env: dict[str, str]) -> None:
    atomic_write_bytes(hub.podman_env_file, render_podman_env(env).encode(), 0o644)


def podman_binary() -> str:
    found = shutil.which("podman") or shutil.which("podman", path=SERVICE_PATH)
    if not found:
        raise HubworksError("hub.spawner is docker with podman, but podman is not installed.",
                            fix="install podman (apt-get install podman), or set "
                                "hub.docker_url to a Docker API that runs containers")
    return found


def podman_service_command(socket: Path) -> list[str]:
    # --time=0: the service never exits on its own; the hub may be idle for days
    return [podman_binary(), "system", "service", "--time=0", f"unix://{socket}"]


def start_podman_process(socket: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """podman's API service, detached (its own session outlives doit), answering on return."""
    socket.unlink(missing_ok=True)  # left behind by a service that was killed
    full_env = {"PATH": SERVICE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), **env}
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(podman_service_command(socket), env=full_env,
                                   stdin=subprocess.DEVNULL, stdout=handle, stderr=handle,
                                   start_new_session=True)
    finally:
        os.close(handle)
    url = f"unix://{socket}"
    deadline = time.monotonic() + SERVICE_START_SECONDS
    problem = "it did not start"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HubworksError(
                f"podman's API service exited at start (exit {process.returncode}); the end "
                f"of {log}:\n{log_tail(log, 15)}",
                fix="fix what the log names (`podman info` shows podman's own view), then "
                    "run doit install_hub again")
        if socket.exists():
            problem = api_problem(url)
            if not problem:
                return process
        time.sleep(0.1)
    process.terminate()
    raise HubworksError(f"podman's API service did not answer at {url} within "
                        f"{SERVICE_START_SECONDS} s ({problem}); the end of {log}:\n"
                        f"{log_tail(log, 15)}", fix="fix what the log names, then run doit "
                                                "install_hub again")


def running_podman_pid(hub: HubLayout) -> int | None:
    """The pid of this prefix's background podman service, if it runs."""
    pid = read_pid(hub.podman_pid_file)
    if pid and is_alive(pid) and f"unix://{hub.podman_socket}" in process_cmdline(pid):
        return pid
    return None


def start_podman_service(hub: HubLayout) -> str:
    """Start the background service unless it runs and answers; say what it did ('' if nothing)."""
    url = f"unix://{hub.podman_socket}"
    pid = running_podman_pid(hub)
    if pid and not api_problem(url):
        return ""
    if pid:
        stop_podman_service(hub)
    process = start_podman_process(hub.podman_socket, recorded_podman_env(hub) or {},
                                   hub.podman_log_file)
    hub.podman_pid_file.write_text(f"{process.pid}\n")
    return f"started podman's API service (pid {process.pid}) at {url}"


def stop_podman_service(hub: HubLayout) -> str:
    """SIGTERM the background service; users' containers keep running (conmon holds them)."""
    pid = running_podman_pid(hub)
    if pid is None:
        return ""
    os.kill(pid, signal.SIGTERM)
    if wait_gone([pid], 15):
        os.kill(pid, signal.SIGKILL)
        wait_gone([pid], 5)
    hub.podman_pid_file.unlink(missing_ok=True)
    hub.podman_socket.unlink(missing_ok=True)
    return f"stopped podman's API service (pid {pid})"
