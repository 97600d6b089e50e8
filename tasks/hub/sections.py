"""Sections of ``jupyterhub_config.py`` for a hub on the network, one function per section.

Each returns its lines; ``render.render_config`` appends them in order after the core sections,
and the office's own ``jupyterhub_config.d`` last, so an admin's file overrides any of them.
"""

from __future__ import annotations

from .layout import HubLayout

# the hub sees a server's activity this often at most (JupyterHub's default for both knobs)
ACTIVITY_SECONDS = 300
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
STATUS_SCOPES = ["list:users", "read:users", "read:users:activity", "read:servers",
                 "admin:server_state", "list:services", "read:services"]


def network_sections(hub: HubLayout) -> list[str]:
    lines: list[str] = []
    for section in (https_section, culling_section, limits_section, status_section,
                    config_d_section):
        part = section(hub)
        if part:
            lines += ["", *part]
    return lines


def config_line(name: str, value) -> str:
    """One setting of jupyterhub_config.py: ``c.Name = value``."""
    return f"c.{name} = {value!r}"


def tls_service_command(hub: HubLayout) -> list[str]:
    """hubworks_tls_service.py (written by install_hub:tls) on hub.http_port."""
    return [str(hub.venv_python), str(hub.tls_service_script), "serve", "--http-port",
            str(hub.hub_settings.http_port), str(hub.tls_service_conf)]


def https_section(hub: HubLayout) -> list[str]:
    if hub.https == "off":
        return []
    lines = [f"# HTTPS ({hub.https}): the proxy serves the certificate install_hub keeps under "
             f"secrets/tls",
             config_line("JupyterHub.ssl_cert", str(hub.tls_cert_file)),
             config_line("JupyterHub.ssl_key", str(hub.tls_key_file)),
             config_line("JupyterHub.cookie_options", {"secure": True}),
             config_line("JupyterHub.tornado_settings", {"xsrf_cookie_kwargs": {"secure": True}})]
    if hub.choice("spawner") == "local":
        lines += ["# local servers read jupyter_server_config.json there (secure _xsrf cookie)",
                  "c.Spawner.environment.update(" + repr(
                      {"JUPYTER_CONFIG_PATH": str(hub.server_config_dir)}) + ")"]
    if hub.redirects_http:
        lines += [f"# plain HTTP on port {hub.hub_settings.http_port} only redirects to HTTPS "
                  f"and answers ACME challenges",
                  "c.JupyterHub.services.append(" + repr(
                      {"name": "hubworks-http", "command": tls_service_command(hub)}) + ")"]
    return lines


def activity_seconds(hub: HubLayout) -> int:
    """How often activity reaches the hub: a few times per culling period, at most 5 min."""
    s = hub.hub_settings
    periods = [minutes * 60 for minutes in (s.cull_idle_minutes, s.cull_max_age_hours * 60)
               if minutes]
    return max(10, min([ACTIVITY_SECONDS] + [period // 4 for period in periods]))


def culling_section(hub: HubLayout) -> list[str]:
    s = hub.hub_settings
    if not (s.cull_idle_minutes or s.cull_max_age_hours):
        return []
    max_age = s.cull_max_age_hours * 3600
    # the culler needs an idle limit; a server idle for max_age is also that old
    timeout = s.cull_idle_minutes * 60 or max_age
    every = activity_seconds(hub)
    command = [str(hub.venv_python), "-m", "jupyterhub_idle_culler", f"--timeout={timeout}",
               f"--max-age={max_age}", f"--cull-every={every}"]
    what = (f"idle for {s.cull_idle_minutes} min" if s.cull_idle_minutes else "") + \
        (" or " if s.cull_idle_minutes and max_age else "") + \
        (f"running for {s.cull_max_age_hours} h" if max_age else "")
    return [f"# idle culling: jupyterhub-idle-culler stops servers {what}",
            "c.JupyterHub.services.append(" + repr({"name": "idle-culler",
                                                   "command": command}) + ")",
            "c.JupyterHub.load_roles.append(" + repr(
                {"name": "idle-culler", "scopes": CULLER_SCOPES,
                 "services": ["idle-culler"]}) + ")",
            "# servers and the proxy report activity often enough for that",
            config_line("JupyterHub.last_activity_interval", every),
            f"c.Spawner.environment.update({{'JUPYTERHUB_ACTIVITY_INTERVAL': {str(every)!r}}})"]


def limits_section(hub: HubLayout) -> list[str]:
    s = hub.hub_settings
    if not (s.mem_limit or s.cpu_limit):
        return []
    lines = ["# per-user limits: every spawner reads these (and sets MEM_LIMIT, CPU_LIMIT)"]
    if s.mem_limit:
        lines.append(config_line("Spawner.mem_limit", s.mem_limit))
    if s.cpu_limit:
        lines.append(config_line("Spawner.cpu_limit", s.cpu_limit))
    if hub.choice("spawner") != "local":
        return lines  # containers get them as their cgroup limits
    if hub.uses_systemd:
        return lines + ["# local servers in systemd units: the limits are the unit's cgroup",
                        config_line("JupyterHub.spawner_class", "systemdspawner.SystemdSpawner")]
    if s.mem_limit:
        lines += _address_space_spawner()
    return lines


def _address_space_spawner() -> list[str]:
    return '''\
# no systemd, so no cgroup: each process of a local server (the server, every kernel) may map
# at most mem_limit (RLIMIT_AS); the CPU limit is not enforced
import resource
from jupyterhub.spawner import LocalProcessSpawner


class AddressSpaceLimitedSpawner(LocalProcessSpawner):
    def make_preexec_fn(self, name):
        become_user, limit = super().make_preexec_fn(name), self.mem_limit

        def preexec():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            become_user()
        return preexec


c.JupyterHub.spawner_class = AddressSpaceLimitedSpawner'''.splitlines()


def status_section(hub: HubLayout) -> list[str]:
    return ["# `doit hub_status` reads the hub's REST API as this service",
            f"with open({str(hub.status_token)!r}) as token_file:",
            "    c.JupyterHub.services.append({'name': 'hubworks-status', "
            "'api_token': token_file.read().strip()})",
            "c.JupyterHub.load_roles.append(" + repr(
                {"name": "hubworks-status", "scopes": STATUS_SCOPES,
                 "services": ["hubworks-status"]}) + ")"]


def config_d_section(hub: HubLayout) -> list[str]:
    return ["# the office's own settings, last: every jupyterhub_config.d/*.py in name order",
            "# (install_hub never writes or checks them; a changed one restarts the hub)",
            "import glob",
            f"for path in sorted(glob.glob({str(hub.config_d / '*.py')!r})):",
            "    load_subconfig(path)  # noqa: F821"]
