"""Sections of the hub's configuration for a hub on the network, one function per section.

Each returns its section as data (``section()``), or None when the settings leave it out;
``render.config_sections`` puts them after the core sections, and the office's own
``jupyterhub_config.d`` last, so an admin's file overrides any of them. What each item of a
section does is said in ``payload/jupyterhub_config.py``, which applies them.
"""

from __future__ import annotations

from typing import Any

from .layout import HubLayout

# the hub sees a server's activity this often at most (JupyterHub's default for both knobs)
ACTIVITY_SECONDS = 300
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
STATUS_SCOPES = ["list:users", "read:users", "read:users:activity", "read:servers",
                 "admin:server_state", "list:services", "read:services"]
IMAGES_SERVICE = "images"
IMAGES_BUILD_SCOPE = "custom:images:build"
IMAGES_SERVICE_SCOPES = ["list:users", "read:users", "read:servers"]

Section = dict[str, Any]


def section(name: str, about: str, **items: Any) -> Section:
    """One section: its name and purpose (for a person reading the file), then its items."""
    return {"section": name, "about": about, **items}


def network_sections(hub: HubLayout) -> list[Section]:
    found = (part(hub) for part in (https_section, culling_section, limits_section,
                                    status_section, images_page_section, config_d_section))
    return [part for part in found if part]


def tls_service_command(hub: HubLayout) -> list[str]:
    """hubworks_tls_service.py (written by install_hub:tls) on hub.http_port."""
    return [str(hub.venv_python), str(hub.tls_service_script), "serve", "--http-port",
            str(hub.hub_settings.http_port), str(hub.tls_service_conf)]


def https_section(hub: HubLayout) -> Section | None:
    if hub.https == "off":
        return None
    items: Section = {"set": {
        "JupyterHub.ssl_cert": str(hub.tls_cert_file),
        "JupyterHub.ssl_key": str(hub.tls_key_file),
        # cookie_options is read from tornado_settings (JupyterHub has no trait of that name)
        "JupyterHub.tornado_settings": {"cookie_options": {"secure": True},
                                        "xsrf_cookie_kwargs": {"secure": True}},
    }}
    if hub.choice("spawner") == "local":
        # local servers read jupyter_server_config.json there (secure _xsrf cookie)
        items["environment"] = {"JUPYTER_CONFIG_PATH": str(hub.server_config_dir)}
    if hub.redirects_http:
        # plain HTTP only redirects to HTTPS and answers ACME challenges
        items["services"] = [{"name": "hubworks-http", "command": tls_service_command(hub)}]
    return section("https", f"HTTPS ({hub.https}): the proxy serves the certificate "
                            f"install_hub keeps under secrets/tls", **items)


def activity_seconds(hub: HubLayout) -> int:
    """How often activity reaches the hub: a few times per culling period, at most 5 min."""
    s = hub.hub_settings
    periods = [minutes * 60 for minutes in (s.cull_idle_minutes, s.cull_max_age_hours * 60)
               if minutes]
    return max(10, min([ACTIVITY_SECONDS] + [period // 4 for period in periods]))


def culling_section(hub: HubLayout) -> Section | None:
    s = hub.hub_settings
    if not (s.cull_idle_minutes or s.cull_max_age_hours):
        return None
    max_age = s.cull_max_age_hours * 3600
    # the culler needs an idle limit; a server idle for max_age is also that old
    timeout = s.cull_idle_minutes * 60 or max_age
    every = activity_seconds(hub)
    command = [str(hub.venv_python), "-m", "jupyterhub_idle_culler", f"--timeout={timeout}",
               f"--max-age={max_age}", f"--cull-every={every}"]
    what = (f"idle for {s.cull_idle_minutes} min" if s.cull_idle_minutes else "") + \
        (" or " if s.cull_idle_minutes and max_age else "") + \
        (f"running for {s.cull_max_age_hours} h" if max_age else "")
    return section(
        "culling", f"jupyterhub-idle-culler stops servers {what}; servers and the proxy "
                   f"report activity often enough for that",
        set={"JupyterHub.last_activity_interval": every},
        environment={"JUPYTERHUB_ACTIVITY_INTERVAL": str(every)},
        services=[{"name": "idle-culler", "command": command}],
        roles=[{"name": "idle-culler", "scopes": CULLER_SCOPES, "services": ["idle-culler"]}])


def limits_section(hub: HubLayout) -> Section | None:
    s = hub.hub_settings
    if not (s.mem_limit or s.cpu_limit):
        return None
    about = "per-user limits: every spawner reads these (and sets MEM_LIMIT, CPU_LIMIT)"
    limits = {f"Spawner.{key}": value for key, value in
              (("mem_limit", s.mem_limit), ("cpu_limit", s.cpu_limit)) if value}
    if hub.choice("spawner") != "local":
        return section("limits", f"{about}; containers get them as their cgroup limits",
                       set=limits)
    if hub.uses_systemd:
        return section("limits", f"{about}; local servers run in systemd units, whose cgroup "
                                 f"holds the limits",
                       set={**limits, "JupyterHub.spawner_class": "systemdspawner.SystemdSpawner"})
    if s.mem_limit:
        return section("limits", f"{about}; no systemd, so no cgroup: each process of a local "
                                 f"server may map at most mem_limit, the CPU limit is not "
                                 f"enforced", set=limits, limit_address_space=True)
    return section("limits", about, set=limits)


def status_section(hub: HubLayout) -> Section:
    return section(
        "status", "`doit hub_status` reads the hub's REST API as this service",
        services=[{"name": "hubworks-status", "api_token_file": str(hub.status_token)}],
        roles=[{"name": "hubworks-status", "scopes": STATUS_SCOPES,
                "services": ["hubworks-status"]}])


def images_page_section(hub: HubLayout) -> Section | None:
    """The Images page (payload/images_service.py): everyone who logs in may see it; admins
    and hub.image_builders may build. Its own token only reads users and their servers."""
    if not hub.uses_docker:
        return None
    builders = hub.hub_settings.image_builders
    users = sorted(set(hub.hub_settings.admin_users) | {b for b in builders if b[:1] != "@"})
    url = f"http://127.0.0.1:{hub.hub_settings.images_port}"
    return section(
        "images page", "the Images page at /services/images/: each image's state and users, "
                       "and builds (payload/images_service.py)",
        set={"JupyterHub.custom_scopes": {IMAGES_BUILD_SCOPE: {
                 "description": "Build images on the Images page."}},
             "JupyterHub.extra_user_scopes": [f"access:services!service={IMAGES_SERVICE}"]},
        services=[{"name": IMAGES_SERVICE, "url": url,
                   "command": [str(hub.venv_python), str(hub.images_service_script),
                               str(hub.images_service_conf)],
                   "oauth_no_confirm": True,
                   "oauth_client_allowed_scopes": [IMAGES_BUILD_SCOPE]}],
        roles=[{"name": "images-builders", "scopes": [IMAGES_BUILD_SCOPE], "users": users,
                "groups": sorted({b[1:] for b in builders if b[:1] == "@"})},
               {"name": "images-service", "scopes": IMAGES_SERVICE_SCOPES,
                "services": [IMAGES_SERVICE]}])


def config_d_section(hub: HubLayout) -> Section:
    return section(
        "office", "the office's own settings, last: every jupyterhub_config.d/*.py in name "
                  "order (install_hub never writes or checks them; a changed one restarts the "
                  "hub)", load_config_d=str(hub.config_d))
