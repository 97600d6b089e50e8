"""The running hub: is it up, is it current, start it, stop it, wait for /hub/health.

Without systemd the hub runs detached in its own session (it outlives doit), logging to
``<prefix>/var/jupyterhub.log``; JupyterHub writes and removes ``var/jupyterhub.pid``. With
systemd the unit does the same job and these functions call systemctl.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request

from ..core.commands import log_path, log_tail
from ..core.errors import HubworksError
from .containers import docker_api, start_podman_service, stop_podman_service
from .layout import PODMAN_UNIT_NAME, UNIT_NAME, HubLayout
from .packages import run
from .permissions import require_root
from .processes import (descendants, is_alive, port_is_free, process_cmdline, read_pid, signal_all,
                        wait_gone)
from .render import hub_search_path, written_ports

START_SECONDS = 90
STOP_SECONDS = 60
# A running hub that does not answer at once may be restarting its proxy (after a certificate
# renewal, or a proxy that died): JupyterHub checks its proxy every few seconds and restores
# the routes. Restarting the whole hub for that would stop users' servers.
HEALTH_GRACE_SECONDS = 30
_KEPT_ENV = ("HOME", "LANG", "LC_ALL", "TZ")
NOT_RUNNING = "the hub is not running"


def running_hub_pid(hub: HubLayout) -> int | None:
    """The pid of this prefix's hub if it runs (a stale pid file or a reused pid is not)."""
    pid = read_pid(hub.pid_file)
    if pid and is_alive(pid) and str(hub.jupyterhub) in process_cmdline(pid)[:3]:
        return pid
    return None


def loopback_tls() -> ssl.SSLContext:
    """For this machine's own proxy: its certificate names the domain, not 127.0.0.1."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def answers_health(hub: HubLayout, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(hub.health_url, timeout=timeout,
                                    context=loopback_tls()) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def answers_health_within(hub: HubLayout, seconds: float = HEALTH_GRACE_SECONDS) -> bool:
    """Whether /hub/health answers 200 at some point within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        if answers_health(hub):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def _port_owners(hub: HubLayout) -> dict[str, tuple[str, int]]:
    s = hub.hub_settings
    owners = {"port": (s.ip, s.port), "hub_port": ("127.0.0.1", s.hub_port),
              "proxy_api_port": ("127.0.0.1", s.proxy_api_port)}
    if hub.redirects_http:
        owners["http_port"] = (s.ip, s.http_port)
    if hub.uses_docker:
        owners["images_port"] = ("127.0.0.1", s.images_port)  # the Images page's service
    return owners


def ensure_ports_free(hub: HubLayout, *, ours: dict[str, int] | None = None) -> None:
    """Stop with the port and the fix when another program holds a port the hub needs.

    ``ours``: ports the running hub itself holds (they free up when it restarts).
    """
    mine = set((ours or {}).values())
    for key, (host, port) in _port_owners(hub).items():
        if port in mine:
            continue
        if not port_is_free(host, port):
            raise HubworksError(
                f"port {port} (hub.{key}) is already in use by another program.",
                fix=f"stop that program (`ss -ltnp 'sport = :{port}'` names it) or set "
                    f"hub.{key} (HUBWORKS_HUB_{key.upper()}) to a free port")


def ports_of_running_hub(hub: HubLayout) -> dict[str, int]:
    if running_hub_pid(hub) is None:
        return {}
    return written_ports(hub)


def _runs_podman_service(hub: HubLayout) -> bool:
    """Whether hub_start/hub_stop manage podman's API service with the hub (no systemd)."""
    return hub.uses_docker and not hub.uses_systemd and docker_api(hub).managed


def start_hub(hub: HubLayout) -> str:
    """Start the hub unless it runs; wait until /hub/health answers. Returns what happened."""
    if hub.needs_root_to_run:
        require_root("starting the hub (PAM checks system passwords and servers start as "
                     "their users)")
    # first the engine: the hub's config asks it for the bridge's gateway at start
    started = start_podman_service(hub) if _runs_podman_service(hub) else ""
    engine = f"{started}; " if started else ""
    pid = running_hub_pid(hub)
    if pid:
        return f"{engine}the hub already runs (pid {pid}): {hub.public_url}"
    # a proxy left behind by a hub that died would hold the port
    leftover = stop_hub(hub)
    ensure_ports_free(hub)
    if hub.uses_systemd:
        _systemctl(hub, "start", UNIT_NAME)
        process = None
    else:
        process = _start_detached(hub)
    pid = _wait_healthy(hub, process)
    how = "systemd unit " + UNIT_NAME if hub.uses_systemd else f"log {hub.log_file}"
    before = "" if leftover == NOT_RUNNING else f"{leftover}; "
    return f"{engine}{before}the hub runs (pid {pid}, {how}): {hub.public_url}"


def _systemctl(hub: HubLayout, *args: str) -> None:
    run(["systemctl", *args], log=log_path(hub.settings, "hub", "systemctl.log"))


def _start_detached(hub: HubLayout) -> subprocess.Popen:
    env = {key: os.environ[key] for key in _KEPT_ENV if key in os.environ}
    env["PATH"] = hub_search_path(hub)
    env.setdefault("LANG", "C.UTF-8")
    log = os.open(hub.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(
            [str(hub.jupyterhub), "-f", str(hub.config_file)], cwd=hub.var, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            # its own session: Ctrl-C in doit and doit's exit do not reach it
            start_new_session=True, preexec_fn=lambda: os.umask(0o022))
    finally:
        os.close(log)
    # JupyterHub writes the same pid later; writing it now closes the gap for hub_stop
    hub.pid_file.write_text(f"{process.pid}\n")
    return process


def _wait_healthy(hub: HubLayout, process: subprocess.Popen | None) -> int:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise HubworksError(
                f"the hub exited at start (exit {process.returncode}); the end of "
                f"{hub.log_file}:\n{log_tail(hub.log_file, 20)}",
                fix="fix what the log names, then run doit install_hub again")
        pid = running_hub_pid(hub)
        if pid and answers_health(hub, timeout=1.0):
            return pid
        time.sleep(0.3)
    raise HubworksError(
        f"{hub.health_url} did not answer 200 within {START_SECONDS} s; the end of "
        f"{hub.log_file}:\n{log_tail(hub.log_file, 20)}",
        fix="fix what the log names, then run doit install_hub again")


def stop_hub(hub: HubLayout, *, with_engine: bool = False) -> str:
    """SIGTERM the hub (it stops its proxy and servers), wait, and report what stopped.

    With the docker spawner users' containers keep running (the hub finds them again at
    start); ``with_engine`` also stops podman's API service that runs with the hub.
    """
    said = _stop_hub_processes(hub)
    if with_engine and hub.uses_docker and docker_api(hub).managed:
        if hub.uses_systemd:
            _systemctl(hub, "stop", PODMAN_UNIT_NAME)
            said += f"; stopped {PODMAN_UNIT_NAME}"
        else:
            stopped = stop_podman_service(hub)
            said += f"; {stopped}" if stopped else ""
    return said


def _stop_hub_processes(hub: HubLayout) -> str:
    pid = running_hub_pid(hub)
    proxy = _running_proxy_pid(hub)
    if pid is None and proxy is None:
        return NOT_RUNNING
    family = (descendants(pid) if pid else set()) | ({proxy} if proxy else set())
    _signal_hub(hub, pid, family)
    _wait_stopped(hub, pid, family)
    return _stopped_says(hub, pid, proxy, family)


def _running_proxy_pid(hub: HubLayout) -> int | None:
    """The proxy of this prefix, also one left behind by a hub that died."""
    proxy = read_pid(hub.proxy_pid_file)
    return proxy if proxy and is_alive(proxy) and "proxy" in " ".join(
        process_cmdline(proxy)) else None


def _signal_hub(hub: HubLayout, pid: int | None, family: set[int]) -> None:
    """SIGTERM the hub (through systemd when it runs the hub), or its leftovers without it."""
    try:
        if hub.uses_systemd and pid:
            _systemctl(hub, "stop", UNIT_NAME)
        elif pid:
            os.kill(pid, signal.SIGTERM)
        else:
            signal_all(family)
    except PermissionError:
        require_root("stopping the hub")


def _wait_stopped(hub: HubLayout, pid: int | None, family: set[int]) -> None:
    if pid and wait_gone([pid], STOP_SECONDS):
        raise HubworksError(f"the hub (pid {pid}) did not stop within {STOP_SECONDS} s.",
                            fix=f"look at {hub.log_file}; then kill -9 {pid}")
    # the hub stops its servers and proxy itself; whatever outlived it gets SIGTERM too
    left = wait_gone(family, 15)
    if left:
        signal_all(left)
        left = wait_gone(left, 10)
    if left:
        raise HubworksError(
            f"processes of the hub are still running after SIGTERM: "
            f"{', '.join(map(str, sorted(left)))}.",
            fix=f"kill -9 {' '.join(map(str, sorted(left)))}")


def _stopped_says(hub: HubLayout, pid: int | None, proxy: int | None, family: set[int]) -> str:
    if pid is None:
        return f"stopped a proxy (pid {proxy}) left from an earlier hub"
    proxy_part = f"its proxy (pid {proxy})" if proxy else "no proxy"
    if hub.uses_docker:
        return (f"stopped the hub (pid {pid}) and {proxy_part}; users' containers keep "
                f"running and the hub finds them again when it starts")
    servers = len(family - {proxy})
    return (f"stopped the hub (pid {pid}), {proxy_part} and {servers} "
            f"process{'' if servers == 1 else 'es'} of its services and users' servers")
