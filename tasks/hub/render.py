"""The text of ``jupyterhub_config.py`` and of the systemd units, rendered from settings.

Pure functions of the settings (and, with the docker spawner, of the engine they choose), so an
up-to-date check can compare what is on disk with what would be written now. The images users
may pick are not in the config: the hub reads them from ``etc/images.json`` at each spawn.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.netaddr import url_host
from .containers import docker_api, podman_service_command
from .layout import PODMAN_UNIT_NAME, HubLayout
from .sections import config_line, network_sections

HEADER = ("# Written by `doit install_hub` from the [hub] settings (hubworks.toml);\n"
          "# change those and re-run rather than editing this file.\n")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def hub_search_path(hub: HubLayout) -> str:
    """PATH for the hub and what it starts: its venv first, nothing of doit's environment."""
    return f"{hub.venv_bin}:{SAFE_PATH}"


def render_config(hub: HubLayout, node: Path) -> str:
    """jupyterhub_config.py for these settings; ``node`` runs configurable-http-proxy."""
    lines = [HEADER, "c = get_config()  # noqa: F821", ""]
    lines += _network_section(hub, node)
    lines += ["", *_state_section(hub)]
    lines += ["", *_login_section(hub)]
    lines += ["", *_servers_section(hub)]
    lines += network_sections(hub)
    return "\n".join(lines) + "\n"


def _network_section(hub: HubLayout, node: Path) -> list[str]:
    s = hub.hub_settings
    if hub.uses_docker:
        lines = ["# network: users reach the proxy; the hub listens on the container bridge's "
                 "gateway (below), the proxy API on loopback"]
    else:
        lines = ["# network: users reach the proxy; hub and proxy API stay on loopback"]
    lines.append(config_line("JupyterHub.bind_url", f"{hub.scheme}://{url_host(s.ip)}:{s.port}/"))
    if not hub.uses_docker:
        lines.append(config_line("JupyterHub.hub_ip", "127.0.0.1"))
    return lines + [
        config_line("JupyterHub.hub_port", s.hub_port),
        config_line("ConfigurableHTTPProxy.api_url", f"http://127.0.0.1:{s.proxy_api_port}"),
        config_line("ConfigurableHTTPProxy.command", [str(node), str(hub.proxy_script)]),
        config_line("ConfigurableHTTPProxy.pid_file", str(hub.proxy_pid_file)),
    ]


def _state_section(hub: HubLayout) -> list[str]:
    return [
        "# state and secrets: created once by install_hub, readable by root only",
        config_line("JupyterHub.db_url", f"sqlite:///{hub.database}"),
        config_line("JupyterHub.pid_file", str(hub.pid_file)),
        config_line("JupyterHub.cookie_secret_file", str(hub.cookie_secret)),
        f"with open({str(hub.proxy_token)!r}) as token_file:",
        "    c.ConfigurableHTTPProxy.auth_token = token_file.read().strip()",
    ]


def _login_section(hub: HubLayout) -> list[str]:
    s = hub.hub_settings
    lines = [
        "# who may log in",
        config_line("JupyterHub.authenticator_class", hub.choice("authenticator")),
        # sorted lists, not sets: the text must not change between runs
        config_line("Authenticator.admin_users", sorted(set(s.admin_users))),
        config_line("Authenticator.allowed_users", sorted(set(s.allowed_users))),
    ]
    if s.allowed_groups:
        lines.append(config_line("LocalAuthenticator.allowed_groups",
                                 sorted(set(s.allowed_groups))))
    # JupyterHub >= 5 lets nobody in without an allow rule; no list here means every account
    lines.append(config_line("Authenticator.allow_all",
                             not (s.allowed_users or s.allowed_groups)))
    return lines


def _servers_section(hub: HubLayout) -> list[str]:
    lines = ["# single-user servers", config_line("Spawner.default_url", "/lab")]
    if hub.uses_docker:
        return lines + _docker_spawner(hub)
    return lines + [
        config_line("JupyterHub.spawner_class", "localprocess"),
        # absolute: the server starts as the user, whose PATH may lack the hub venv
        config_line("Spawner.cmd", [str(hub.venv_bin / "jupyterhub-singleuser")]),
        config_line("Spawner.environment", {"PATH": hub_search_path(hub)}),
    ]


def _docker_spawner(hub: HubLayout) -> list[str]:
    """DockerSpawner through hubworks' subclass (etc/hubworks_spawner.py, see payload/docker_spawner.py)."""
    url = docker_api(hub).url
    images, timeout = str(hub.images_file), hub.hub_settings.spawn_timeout
    # a registry prefix (images.push) lets another machine pull; local builds are never pulled
    pull = "ifnotpresent" if hub.settings.images.push else "never"
    return [
        "import sys",
        f"sys.path.insert(0, {str(hub.etc)!r})",
        "import hubworks_spawner  # noqa: E402",
        "c.JupyterHub.spawner_class = hubworks_spawner.HubworksSpawner",
        f"c.HubworksSpawner.images_file = {images!r}  # written by install_hub's images step",
        f"c.HubworksSpawner.spawn_timeout = {timeout!r}",
        f"c.HubworksSpawner.hub_label = {str(hub.prefix)!r}",
        f"c.DockerSpawner.client_kwargs = {{'base_url': {url!r}}}",
        "c.DockerSpawner.network_name = 'bridge'",
        "c.DockerSpawner.host_ip = '127.0.0.1'  # published ports: for the proxy only",
        f"c.DockerSpawner.pull_policy = {pull!r}",
        "c.DockerSpawner.remove = True  # a stopped server's container goes; its home volume stays",
        # repo2docker images start a plain notebook server unless told otherwise
        "c.DockerSpawner.cmd = ['jupyterhub-singleuser']",
        # the spawner itself waits spawn_timeout for the server; these only back it up
        f"c.Spawner.start_timeout = {timeout + 60!r}",
        "c.Spawner.http_timeout = 30",
        "# users' containers keep running while the hub restarts; it finds them again",
        "c.JupyterHub.cleanup_servers = False",
        "# containers reach the hub at the bridge's gateway, an address the LAN is not routed to",
        f"c.JupyterHub.hub_ip = hubworks_spawner.hub_address({url!r}, {images!r})",
        "c.JupyterHub.hub_connect_ip = c.JupyterHub.hub_ip",
    ]


_PORT_LINES = {
    "port": r"^c\.JupyterHub\.bind_url = 'https?://.*:(\d+)/'$",
    "http_port": r"'--http-port', '(\d+)'",
    "hub_port": r"^c\.JupyterHub\.hub_port = (\d+)$",
    "proxy_api_port": r"^c\.ConfigurableHTTPProxy\.api_url = 'http://.*:(\d+)'$",
}


def ports_in_config(text: str) -> dict[str, int]:
    """The ports a rendered config names (to tell the running hub's own ports from others)."""
    found = {}
    for key, pattern in _PORT_LINES.items():
        match = re.search(pattern, text, re.M)
        if match:
            found[key] = int(match.group(1))
    return found


def render_unit(hub: HubLayout) -> str:
    """The systemd unit that runs the hub as root (PAM and per-user servers need it)."""
    engine = ""
    if hub.uses_docker and docker_api(hub).managed:
        engine = f"Requires={PODMAN_UNIT_NAME}\nAfter={PODMAN_UNIT_NAME}\n"
    return f"""\
# Written by `doit install_hub` (hubworks); re-run it rather than editing this file.
[Unit]
Description=JupyterHub
After=network-online.target
Wants=network-online.target
{engine}
[Service]
User=root
WorkingDirectory={hub.var}
Environment=PATH={hub_search_path(hub)}
ExecStart={hub.jupyterhub} -f {hub.config_file}
# the hub stops the proxy and the users' servers itself; what is left is killed after it
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def render_podman_unit(hub: HubLayout) -> str:
    """The systemd unit of podman's Docker-compatible API service for the hub."""
    command = " ".join(podman_service_command(hub.podman_socket))
    return f"""\
# Written by `doit install_hub` (hubworks); re-run it rather than editing this file.
[Unit]
Description=podman's Docker-compatible API for JupyterHub's users' containers
Before=jupyterhub.service

[Service]
EnvironmentFile={hub.podman_env_file}
ExecStart={command}
# users' containers belong to their conmon processes: stopping the API must not stop them
Delegate=true
KillMode=process
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""
