"""The install_hub steps as doit's task creator sees them: each step's name, the state it
guarantees, the steps before it, and whether this hub wants it.

Every doit command calls the task creators, so this module stays light: a step's
``check_*``/``ensure_*`` pair lives in ``steps`` (which imports most of this stage) and loads
when a step is first checked or run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..core.deferred import deferred
from .checks import Check
from .layout import HubLayout


@dataclass(frozen=True)
class Step:
    name: str
    doc: str
    check: Callable[[HubLayout], Check]
    ensure: Callable[[HubLayout], str]
    after: tuple[str, ...] = ()
    wanted: Callable[[HubLayout], bool] = field(default=lambda hub: True)


def _pair(check: str, ensure: str, module: str = "tasks.hub.steps"
          ) -> tuple[Callable, Callable]:
    return deferred(module, check), deferred(module, ensure)


def _limits_by_systemd(hub: HubLayout) -> bool:
    return hub.choice("spawner") == "local" and hub.uses_systemd and \
        bool(hub.hub_settings.mem_limit or hub.hub_settings.cpu_limit)


STEPS: list[Step] = [
    Step("prefix", "The prefix: every user can enter it; secrets and state are root's.",
         *_pair("check_prefix", "ensure_prefix")),
    Step("python", "A Python >= 3.10 every user can run, able to make venvs.",
         *_pair("check_python", "ensure_python")),
    Step("node", "A Node.js that runs the configured configurable-http-proxy release.",
         *_pair("check_node", "ensure_node"), after=("prefix",)),
    Step("venv", "The hub's venv under the prefix, made from that Python.",
         *_pair("check_venv", "ensure_venv"), after=("prefix", "python")),
    Step("jupyterhub", "JupyterHub at hub.jupyterhub_version in the venv, with what the "
                       "HTTPS service needs.",
         *_pair("check_jupyterhub", "ensure_jupyterhub"), after=("venv",)),
    Step("jupyterlab", "JupyterLab at hub.jupyterlab_version in the venv.",
         *_pair("check_jupyterlab", "ensure_jupyterlab"), after=("jupyterhub",)),
    Step("dockerspawner", "DockerSpawner in the venv (spawner = docker only).",
         *_pair("check_dockerspawner", "ensure_dockerspawner"), after=("jupyterlab",),
         wanted=lambda hub: hub.uses_docker),
    Step("engine", "The Docker API users' containers run through answers (spawner = docker).",
         *_pair("check_engine", "ensure_engine"), after=("prefix",),
         wanted=lambda hub: hub.uses_docker),
    Step("images", "The built images that can serve users, checked once per tag "
                   "(spawner = docker).",
         *_pair("check_images", "ensure_images"), after=("engine",),
         wanted=lambda hub: hub.uses_docker),
    Step("images_page", "The Images page at /services/images/: a service of the hub that "
                        "shows and builds the workspace's images (spawner = docker).",
         *_pair("check_images_page_files", "ensure_images_page"), after=("jupyterhub", "images"),
         wanted=lambda hub: hub.uses_docker),
    Step("idle_culler", "jupyterhub-idle-culler in the venv (culling on only).",
         *_pair("check_idle_culler", "ensure_idle_culler"), after=("jupyterlab",),
         wanted=lambda hub: bool(hub.hub_settings.cull_idle_minutes
                                 or hub.hub_settings.cull_max_age_hours)),
    Step("systemdspawner", "jupyterhub-systemdspawner (local servers with limits, systemd).",
         *_pair("check_systemdspawner", "ensure_systemdspawner"), after=("jupyterlab",),
         wanted=_limits_by_systemd),
    Step("certbot", "certbot in the venv (https = letsencrypt only).",
         *_pair("check_certbot", "ensure_certbot"), after=("jupyterlab",),
         wanted=lambda hub: hub.https == "letsencrypt"),
    Step("proxy", "configurable-http-proxy from npm under the prefix.",
         *_pair("check_proxy", "ensure_proxy"), after=("node",)),
    Step("secrets", "Cookie secret, proxy token and status token, created once, mode 600.",
         *_pair("check_secrets", "ensure_secrets"), after=("prefix",)),
    Step("tls", "The certificate the proxy serves (key 600), and the HTTPS service's files.",
         *_pair("check_tls", "ensure_tls", "tasks.hub.tls"), after=("secrets", "certbot", "venv"),
         wanted=lambda hub: hub.https != "off"),
    Step("config", "The hub's settings as data, and the jupyterhub_config.py applying them.",
         *_pair("check_config", "ensure_config"),
         after=("proxy", "secrets", "jupyterhub", "dockerspawner", "engine", "idle_culler",
                "systemdspawner", "tls")),
    Step("database", "The hub's database at the installed JupyterHub's schema.",
         *_pair("check_database", "ensure_database"), after=("config",)),
    Step("service", "A systemd unit when systemd runs; else the background start.",
         *_pair("check_service", "ensure_service"), after=("config",)),
    Step("tls_renewal", "With systemd: a timer renews the Let's Encrypt certificate when due.",
         *_pair("check_renewal_timer", "ensure_renewal_timer", "tasks.hub.tls"), after=("tls",),
         wanted=lambda hub: hub.https == "letsencrypt" and hub.uses_systemd),
    Step("health", "The hub runs the current install and /hub/health answers 200.",
         *_pair("check_health", "ensure_health"),
         after=("database", "service", "jupyterlab", "images", "images_page")),
]
