"""`doit hub_status`: what runs, for how long, how idle; the certificate; the URL.

Processes come from psutil and the pid files; services and users' servers from the hub's REST
API, reached through the proxy from this machine (the hub itself may listen on a container
bridge) as the ``hubworks-status`` service, whose token is ``secrets/status_api_token`` (root's,
like the rest of secrets/).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request

from ..core.errors import HubworksError
from .layout import HubLayout
from .payload import tls_service
from .permissions import require_root
from .processes import is_alive, process_started_at, read_pid
from .service import loopback_tls, running_hub_pid

API_SECONDS = 10


def _since(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min" if minutes else f"{secs} s"


def _process_age(pid: int) -> str:
    started = process_started_at(pid)
    return _since(time.time() - started if started else None)


def _timestamp_age(text: str | None) -> str:
    if not text:
        return "?"
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return _since((dt.datetime.now(dt.timezone.utc) - when).total_seconds())


def _api(hub: HubLayout, path: str, token: str):
    request = urllib.request.Request(f"{hub.local_url}hub/api/{path}",
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=API_SECONDS,
                                context=loopback_tls()) as response:
        return json.load(response)


def _services(models: dict) -> list[str]:
    lines = []
    for name, model in sorted(models.items()):
        if name == "hubworks-status":
            continue  # this command itself
        pid = model.get("pid") or 0
        state = (f"pid {pid}, up {_process_age(pid)}" if pid and is_alive(pid)
                 else "not running" if model.get("command") else "API client")
        lines.append(f"  {name:<20} {state}")
    return lines


def _what_runs(server: dict) -> str:
    state = server.get("state") or {}
    image = (server.get("user_options") or {}).get("image") or state.get("image")
    if state.get("pid"):
        pid = state["pid"]
        return f"process {pid}" + ("" if is_alive(pid) else " (gone)")
    # DockerSpawner keeps its container's name and id as object_name, object_id
    container = state.get("object_name") or str(state.get("object_id", ""))[:12]
    parts = [f"image {image}" if image else "", f"container {container}" if container else ""]
    return ", ".join(part for part in parts if part) or "server"


def _servers(users: list[dict]) -> list[str]:
    lines = []
    for user in sorted(users, key=lambda u: u["name"]):
        for name, server in sorted((user.get("servers") or {}).items()):
            label = user["name"] + (f"/{name}" if name else "")
            ready = "" if server.get("ready") else f" ({server.get('pending') or 'not ready'})"
            lines.append(f"  {label:<20} {_what_runs(server)}, up "
                         f"{_timestamp_age(server.get('started'))}, idle "
                         f"{_timestamp_age(server.get('last_activity'))}{ready}")
    return lines or ["  (none)"]


def _certificate(hub: HubLayout) -> list[str]:
    if hub.https == "off":
        return ["certificate  none: hub.https = off (plain HTTP)"]
    chain = tls_service.read_bytes(hub.tls_cert_file)
    if chain is None:
        return [f"certificate  {hub.tls_cert_file} is missing: run doit install_hub"]
    try:
        expiry, left = tls_service.certificate_expiry(chain), tls_service.days_left(chain)
    except ValueError as exc:
        return [f"certificate  {hub.tls_cert_file}: {exc}; run doit install_hub"]
    how = ("renewed when fewer than 30 days are left" if hub.https == "letsencrypt"
           else f"from hub.tls_cert {hub.hub_settings.tls_cert}")
    return [f"certificate  expires {expiry:%Y-%m-%d %H:%M} UTC ({left:.0f} days left), {how}"]


def hub_status(hub: HubLayout) -> str:
    require_root("reading the hub's state (its pid files and status token are root's)")
    lines = []
    pid = running_hub_pid(hub)
    if pid is None:
        lines.append(f"hub          not running (doit hub_start starts it); {hub.public_url}")
    else:
        lines.append(f"hub          pid {pid}, up {_process_age(pid)}, {hub.public_url}")
        proxy = read_pid(hub.proxy_pid_file)
        lines.append(f"proxy        pid {proxy}, up {_process_age(proxy)}"
                     if proxy and is_alive(proxy) else "proxy        not running")
        lines += _from_api(hub)
    lines += _certificate(hub)
    return "\n".join(lines)


def _from_api(hub: HubLayout) -> list[str]:
    try:
        token = hub.status_token.read_text().strip()
        services = _api(hub, "services", token)
        users = _api(hub, "users?state=active", token)
    except OSError as exc:
        raise HubworksError(
            f"the hub runs but its API ({hub.local_url}hub/api/) did not answer the status "
            f"service: {getattr(exc, 'reason', exc)}.",
            fix="run doit install_hub (it installs the status service's token and restarts "
                "the hub if needed)") from None
    if isinstance(users, dict):  # the paginated form
        users = users.get("items", [])
    return ["services", *_services(services), "servers", *_servers(users)]
