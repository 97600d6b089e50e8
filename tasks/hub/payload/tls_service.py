"""The hub's HTTPS helper: plain-HTTP redirects, ACME challenges, certificate renewal.

``install_hub`` imports it, and copies it under the hub's prefix where the hub runs it as a
managed service with the venv's Python::

    python hubworks_tls_service.py serve --http-port 80 <prefix>/etc/hubworks_tls.json
    python hubworks_tls_service.py renew <prefix>/etc/hubworks_tls.json   # the systemd timer

``serve`` answers plain HTTP on ``--http-port``: ``/.well-known/acme-challenge/<token>`` from the
webroot certbot writes to, everything else a redirect to HTTPS. With ``renew_every_hours`` set
(Let's Encrypt without systemd) it also checks the certificate that often and renews it when
fewer than ``renew_days`` are left. A renewal copies the new certificate where the proxy reads it
and stops the proxy process; the hub starts it again within seconds (its proxy check), with the
users' servers and their routes untouched.

The JSON file (world-readable, no secrets) holds the paths and settings; ``install_hub`` writes
it from the ``[hub]`` settings.

Beyond the standard library it uses ``LIBRARIES`` (cryptography reads certificates, psutil
processes), which install_hub:jupyterhub installs into the hub's venv with JupyterHub and
which hubworks itself depends on. They are imported where used: install_hub imports this file
while doit loads its graph.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

# What this file needs beyond the standard library, and the lowest release of each it runs with.
LIBRARIES = {"cryptography": "42", "psutil": "5.9"}
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
RELOAD_SECONDS = 60


# ---- certificates --------------------------------------------------------------------------

def _leaf(pem: bytes):
    """The first certificate in a PEM file: a chain starts with the leaf."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ValueError("it holds no readable PEM certificate") from None


def first_certificate(pem: bytes) -> bytes:
    """The DER bytes of the first certificate in a PEM file, as a TLS listener presents it."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return _leaf(pem).public_bytes(Encoding.DER)


def certificate_expiry(pem: bytes) -> dt.datetime:
    """notAfter of the first certificate in ``pem`` (UTC)."""
    return _leaf(pem).not_valid_after_utc


def days_left(pem: bytes, now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.timezone.utc)
    return (certificate_expiry(pem) - now).total_seconds() / 86400


def read_bytes(path: str | Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a root-only (0600) file, never briefly readable."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


# ---- Let's Encrypt (certbot) ---------------------------------------------------------------

def lineage_files(conf: dict) -> tuple[Path, Path]:
    live = Path(conf["letsencrypt"]["config_dir"]) / "live" / conf["domain"]
    return live / "fullchain.pem", live / "privkey.pem"


def issued_for(conf: dict) -> dict:
    """What the certificate in certbot's lineage was requested for: domain and ACME server."""
    return {"domain": conf["domain"], "acme_directory": conf["letsencrypt"]["directory"]}


def request_due(conf: dict) -> str | None:
    """Why a certificate must be requested from the ACME server now, or None."""
    chain, _ = lineage_files(conf)
    pem = read_bytes(chain)
    try:
        record = json.loads(Path(conf["record_file"]).read_text())
    except (OSError, ValueError):
        record = None
    if pem is None or record != issued_for(conf):
        return (f"no certificate for {conf['domain']} from "
                f"{conf['letsencrypt']['directory']} yet")
    left = days_left(pem)
    if left < conf["renew_days"]:
        return (f"the certificate expires in {left:.0f} days: the renewal runs now (from "
                f"{conf['renew_days']} days before)")
    return None


def certbot_command(conf: dict) -> list[str]:
    acme = conf["letsencrypt"]
    account = ["--email", acme["email"]] if acme["email"] else \
        ["--register-unsafely-without-email"]
    return [acme["certbot"], "certonly", "--non-interactive", "--agree-tos", *account,
            "--server", acme["directory"], "--webroot", "--webroot-path", conf["webroot"],
            "--domain", conf["domain"], "--cert-name", conf["domain"],
            # install_hub and this service decide when; certbot's own check would say "not yet"
            "--force-renewal",
            "--config-dir", acme["config_dir"], "--work-dir", acme["work_dir"],
            "--logs-dir", acme["logs_dir"]]


def certbot_environment(conf: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if conf["letsencrypt"]["ca_bundle"]:
        env["REQUESTS_CA_BUNDLE"] = conf["letsencrypt"]["ca_bundle"]
    return env


def run_quietly(command: Sequence[str], env: dict[str, str]) -> None:
    """The service's way to run certbot: its output into the hub's log only when it fails."""
    done = subprocess.run(list(command), env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr).strip()[-2000:]}")


def request_certificate(conf: dict, runner: Callable[[list[str], dict], None]) -> None:
    """Have certbot get a certificate for the domain (the webroot must be served on port 80)."""
    for folder in ("config_dir", "work_dir", "logs_dir"):
        Path(conf["letsencrypt"][folder]).mkdir(mode=0o700, parents=True, exist_ok=True)
    Path(conf["webroot"]).mkdir(mode=0o755, parents=True, exist_ok=True)
    runner(certbot_command(conf), certbot_environment(conf))
    Path(conf["record_file"]).parent.mkdir(mode=0o700, exist_ok=True)
    write_private(Path(conf["record_file"]), json.dumps(issued_for(conf)).encode())


def install_files(conf: dict, chain: bytes, key: bytes) -> bool:
    """Put certificate and key where the proxy reads them (key 0600); False if they were."""
    cert_file, key_file = Path(conf["cert_file"]), Path(conf["key_file"])
    if read_bytes(cert_file) == chain and read_bytes(key_file) == key:
        return False
    cert_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(key_file, key)
    write_private(cert_file, chain)
    return True


def install_lineage(conf: dict) -> bool:
    chain, key = (read_bytes(path) for path in lineage_files(conf))
    if chain is None or key is None:
        raise RuntimeError(f"certbot left no certificate in {lineage_files(conf)[0].parent}")
    return install_files(conf, chain, key)


# ---- the proxy -----------------------------------------------------------------------------

def proxy_pid(conf: dict) -> int | None:
    """The proxy's pid from its pid file, if it runs (a zombie has exited)."""
    import psutil

    try:
        pid = int(Path(conf["proxy_pid_file"]).read_text().split()[0])
        running = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid if running else None


def served_certificate(host: str, port: int, timeout: float = 3.0) -> bytes | None:
    """The DER certificate a TLS listener presents (unverified: this only compares it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout) as raw, \
                context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)
    except OSError:
        return None


def _routes_restored(conf: dict) -> bool:
    """The hub has given the new proxy its routes back: /hub/health answers through it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate names the domain, not this address
    host = f"[{conf['proxy_host']}]" if ":" in conf["proxy_host"] else conf["proxy_host"]
    try:
        with urllib.request.urlopen(f"https://{host}:{conf['https_port']}/hub/health",
                                    timeout=3, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def reload_proxy(conf: dict, seconds: float = RELOAD_SECONDS) -> str:
    """Stop the proxy so the hub starts it again on the current files; wait until it serves
    them and has its routes back. Users' servers keep running."""
    old = proxy_pid(conf)
    if old is None:
        return "no proxy runs: it reads the new certificate when the hub starts"
    wanted = first_certificate(Path(conf["cert_file"]).read_bytes())
    os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        new = proxy_pid(conf)
        if new and new != old and served_certificate(
                conf["proxy_host"], conf["https_port"]) == wanted and _routes_restored(conf):
            return f"the proxy restarted (pid {old} -> {new}) with the new certificate"
        time.sleep(0.5)
    raise RuntimeError(f"the hub did not restart its proxy within {seconds:.0f} s after the "
                       f"certificate changed (stopped pid {old})")


def renew_if_due(conf: dict, runner: Callable[[list[str], dict], None] = None) -> str:
    """Request a certificate when one is due, install it, reload the proxy; say what happened."""
    said = []
    reason = request_due(conf)
    if reason:
        request_certificate(conf, runner or run_quietly)
        said.append(f"{reason}: certbot got a new one")
    if install_lineage(conf):
        said.append(reload_proxy(conf))
    return "; ".join(said) or "the certificate is current"


# ---- plain HTTP: redirects and ACME challenges ---------------------------------------------

class RedirectHandler(http.server.BaseHTTPRequestHandler):
    """Every request: a redirect to HTTPS, except the ACME challenge files certbot writes."""

    server_version = "hubworks"
    conf: dict = {}

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_POST(self) -> None:
        self._redirect(308)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(CHALLENGE_PREFIX):
            self._challenge(path[len(CHALLENGE_PREFIX):], body)
        else:
            self._redirect(301)

    def _challenge(self, token: str, body: bool) -> None:
        file = Path(self.conf["webroot"], CHALLENGE_PREFIX.strip("/"), token)
        data = read_bytes(file) if _TOKEN.fullmatch(token) else None
        self.send_response(200 if data is not None else 404)
        data = data if data is not None else b"no such challenge\n"
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _redirect(self, status: int) -> None:
        # the hub's own name, never the request's Host header: a client picks that one
        host = self.conf.get("redirect_host") or self.conf.get("domain")
        if not host:
            self.send_error(400, "open the hub's https:// address")
            return
        port = self.conf["https_port"]
        path = self.path if self.path.startswith("/") else "/"
        self.send_response(status)
        self.send_header("Location", f"https://{host}{'' if port == 443 else f':{port}'}{path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_request(self, code="-", size="-") -> None:
        # redirects are every request a browser makes first: only challenges and errors
        if self.path.startswith(CHALLENGE_PREFIX) or str(code).startswith(("4", "5")):
            super().log_request(code, size)

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"hubworks-http: {self.address_string()} {format % args}\n")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


@contextlib.contextmanager
def http_listener(conf: dict, port: int) -> Iterator[_Server]:
    """Serve redirects and challenges on ``port`` from a thread while the block runs."""
    handler = type("Handler", (RedirectHandler,), {"conf": conf})
    server = _Server((conf["listen_ip"], port), handler)
    thread = threading.Thread(target=server.serve_forever, name="hubworks-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(conf: dict, port: int) -> None:
    hours = conf.get("renew_every_hours") or 0
    with http_listener(conf, port):
        print(f"hubworks-http: port {port} redirects to HTTPS on {conf['https_port']}"
              + (f"; certificate checked every {hours} h" if hours else ""), flush=True)
        while True:
            if hours:
                try:
                    print(f"hubworks-http: {renew_if_due(conf)}", flush=True)
                except Exception as exc:  # keep serving; the next check tries again
                    print(f"hubworks-http: renewal failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(hours * 3600 if hours else 86400)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "renew":
        print(renew_if_due(json.loads(Path(argv[1]).read_text())), flush=True)
        return 0
    if len(argv) == 4 and argv[0] == "serve" and argv[1] == "--http-port":
        serve(json.loads(Path(argv[3]).read_text()), int(argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
