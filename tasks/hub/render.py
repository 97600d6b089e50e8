"""The hub's configuration as data, and the text of the systemd units, rendered from settings.

The configuration is two files in ``etc/``: ``hubworks_config.json``, the settings as data
(sections of traitlet values, services, roles; it names the secret files rather than holding
secrets), and ``jupyterhub_config.py``, the same on every hub (``payload/jupyterhub_config.py``),
which applies that data to JupyterHub's config and loads ``jupyterhub_config.d`` last.

Pure functions of the settings (and, with the docker spawner, of the engine they choose), so an
up-to-date check can compare what is on disk with what would be written now. The images users
may pick are not in the config: the hub reads them from ``etc/images.json`` at each spawn.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from ..core.netaddr import url_host
from .containers import docker_api, podman_service_command
from .layout import PODMAN_UNIT_NAME, HubLayout
from .sections import Section, network_sections, section

PAYLOAD = Path(__file__).parent / "payload"
FIXED_CONFIG = PAYLOAD / "jupyterhub_config.py"
SPAWNER_SOURCE = PAYLOAD / "docker_spawner.py"
WRITTEN_BY = ("Written by `doit install_hub` from the [hub] settings (hubworks.toml); change "
              "those and re-run rather than editing this file. jupyterhub_config.py beside it "
              "applies these sections in order, then jupyterhub_config.d.")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def hub_search_path(hub: HubLayout) -> str:
    """PATH for the hub and what it starts: its venv first, nothing of doit's environment."""
    return f"{hub.venv_bin}:{SAFE_PATH}"


def config_sections(hub: HubLayout, node: Path) -> list[Section]:
    """The hub's configuration for these settings; ``node`` runs configurable-http-proxy."""
    return [network_section(hub, node), state_section(hub), login_section(hub),
            servers_section(hub), *network_sections(hub)]


def render_config_data(hub: HubLayout, node: Path) -> str:
    """hubworks_config.json: the sections in order (a later value wins), name and purpose
    first in each, as a person reads them."""
    data = {"written_by": WRITTEN_BY, "sections": config_sections(hub, node)}
    return json.dumps(data, indent=1) + "\n"


def config_files(hub: HubLayout, node: Path) -> dict[Path, str]:
    """What the config step writes: the data, the fixed config that applies it, and with the
    docker spawner hubworks' spawner module, which the config names."""
    # the data first: a hub started between two writes finds what the new config reads
    files = {hub.config_data_file: render_config_data(hub, node),
             hub.config_file: FIXED_CONFIG.read_text()}
    if hub.uses_docker:
        files[hub.spawner_module] = SPAWNER_SOURCE.read_text()
    return files


def network_section(hub: HubLayout, node: Path) -> Section:
    s = hub.hub_settings
    values = {"JupyterHub.bind_url": f"{hub.scheme}://{url_host(s.ip)}:{s.port}/"}
    if not hub.uses_docker:
        values["JupyterHub.hub_ip"] = "127.0.0.1"
    values.update({
        "JupyterHub.hub_port": s.hub_port,
        "ConfigurableHTTPProxy.api_url": f"http://127.0.0.1:{s.proxy_api_port}",
        "ConfigurableHTTPProxy.command": [str(node), str(hub.proxy_script)],
        "ConfigurableHTTPProxy.pid_file": str(hub.proxy_pid_file),
    })
    hub_listens = ("the hub on the container bridge's gateway (servers section), the proxy "
                   "API on loopback" if hub.uses_docker else "the hub and the proxy API on "
                   "loopback")
    return section("network", f"users reach the proxy; {hub_listens}", set=values)


def state_section(hub: HubLayout) -> Section:
    return section(
        "state", "state and secrets: created once by install_hub, readable by root only",
        set={"JupyterHub.db_url": f"sqlite:///{hub.database}",
             "JupyterHub.pid_file": str(hub.pid_file),
             "JupyterHub.cookie_secret_file": str(hub.cookie_secret)},
        set_from_files={"ConfigurableHTTPProxy.auth_token": str(hub.proxy_token)})


def login_section(hub: HubLayout) -> Section:
    s = hub.hub_settings
    values = {
        "JupyterHub.authenticator_class": hub.choice("authenticator"),
        # sorted lists, not sets: the file must not change between runs
        "Authenticator.admin_users": sorted(set(s.admin_users)),
        "Authenticator.allowed_users": sorted(set(s.allowed_users)),
    }
    if s.allowed_groups:
        values["LocalAuthenticator.allowed_groups"] = sorted(set(s.allowed_groups))
    # JupyterHub >= 5 lets nobody in without an allow rule; no list here means every account
    values["Authenticator.allow_all"] = not (s.allowed_users or s.allowed_groups)
    return section("login", "who may log in", set=values)


def servers_section(hub: HubLayout) -> Section:
    if hub.uses_docker:
        return _docker_servers(hub)
    return section("servers", "single-user servers: processes running as their users", set={
        "Spawner.default_url": "/lab",
        "JupyterHub.spawner_class": "localprocess",
        # absolute: the server starts as the user, whose PATH may lack the hub venv
        "Spawner.cmd": [str(hub.venv_bin / "jupyterhub-singleuser")],
    }, environment={"PATH": hub_search_path(hub)})


def _docker_servers(hub: HubLayout) -> Section:
    """DockerSpawner through hubworks' subclass (etc/hubworks_spawner.py, see
    payload/docker_spawner.py)."""
    url = docker_api(hub).url
    images, timeout = str(hub.images_file), hub.hub_settings.spawn_timeout
    # a registry prefix (images.push) lets another machine pull; local builds are never pulled
    pull = "ifnotpresent" if hub.settings.images.push else "never"
    return section(
        "servers", "single-user servers: containers of the images install_hub offers "
                   "(etc/images.json), through hubworks' DockerSpawner in etc/",
        import_path=[str(hub.etc)],
        set={
            "Spawner.default_url": "/lab",
            "JupyterHub.spawner_class": "hubworks_spawner.HubworksSpawner",
            "HubworksSpawner.images_file": images,  # written by install_hub's images step
            "HubworksSpawner.spawn_timeout": timeout,
            "HubworksSpawner.hub_label": str(hub.prefix),
            "DockerSpawner.client_kwargs": {"base_url": url},
            "DockerSpawner.network_name": "bridge",
            "DockerSpawner.host_ip": "127.0.0.1",  # published ports: for the proxy only
            "DockerSpawner.pull_policy": pull,
            # a stopped server's container goes; its home volume stays
            "DockerSpawner.remove": True,
            # repo2docker images start a plain notebook server unless told otherwise
            "DockerSpawner.cmd": ["jupyterhub-singleuser"],
            # the spawner itself waits spawn_timeout for the server; these only back it up
            "Spawner.start_timeout": timeout + 60,
            "Spawner.http_timeout": 30,
            # users' containers keep running while the hub restarts; it finds them again
            "JupyterHub.cleanup_servers": False,
        },
        # containers reach the hub at the bridge's gateway, an address the LAN is not routed to
        hub_ip_from_engine={"docker_url": url, "images_file": images})


def configured_values(data: dict) -> dict:
    """The ``set`` values of written config data, a later section's winning."""
    values: dict = {}
    for part in data.get("sections", []):
        values.update(part.get("set", {}))
    return values


def configured_services(data: dict) -> list[dict]:
    return [service for part in data.get("sections", []) for service in part.get("services", [])]


def ports_in_config(data: dict) -> dict[str, int]:
    """The ports written config data names (to tell the running hub's own ports from others)."""
    values, found = configured_values(data), {}
    for key, name in (("port", "JupyterHub.bind_url"),
                      ("proxy_api_port", "ConfigurableHTTPProxy.api_url")):
        if values.get(name):
            found[key] = urlsplit(values[name]).port
    if values.get("JupyterHub.hub_port"):
        found["hub_port"] = values["JupyterHub.hub_port"]
    for service in configured_services(data):
        command = service.get("command", [])
        if service.get("name") == "hubworks-http" and "--http-port" in command:
            found["http_port"] = int(command[command.index("--http-port") + 1])
        if service.get("name") == "images" and service.get("url"):
            found["images_port"] = urlsplit(service["url"]).port
    return {key: port for key, port in found.items() if port}


# a hub installed before its config became data wrote these lines into jupyterhub_config.py
_OLD_CONFIG_PORTS = {
    "port": r"^c\.JupyterHub\.bind_url = 'https?://.*:(\d+)/'$",
    "http_port": r"'--http-port', '(\d+)'",
    "hub_port": r"^c\.JupyterHub\.hub_port = (\d+)$",
    "proxy_api_port": r"^c\.ConfigurableHTTPProxy\.api_url = 'http://.*:(\d+)'$",
}


def ports_in_old_config(text: str) -> dict[str, int]:
    """The ports a jupyterhub_config.py of an older hubworks names, which held them as code."""
    found = {}
    for key, pattern in _OLD_CONFIG_PORTS.items():
        match = re.search(pattern, text, re.M)
        if match:
            found[key] = int(match.group(1))
    return found


def written_config(hub: HubLayout) -> dict:
    """The config data install_hub last wrote ({} when there is none or it is unreadable)."""
    try:
        return json.loads(hub.config_data_file.read_text())
    except (OSError, ValueError):
        return {}


def written_ports(hub: HubLayout) -> dict[str, int]:
    """The ports the config on disk names: a running hub's own, to tell them from others'."""
    data = written_config(hub)
    if data:
        return ports_in_config(data)
    try:
        return ports_in_old_config(hub.config_file.read_text())
    except OSError:
        return {}


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
