"""install_hub:tls: the certificate the proxy serves, and the service around it.

``hub.https = files``: the office's certificate and key (``hub.tls_cert``, ``hub.tls_key``) are
copied under ``secrets/tls/`` (key 0600, root's) after checking that they belong together and
have not expired. ``letsencrypt``: certbot (in the hub venv) gets a certificate for ``hub.domain``
from ``hub.acme_directory`` with the HTTP-01 challenge, answered on ``hub.http_port`` by the
hub's ``hubworks-http`` service, or by a listener of this step while the hub is not running. A
re-run asks the ACME server only when fewer than ``RENEW_DAYS`` are left, which the check reads
from the certificate itself.

Either way a changed certificate reaches a running hub by a restart of its proxy alone (see
``tls_service.reload_proxy``): users' servers keep running. The work itself is
``tls_service``'s, the same code the hub's service runs between installs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import ssl
import stat
from pathlib import Path

from ..core.commands import log_path
from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_bytes
from ..core.netaddr import url_host
from .checks import Check, checks_first
from .layout import SYSTEMD_UNIT_DIR, HubLayout, systemd_is_running
from .packages import run
from .payload import tls_service
from .permissions import require_root
from .processes import descendants, port_is_free, process_cmdline
from .render import configured_values, written_config
from .service import running_hub_pid

RENEW_DAYS = 30
WARN_DAYS = 14  # install_hub_plan says so when a certificate has less left
RENEW_EVERY_HOURS = 12
TIMER_NAME = "hubworks-tls-renew"


def service_conf(hub: HubLayout) -> dict:
    """What ``hubworks_tls_service.py`` needs, as written to ``etc/hubworks_tls.json``."""
    s = hub.hub_settings
    conf = {
        "domain": s.domain, "listen_ip": s.ip, "https_port": s.port,
        # redirects name the hub's own address, never the request's Host header (which a
        # client chooses: an open redirect otherwise)
        "redirect_host": url_host(hub.public_host),
        "proxy_host": hub.local_host, "proxy_pid_file": str(hub.proxy_pid_file),
        "cert_file": str(hub.tls_cert_file), "key_file": str(hub.tls_key_file),
        "record_file": str(hub.tls_dir / "issued.json"), "webroot": str(hub.acme_webroot),
        "renew_days": RENEW_DAYS, "renew_every_hours": 0, "letsencrypt": None,
    }
    if hub.https == "letsencrypt":
        # with systemd a timer renews (renewal_units); without, the service itself
        conf["renew_every_hours"] = 0 if hub.uses_systemd else RENEW_EVERY_HOURS
        conf["letsencrypt"] = {
            "certbot": str(hub.venv_bin / "certbot"), "directory": s.acme_directory,
            "email": s.acme_email, "ca_bundle": str(s.acme_ca_bundle or ""),
            "config_dir": str(hub.letsencrypt_dir),
            "work_dir": str(hub.var / "letsencrypt" / "work"),
            "logs_dir": str(hub.var / "letsencrypt" / "logs"),
        }
    return conf


# users' servers set their own _xsrf cookie; this makes it HTTPS-only like the hub's
SERVER_CONFIG = {"ServerApp": {"tornado_settings": {"xsrf_cookie_kwargs": {"secure": True}}}}


def service_files(hub: HubLayout) -> dict[Path, str]:
    """The service's program and settings, and the servers' HTTPS config, as they should be."""
    return {hub.tls_service_script: Path(tls_service.__file__).read_text(),
            hub.tls_service_conf: _json(service_conf(hub)),
            hub.server_config_dir / "jupyter_server_config.json": _json(SERVER_CONFIG)}


def _json(value) -> str:
    return json.dumps(value, indent=1, sort_keys=True) + "\n"


# ---- check ---------------------------------------------------------------------------------

def _stale_service_file(hub: HubLayout) -> Path | None:
    for path, text in service_files(hub).items():
        try:
            if path.read_text() != text or stat.S_IMODE(path.stat().st_mode) != 0o644:
                return path
        except OSError:
            return path
    return None


def _private_key_problem(hub: HubLayout) -> str | None:
    try:
        st = os.stat(hub.tls_key_file)
    except OSError:
        return f"{hub.tls_key_file} does not exist yet"
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
        return f"{hub.tls_key_file} is not root's with mode 600"
    return None


def _expiry_says(chain: bytes) -> str:
    expiry = tls_service.certificate_expiry(chain)
    return f"expires {expiry:%Y-%m-%d} ({tls_service.days_left(chain):.0f} days left)"


def _files_sources(hub: HubLayout) -> tuple[Path, Path]:
    s = hub.hub_settings
    if not s.tls_cert or not s.tls_key:
        raise HubworksError(
            "hub.https = files needs hub.tls_cert and hub.tls_key.",
            fix="name the certificate (PEM, with its chain) and its key in [hub] tls_cert and "
                "tls_key, or set https = letsencrypt or off")
    return Path(s.tls_cert), Path(s.tls_key)


def check_tls(hub: HubLayout) -> Check:
    stale = _stale_service_file(hub)
    if stale:
        return Check(False, f"{stale} is missing or differs from the settings")
    problem = _private_key_problem(hub)
    if problem:
        return Check(False, problem)
    return _check_letsencrypt(hub) if hub.https == "letsencrypt" else _check_files(hub)


def _check_files(hub: HubLayout) -> Check:
    cert, key = _files_sources(hub)
    chain, key_bytes = tls_service.read_bytes(cert), tls_service.read_bytes(key)
    if chain is None or key_bytes is None:
        return Check(False, f"{cert if chain is None else key} cannot be read")
    if tls_service.read_bytes(hub.tls_cert_file) != chain or \
            tls_service.read_bytes(hub.tls_key_file) != key_bytes:
        return Check(False, f"the proxy's copy differs from {cert} and {key}")
    left = tls_service.days_left(chain)
    if left < 0:
        return Check(False, f"{cert} has expired")
    said = f"the proxy serves {cert}, which {_expiry_says(chain)}; key 600, root's"
    if left < WARN_DAYS:
        said += f"; fewer than {WARN_DAYS} days left: replace it (hub.tls_cert) soon"
    if warning := _readable_key_warning(key):
        said += f"; {warning}"
    return Check(True, said)


def _readable_key_warning(key: Path) -> str | None:
    """The office's own key file, readable by every user of this server, is a leaked key."""
    try:
        readable = os.stat(key).st_mode & stat.S_IROTH
    except OSError:
        return None
    return (f"warning: {key} (hub.tls_key) is readable by every user of this server; the "
            f"proxy uses a root-only copy, so make the original root-only too "
            f"(chmod 600 {key})") if readable else None


def _check_letsencrypt(hub: HubLayout) -> Check:
    conf = service_conf(hub)
    due = tls_service.request_due(conf)
    if due:
        return Check(False, due)
    chain_file, key_file = tls_service.lineage_files(conf)
    chain = tls_service.read_bytes(chain_file)
    if tls_service.read_bytes(hub.tls_cert_file) != chain or \
            tls_service.read_bytes(hub.tls_key_file) != tls_service.read_bytes(key_file):
        return Check(False, f"the proxy's copy differs from certbot's {chain_file}")
    return Check(True, f"the certificate for {hub.hub_settings.domain} {_expiry_says(chain)} "
                       f"(renewed from {RENEW_DAYS} days before); key 600, root's")


# ---- ensure --------------------------------------------------------------------------------

@checks_first(check_tls)
def ensure_tls(hub: HubLayout) -> str:
    said = []
    for path, text in service_files(hub).items():
        path.parent.mkdir(exist_ok=True)
        os.chmod(path.parent, 0o755)  # users' servers read etc/jupyter
        # only a changed file is written: the health step restarts the hub for a new one
        if not path.exists() or path.read_text() != text:
            atomic_write_bytes(path, text.encode(), 0o644)
            said.append(f"wrote {path}")
        os.chmod(path, 0o644)
    hub.tls_dir.mkdir(mode=0o700, exist_ok=True)
    conf = service_conf(hub)
    said += _ensure_letsencrypt(hub, conf) if hub.https == "letsencrypt" else \
        _ensure_files(hub, conf)
    return "; ".join(said)


def _ensure_files(hub: HubLayout, conf: dict) -> list[str]:
    cert, key = _files_sources(hub)
    _require_serving_pair(cert, key)
    chain = cert.read_bytes()
    left = _days_left_of(cert, chain)
    said = [f"the proxy serves {cert}, which {_expiry_says(chain)}"]
    if left < RENEW_DAYS:
        said.append("ask the office's CA for a new one soon")
    if warning := _readable_key_warning(key):
        said.append(warning)
    if tls_service.install_files(conf, chain, key.read_bytes()):
        said.append(_reload(hub, conf))
    return said


def _require_serving_pair(cert: Path, key: Path) -> None:
    """Both readable PEM files, the key not encrypted, and the key belongs to the certificate."""
    for path in (cert, key):
        if tls_service.read_bytes(path) is None:
            raise HubworksError(f"{path} (hub.tls_{'cert' if path == cert else 'key'}) cannot "
                                f"be read.", fix="name a readable PEM file, and run as root")
    # PKCS#8 ("BEGIN ENCRYPTED PRIVATE KEY") or the traditional form ("Proc-Type: 4,ENCRYPTED")
    if b"ENCRYPTED" in (tls_service.read_bytes(key) or b""):
        raise HubworksError(
            f"{key} (hub.tls_key) is encrypted with a passphrase, which the proxy cannot ask "
            f"for when it starts.",
            fix=f"write an unencrypted copy, root-only: openssl pkey -in {key} -out "
                f"<plain key> (it asks the passphrase once), chmod 600 <plain key>, and name "
                f"that file in hub.tls_key")
    try:
        # the proxy's own test: both PEM, and the key belongs to the certificate
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key,
                                                                 password=lambda: b"")
    except ssl.SSLError as exc:
        raise HubworksError(
            f"{cert} and {key} (hub.tls_cert, hub.tls_key) cannot serve HTTPS together: "
            f"{exc.reason or exc}.",
            fix="name the certificate (PEM, leaf first, then its chain) and the unencrypted "
                "key it was issued for (openssl pkey -in <key> -out <plain key> removes a "
                "passphrase)") from None


def _days_left_of(cert: Path, chain: bytes) -> float:
    """Days until the office's certificate expires; it must not have expired."""
    try:
        left = tls_service.days_left(chain)
    except ValueError as exc:
        raise HubworksError(f"{cert} (hub.tls_cert): {exc}.",
                            fix="name a PEM certificate") from None
    if left < 0:
        raise HubworksError(
            f"{cert} (hub.tls_cert) expired on {tls_service.certificate_expiry(chain):%Y-%m-%d}.",
            fix="get a new certificate from the office's CA, or set https = letsencrypt")
    return left


def _ensure_letsencrypt(hub: HubLayout, conf: dict) -> list[str]:
    s = hub.hub_settings
    if not s.domain:
        raise HubworksError("hub.https = letsencrypt needs hub.domain, the name the "
                            "certificate is for.", fix="set [hub] domain = \"hub.example.org\"")
    if not hub.redirects_http:
        raise HubworksError(
            "hub.https = letsencrypt needs hub.http_port: the ACME server checks the domain "
            "over plain HTTP (the HTTP-01 challenge).",
            fix="set hub.http_port = 80 (the default), open it to the ACME server, or use "
                "https = files with a certificate from elsewhere")
    said = []
    due = tls_service.request_due(conf)
    if due:
        with _challenge_answered(hub, conf):
            tls_service.request_certificate(conf, runner=functools.partial(_run_certbot, hub))
        said.append(f"{due}: certbot got one from {s.acme_directory}")
    chain = tls_service.read_bytes(tls_service.lineage_files(conf)[0])
    said.append(f"the certificate for {s.domain} {_expiry_says(chain)}")
    if tls_service.install_lineage(conf):
        said.append(_reload(hub, conf))
    return said


def _run_certbot(hub: HubLayout, command: list[str], env: dict[str, str]) -> None:
    run(command, log=log_path(hub.settings, "install_hub", "tls.log"), env=env)


@contextlib.contextmanager
def _challenge_answered(hub: HubLayout, conf: dict):
    """Port hub.http_port answers ACME challenges for the block: the hub's service, or ours."""
    port = hub.hub_settings.http_port
    if port_is_free(hub.hub_settings.ip, port):
        with tls_service.http_listener(conf, port):
            yield
        return
    if _http_service_pid(hub) is None:
        raise HubworksError(
            f"port {port} (hub.http_port) is already in use by another program; the ACME "
            f"server checks the domain there.",
            fix=f"stop that program (`ss -ltnp 'sport = :{port}'` names it) so the hub can "
                f"answer on it")
    yield


def _http_service_pid(hub: HubLayout) -> int | None:
    hub_pid = running_hub_pid(hub)
    for pid in descendants(hub_pid) if hub_pid else ():
        if str(hub.tls_service_script) in process_cmdline(pid):
            return pid
    return None


def _reload(hub: HubLayout, conf: dict) -> str:
    """A running hub whose proxy serves these files gets a new proxy; others start with it."""
    serves_tls = running_hub_pid(hub) and \
        configured_values(written_config(hub)).get("JupyterHub.ssl_cert") == str(hub.tls_cert_file)
    if not serves_tls:
        return "the proxy reads it when the hub (re)starts"
    try:
        return tls_service.reload_proxy(conf)
    except RuntimeError as exc:
        raise HubworksError(f"{exc}.", fix=f"look at {hub.log_file}; doit hub_stop and "
                                           f"doit hub_start restart the whole hub") from None


# ---- renewal with systemd: a timer ---------------------------------------------------------

def renewal_units(hub: HubLayout) -> dict[Path, str]:
    """Twice a day, the renewal the hub's service does itself where systemd does not run."""
    command = " ".join([str(hub.venv_python), str(hub.tls_service_script), "renew",
                        str(hub.tls_service_conf)])
    return {
        SYSTEMD_UNIT_DIR / f"{TIMER_NAME}.service": f"""\
# Written by `doit install_hub` (hubworks); re-run it rather than editing this file.
[Unit]
Description=Renew the JupyterHub certificate when fewer than {RENEW_DAYS} days are left

[Service]
Type=oneshot
ExecStart={command}
""",
        SYSTEMD_UNIT_DIR / f"{TIMER_NAME}.timer": """\
# Written by `doit install_hub` (hubworks); re-run it rather than editing this file.
[Unit]
Description=Check the JupyterHub certificate twice a day

[Timer]
OnCalendar=*-*-* 00/12:00:00
RandomizedDelaySec=1h
Persistent=true

[Install]
WantedBy=timers.target
""",
    }


def _timer_link() -> Path:
    return SYSTEMD_UNIT_DIR / "timers.target.wants" / f"{TIMER_NAME}.timer"


def check_renewal_timer(hub: HubLayout) -> Check:
    for path, text in renewal_units(hub).items():
        try:
            if path.read_text() != text:
                return Check(False, f"{path} differs from the settings")
        except OSError:
            return Check(False, f"{path} does not exist yet")
    if not _timer_link().exists():
        return Check(False, f"{TIMER_NAME}.timer is not enabled")
    return Check(True, f"{TIMER_NAME}.timer checks the certificate twice a day")


@checks_first(check_renewal_timer)
def ensure_renewal_timer(hub: HubLayout) -> str:
    require_root(f"writing the systemd units {TIMER_NAME}.service and .timer")
    for path, text in renewal_units(hub).items():
        atomic_write_bytes(path, text.encode(), 0o644)
    log = log_path(hub.settings, "install_hub", "tls_renewal.log")
    if systemd_is_running():
        run(["systemctl", "daemon-reload"], log=log)
        run(["systemctl", "enable", "--now", f"{TIMER_NAME}.timer"], log=log)
    else:
        run(["systemctl", "enable", f"{TIMER_NAME}.timer"], log=log)
    return f"wrote and enabled {TIMER_NAME}.timer: it renews the certificate when due"
