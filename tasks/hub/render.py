"""The text of ``jupyterhub_config.py`` and of the systemd unit, rendered from settings.

Pure functions of the settings (and of the tags build_images recorded), so an up-to-date check
can compare what is on disk with what would be written now.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..images import built_image_tags
from .layout import HubLayout

HEADER = ("# Written by `doit install_hub` from the [hub] settings (hubworks.toml);\n"
          "# change those and re-run rather than editing this file.\n")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def hub_search_path(hub: HubLayout) -> str:
    """PATH for the hub and what it starts: its venv first, nothing of doit's environment."""
    return f"{hub.venv_bin}:{SAFE_PATH}"


def render_config(hub: HubLayout, node: Path) -> str:
    """jupyterhub_config.py for these settings; ``node`` runs configurable-http-proxy."""
    s = hub.hub
    lines = [HEADER, "c = get_config()  # noqa: F821", ""]

    def set_(name: str, value) -> None:
        lines.append(f"c.{name} = {value!r}")

    lines.append("# network: users reach the proxy; hub and proxy API stay on loopback")
    set_("JupyterHub.bind_url", f"http://{_host(s.ip)}:{s.port}/")
    docker = hub.choice("spawner") == "docker"
    # containers reach the hub from outside loopback; local servers do not need to
    set_("JupyterHub.hub_ip", "0.0.0.0" if docker else "127.0.0.1")
    set_("JupyterHub.hub_port", s.hub_port)
    set_("ConfigurableHTTPProxy.api_url", f"http://127.0.0.1:{s.proxy_api_port}")
    set_("ConfigurableHTTPProxy.command", [str(node), str(hub.proxy_script)])
    set_("ConfigurableHTTPProxy.pid_file", str(hub.proxy_pid_file))
    lines += ["", "# state and secrets: created once by install_hub, readable by root only"]
    set_("JupyterHub.db_url", f"sqlite:///{hub.database}")
    set_("JupyterHub.pid_file", str(hub.pid_file))
    set_("JupyterHub.cookie_secret_file", str(hub.cookie_secret))
    lines.append(f"with open({str(hub.proxy_token)!r}) as token_file:")
    lines.append("    c.ConfigurableHTTPProxy.auth_token = token_file.read().strip()")

    lines += ["", "# who may log in"]
    set_("JupyterHub.authenticator_class", hub.choice("authenticator"))
    # sorted lists, not sets: the text must not change between runs
    set_("Authenticator.admin_users", sorted(set(s.admin_users)))
    set_("Authenticator.allowed_users", sorted(set(s.allowed_users)))
    if s.allowed_groups:
        set_("LocalAuthenticator.allowed_groups", sorted(set(s.allowed_groups)))
    # JupyterHub >= 5 lets nobody in without an allow rule; no list here means every account
    set_("Authenticator.allow_all", not (s.allowed_users or s.allowed_groups))

    lines += ["", "# single-user servers"]
    set_("Spawner.default_url", "/lab")
    if docker:
        lines += _docker_spawner(hub)
    else:
        set_("JupyterHub.spawner_class", "localprocess")
        # absolute: the server starts as the user, whose PATH may lack the hub venv
        set_("Spawner.cmd", [str(hub.venv_bin / "jupyterhub-singleuser")])
        set_("Spawner.environment", {"PATH": hub_search_path(hub)})
    return "\n".join(lines) + "\n"


def _docker_spawner(hub: HubLayout) -> list[str]:
    tags = built_image_tags(hub.settings)
    images = {tag: tag for tag in tags}
    user = hub.settings.images.user_name
    lines = [
        "c.JupyterHub.spawner_class = 'docker'",
        f"c.DockerSpawner.allowed_images = {images!r}",
        "c.DockerSpawner.remove = True",
        # repo2docker images start a plain notebook server unless told otherwise
        "c.DockerSpawner.cmd = ['jupyterhub-singleuser']",
        f"c.DockerSpawner.notebook_dir = {f'/home/{user}'!r}",
    ]
    if tags:
        lines.insert(2, f"c.DockerSpawner.image = {tags[0]!r}")
    return lines


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


_PORT_LINES = {
    "port": r"^c\.JupyterHub\.bind_url = 'http://.*:(\d+)/'$",
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
    return f"""\
# Written by `doit install_hub` (hubworks); re-run it rather than editing this file.
[Unit]
Description=JupyterHub
After=network-online.target
Wants=network-online.target

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
