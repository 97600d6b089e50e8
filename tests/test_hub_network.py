"""A hub an office can put on its network, for real: HTTPS, culling, limits, its own config.

The story: `doit install_hub` installs a hub that serves the office's own certificate (made here,
signed by a test CA) on its HTTPS port and only redirects on its plain-HTTP port; two system
users log in over HTTPS. Their local servers carry the memory limit. A file in
`etc/jupyterhub_config.d/` takes effect, survives re-runs and, when changed, only restarts the
hub. `doit hub_status` says what runs. With a one-minute culling setting the idle user's server is
stopped and the active one's is not. Then the hub switches to Let's Encrypt, played by Pebble
(Let's Encrypt's test server, Debian's `pebble`) on loopback, which checks the HTTP-01 challenge
for real against the hub's plain-HTTP port (its DNS is Pebble's own test DNS server, answering
127.0.0.1 for every name); the certificate is requested once (by the hub's service answering
the challenge, or, with no hub running, by the step's own listener), renewed by a re-run when
it has fewer than 30 days left and by the hub's own service between runs, and a user's server
survives both.

Needs root (users, PAM, ports), PyPI and npm (the hub's packages), openssl, and Debian's pebble.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tasks.core.settings import load_settings
from tasks.hub.layout import HubLayout
from tasks.hub.payload import tls_service
from tasks.hub.render import written_ports
from tasks.hub.steps import STEPS
from tasks.hub.tls import renewal_units
from tests.conftest import free_ports
from tests.test_hub import (HubSite, add_user, hub_in, log_in_and_open_lab, missing,
                            processes_of, processes_under, public_tempdir, single_user_servers,
                            written_config)

MEM_LIMIT = "2G"
MEM_LIMIT_BYTES = 2 * 1024 ** 3
DOMAIN = "hub.hubworks.test"
ANNOUNCEMENT = "Office hub: log in with your Unix account"


# ---- certificates made here --------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_key(folder: Path, name: str) -> Path:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name,
            cwd=folder)
    return folder / name


def sign_certificate(folder: Path, name: str, key: Path, *, ca: Path, ca_key: Path,
                     names: list[str], days: int) -> Path:
    """A server certificate for ``names`` (DNS names or IP addresses) signed by ``ca``."""
    san = ",".join(f"IP:{n}" if re.fullmatch(r"[\d.]+", n) else f"DNS:{n}" for n in names)
    (folder / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
    openssl("req", "-new", "-key", str(key), "-subj", f"/CN={names[0]}", "-out", f"{name}.csr",
            cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca), "-CAkey", str(ca_key),
            "-set_serial", str(secrets.randbits(63)), "-days", str(days),
            "-extfile", f"{name}.ext", "-out", name, cwd=folder)
    return folder / name


def make_office_certificates(folder: Path) -> None:
    """The office's CA, and a certificate and key for the hub at 127.0.0.1 / localhost."""
    ca_key = make_key(folder, "ca.key")
    openssl("req", "-x509", "-key", "ca.key", "-subj", "/CN=hubworks test office CA",
            "-days", "30", "-out", "ca.pem", cwd=folder)
    key = make_key(folder, "hub.key")
    sign_certificate(folder, "hub.crt", key, ca=folder / "ca.pem", ca_key=ca_key,
                     names=["127.0.0.1", "localhost"], days=365)
    make_key(folder, "other.key")  # belongs to no certificate
    for path in folder.iterdir():
        path.chmod(0o600)


def served_certificate(site: HubSite, verify_with: Path | None = None,
                       hostname: str | None = None) -> bytes:
    """The certificate the hub's HTTPS port presents; verified when ``verify_with`` is given."""
    if verify_with:
        context = ssl.create_default_context(cafile=str(verify_with))
    else:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", site.ports["port"]), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=hostname) as tls:
        return tls.getpeercert(binary_form=True)


def leaf(pem_file: Path) -> bytes:
    return tls_service.first_certificate(pem_file.read_bytes())


# ---- the hub --------------------------------------------------------------------------------

@dataclass
class NetSite(HubSite):
    other_user: str = ""
    other_password: str = ""
    office: Path = Path()  # the office's CA, certificate and keys

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['port']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http_port']}"

    def session(self) -> requests.Session:
        """A browser that trusts the office's CA."""
        session = requests.Session()
        session.verify = str(self.office / "ca.pem")
        session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, wins over verify
        return session

    def uid(self, user: str) -> int:
        return pwd.getpwnam(user).pw_uid

    def log(self) -> str:
        return (self.prefix / "var" / "jupyterhub.log").read_text(errors="replace")

    def server_pid(self, user: str) -> int | None:
        uid = self.uid(user)
        return next((pid for pid, owner in single_user_servers(self).items() if owner == uid),
                    None)


@pytest.fixture(scope="module")
def site():
    if os.geteuid() != 0:
        missing("root: installing a hub, binding its ports and adding users need it")
    if shutil.which("openssl") is None:
        missing("openssl (Debian: apt-get install openssl) to make test certificates")
    stem = f"hwnet{os.getpid() % 100000}"
    users = {f"{stem}a": add_user(f"{stem}a"), f"{stem}b": add_user(f"{stem}b")}
    (active, active_password), (idle, idle_password) = users.items()
    root = Path(tempfile.mkdtemp(prefix="hubworks-ws-"))
    office = Path(tempfile.mkdtemp(prefix="hubworks-office-"))
    outer = public_tempdir("hubworks-prefix-")
    make_office_certificates(office)
    port, http_port, hub_port, api_port = free_ports(4)
    site = NetSite(root, outer / "hub", active, active_password,
                   {"port": port, "http_port": http_port, "hub_port": hub_port,
                    "proxy_api_port": api_port},
                   other_user=idle, other_password=idle_password, office=office)
    (root / "hubworks.toml").write_text(
        f'[hub]\nprefix = "{site.prefix}"\nport = {port}\nhttp_port = {http_port}\n'
        f'hub_port = {hub_port}\nproxy_api_port = {api_port}\n'
        f'allowed_users = ["{active}", "{idle}"]\n'
        f'https = "files"\ntls_cert = "{office / "hub.crt"}"\ntls_key = "{office / "hub.key"}"\n'
        f'mem_limit = "{MEM_LIMIT}"\n')
    try:
        site.runs["install"] = site.install()
        yield site
    finally:
        site.doit("hub_stop")
        leftovers = processes_under(site.prefix)
        for user in users:
            uid = site.uid(user)
            leftovers.update({pid: uid for pid in processes_of(uid)})
        for pid in leftovers:  # only if hub_stop failed: what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(processes_of(site.uid(u)) for u in users) and time.monotonic() < deadline:
            time.sleep(0.1)
        for user in users:
            subprocess.run(["userdel", "-r", user], capture_output=True)
        for folder in (outer, root, office):
            shutil.rmtree(folder, ignore_errors=True)


# ---- HTTPS with the office's certificate ---------------------------------------------------

@pytest.mark.slow
def test_the_install_serves_the_offices_certificate_and_culls_by_default(site):
    run = site.runs["install"]
    assert {"idle_culler", "tls", "config", "health"} <= run.executed, run.output
    assert f"https://127.0.0.1:{site.ports['port']}/hub/health answers 200" in run.output
    served = served_certificate(site, verify_with=site.office / "ca.pem", hostname="localhost")
    assert served == leaf(site.office / "hub.crt")


@pytest.mark.slow
def test_a_user_logs_in_over_https_and_gets_the_lab_with_secure_cookies(site):
    session = site.session()
    lab = log_in_and_open_lab(site, session=session)
    assert "JupyterLab" in lab.text
    assert lab.url.startswith("https://")
    names = {cookie.name for cookie in session.cookies}
    assert {"jupyterhub-session-id", "jupyterhub-hub-login"} <= names, names
    assert all(cookie.secure for cookie in session.cookies), \
        [cookie.name for cookie in session.cookies if not cookie.secure]


@pytest.mark.slow
def test_plain_http_only_redirects_to_https(site):
    # no hub.domain and every interface: the hub's own name, whatever Host the client sends
    own = f"https://{os.uname().nodename}:{site.ports['port']}"
    for host in ({}, {"Host": "evil.example.net"}):
        answer = requests.get(f"{site.http_url}/hub/login?next=%2Fhub%2F", headers=host,
                              allow_redirects=False, timeout=10)
        assert answer.status_code == 301
        assert answer.headers["Location"] == f"{own}/hub/login?next=%2Fhub%2F"
        assert not answer.content  # nothing but the redirect goes over plain HTTP
    # where it leads: the hub over HTTPS with the office's certificate
    followed = requests.get(f"{site.url}/hub/login", timeout=30,
                            verify=str(site.office / "ca.pem"))
    assert followed.status_code == 200


@pytest.mark.slow
def test_the_private_key_the_proxy_reads_is_root_only(site):
    tls = site.prefix / "secrets" / "tls"
    key = tls / "privkey.pem"
    assert key.read_bytes() == (site.office / "hub.key").read_bytes()
    st = key.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700


@pytest.mark.slow
def test_a_key_that_does_not_belong_to_the_certificate_stops_the_tls_step(site):
    before = served_certificate(site)
    run = site.doit("install_hub", env={"HUBWORKS_HUB_TLS_KEY": str(site.office / "other.key")})
    assert run.returncode != 0
    assert "FAILED install_hub:tls" in run.output
    assert (f"{site.office / 'hub.crt'} and {site.office / 'other.key'} (hub.tls_cert, "
            f"hub.tls_key) cannot serve HTTPS together") in run.output, run.output
    assert "fix: name the certificate" in run.output
    key = site.prefix / "secrets" / "tls" / "privkey.pem"
    assert key.read_bytes() == (site.office / "hub.key").read_bytes()
    assert served_certificate(site) == before
    assert site.install().executed == set()


# ---- limits --------------------------------------------------------------------------------

def limits_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): line[26:].split()[0] for line in lines}


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.slow
def test_a_local_server_and_its_kernels_carry_the_memory_limit(site):
    session = site.session()
    log_in_and_open_lab(site, session=session)
    pid = site.server_pid(site.user)
    assert pid, single_user_servers(site)
    assert limits_of(pid)["Max address space"] == str(MEM_LIMIT_BYTES)
    assert environment_of(pid)["MEM_LIMIT"] == str(MEM_LIMIT_BYTES)
    xsrf = next(c.value for c in session.cookies
                if c.name == "_xsrf" and c.path.startswith(f"/user/{site.user}"))
    kernel = session.post(f"{site.url}/user/{site.user}/api/kernels", json={},
                          headers={"X-XSRFToken": xsrf}, timeout=60)
    assert kernel.status_code == 201, kernel.text
    try:
        deadline = time.monotonic() + 60
        kernels = []
        while not kernels and time.monotonic() < deadline:
            kernels = [p for p in processes_of(site.uid(site.user))
                       if "ipykernel" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
            time.sleep(0.5)
        assert kernels, "the kernel process never showed"
        assert {limits_of(p)["Max address space"] for p in kernels} == {str(MEM_LIMIT_BYTES)}
    finally:
        session.delete(f"{site.url}/user/{site.user}/api/kernels/{kernel.json()['id']}",
                       headers={"X-XSRFToken": xsrf}, timeout=60)


# ---- the office's own config ---------------------------------------------------------------

@pytest.mark.slow
def test_a_config_d_file_takes_effect_and_only_restarts_the_hub(site):
    office_file = site.prefix / "etc" / "jupyterhub_config.d" / "50-office.py"
    text = f"c.JupyterHub.template_vars = {{'announcement_login': {ANNOUNCEMENT!r}}}\n"
    office_file.write_text(text)
    try:
        added = site.install()
        assert added.executed == {"health"}, added.output
        assert ANNOUNCEMENT in site.session().get(f"{site.url}/hub/login", timeout=30).text
        again = site.install()
        assert again.executed == set(), again.output
        plan = site.doit("install_hub_plan").output
        assert "would run" not in plan, plan
        assert office_file.read_text() == text
        office_file.write_text(text.replace("Unix", "office"))
        changed = site.install()
        assert changed.executed == {"health"}, changed.output
        page = site.session().get(f"{site.url}/hub/login", timeout=30).text
        assert ANNOUNCEMENT.replace("Unix", "office") in page
    finally:
        office_file.unlink()
        assert site.install().executed == {"health"}


# ---- status ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_hub_status_shows_what_runs_the_certificate_and_the_url(site):
    log_in_and_open_lab(site, session=site.session())
    pid = site.server_pid(site.user)
    run = site.doit("hub_status")
    assert run.returncode == 0, run.output
    hub_pid = (site.prefix / "var" / "jupyterhub.pid").read_text().strip()
    assert re.search(rf"^hub +pid {hub_pid}, up [^,]+, https://\S+:{site.ports['port']}/$",
                     run.output, re.M), run.output
    assert re.search(r"^proxy +pid \d+, up ", run.output, re.M), run.output
    assert re.search(r"^  idle-culler +pid \d+, up ", run.output, re.M), run.output
    assert re.search(r"^  hubworks-http +pid \d+, up ", run.output, re.M), run.output
    assert re.search(rf"^  {site.user} +process {pid}, up [^,]+, idle ", run.output, re.M), \
        run.output
    expiry = tls_service.certificate_expiry((site.office / "hub.crt").read_bytes())
    assert f"certificate  expires {expiry:%Y-%m-%d %H:%M} UTC" in run.output


# ---- idle culling --------------------------------------------------------------------------

@pytest.mark.slow
def test_with_a_one_minute_setting_the_idle_server_is_culled_and_the_active_one_is_not(site):
    run = site.install({"HUBWORKS_HUB_CULL_IDLE_MINUTES": "1"})
    assert run.executed == {"config", "health"}, run.output
    try:
        active = site.session()
        log_in_and_open_lab(site, session=active)
        log_in_and_open_lab(site, user=site.other_user, password=site.other_password,
                            session=site.session())
        assert site.server_pid(site.user) and site.server_pid(site.other_user)
        deadline = time.monotonic() + 240
        while site.server_pid(site.other_user) and time.monotonic() < deadline:
            # what a user at work does: the lab asks its server for files
            active.get(f"{site.url}/user/{site.user}/api/contents",
                       timeout=30).raise_for_status()
            time.sleep(10)
        assert site.server_pid(site.other_user) is None, "the idle server ran on for 240 s"
        assert site.server_pid(site.user), "the active user's server was stopped"
        culled = re.findall(r"Culling server (\S+)", site.log())
        assert site.other_user in culled and site.user not in culled, culled
    finally:
        back = site.install()
        assert back.executed == {"config", "health"}, back.output


# ---- Let's Encrypt, played by Pebble -------------------------------------------------------

@dataclass
class Pebble:
    directory: str
    listener_cert: Path  # the ACME client trusts Pebble's HTTPS listener by this
    management: str
    log: Path
    folder: Path

    def fetch(self, what: str) -> Path:
        """Pebble's root CA, intermediate or intermediate key, from its management API."""
        path = self.folder / f"{what.replace('/', '-')}.pem"
        answer = requests.get(f"{self.management}/{what}", verify=str(self.listener_cert),
                              timeout=10)
        answer.raise_for_status()
        path.write_text(answer.text)
        return path

    def issued(self) -> int:
        return self.log.read_text().count("Issued certificate serial")


@pytest.fixture(scope="module")
def pebble(site):
    if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
        missing("Debian's pebble (apt-get install pebble): Let's Encrypt's test ACME server")
    folder = Path(tempfile.mkdtemp(prefix="hubworks-pebble-"))
    key = make_key(folder, "listener.key")
    openssl("req", "-x509", "-key", str(key), "-subj", "/CN=pebble", "-days", "2",
            "-addext", "subjectAltName=IP:127.0.0.1", "-out", "listener.pem", cwd=folder)
    acme, management, dns, dns_management = free_ports(4)
    (folder / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme}", "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": "listener.pem", "privateKey": "listener.key",
        # the HTTP-01 check goes to the hub's plain-HTTP port, as Let's Encrypt's goes to 80
        "httpPort": site.ports["http_port"], "tlsPort": 5001,
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    log = folder / "pebble.log"
    with log.open("w") as out:
        # a test DNS server: every name is 127.0.0.1, so the check reaches this hub
        dns_server = subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{dns_management}"], stdout=out, stderr=out)
        server = subprocess.Popen(
            ["pebble", "-config", "pebble.json", "-dnsserver", f"127.0.0.1:{dns}"], cwd=folder,
            stdout=out, stderr=out,
            env=dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0"))
    found = Pebble(f"https://127.0.0.1:{acme}/dir", folder / "listener.pem",
                   f"https://127.0.0.1:{management}", log, folder)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(found.directory, verify=str(found.listener_cert),
                             timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"Pebble did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield found
    finally:
        for process in (server, dns_server):
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def letsencrypt(pebble: Pebble) -> dict[str, str]:
    return {"HUBWORKS_HUB_HTTPS": "letsencrypt", "HUBWORKS_HUB_DOMAIN": DOMAIN,
            "HUBWORKS_HUB_ACME_DIRECTORY": pebble.directory,
            "HUBWORKS_HUB_ACME_EMAIL": "hub-admin@hubworks.test",
            "HUBWORKS_HUB_ACME_CA_BUNDLE": str(pebble.listener_cert)}


def lineage(site: NetSite) -> Path:
    return site.prefix / "secrets" / "letsencrypt" / "live" / DOMAIN


def make_it_expire_soon(site: NetSite, pebble: Pebble, days: int = 10) -> bytes:
    """Replace the certificate in certbot's lineage by one from the same CA and for the same
    key that expires in ``days``, as if it had been issued long ago; returns it (DER)."""
    live = lineage(site)
    intermediate = pebble.fetch("intermediates/0")
    short = sign_certificate(pebble.folder, "short.pem", live / "privkey.pem",
                             ca=intermediate, ca_key=pebble.fetch("intermediate-keys/0"),
                             names=[DOMAIN], days=days)
    (live / "cert.pem").resolve().write_bytes(short.read_bytes())
    (live / "fullchain.pem").resolve().write_bytes(short.read_bytes()
                                                   + intermediate.read_bytes())
    return leaf(short)


def tls_service_pid(site: NetSite) -> int | None:
    script = str(site.prefix / "libexec" / "hubworks_tls_service.py")
    return next((pid for pid in processes_under(site.prefix)
                 if script in Path(f"/proc/{pid}/cmdline").read_bytes().decode()), None)


@pytest.mark.slow
def test_letsencrypt_the_hub_gets_a_certificate_from_the_acme_server_and_serves_it(site, pebble):
    run = site.install(letsencrypt(pebble))
    assert {"certbot", "tls", "config", "health"} <= run.executed, run.output
    assert pebble.issued() == 1
    # Pebble checked the challenge over plain HTTP, answered by the hub's own service
    assert re.search(r"hubworks-http: 127\.0\.0\.1 \"GET /\.well-known/acme-challenge/\S+ "
                     r"HTTP/1\.1\" 200", site.log() + run.output), site.log()[-3000:]
    served = served_certificate(site, verify_with=pebble.fetch("roots/0"), hostname=DOMAIN)
    assert served == leaf(site.prefix / "secrets" / "tls" / "fullchain.pem")
    assert served == leaf(lineage(site) / "fullchain.pem")
    assert tls_service.days_left((lineage(site) / "fullchain.pem").read_bytes()) > 30
    key = site.prefix / "secrets" / "tls" / "privkey.pem"
    assert key.stat().st_uid == 0 and stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.slow
def test_letsencrypt_a_second_install_requests_nothing(site, pebble):
    run = site.install(letsencrypt(pebble))
    assert run.executed == set(), run.output
    assert re.search(rf"-- install_hub:tls: up to date: the certificate for {DOMAIN} expires "
                     r"\S+ \(\d+ days left\)", run.output), run.output
    assert pebble.issued() == 1


@pytest.mark.slow
def test_letsencrypt_with_no_hub_running_the_step_answers_the_challenge_itself(site, pebble):
    """A new server: no hub runs yet, nothing was ever requested."""
    assert site.doit("hub_stop").returncode == 0
    for folder in ("letsencrypt", "tls"):
        shutil.rmtree(site.prefix / "secrets" / folder)
    before = pebble.issued()
    run = site.install(letsencrypt(pebble))
    assert run.executed == {"tls", "health"}, run.output
    assert pebble.issued() == before + 1
    # answered by the step's own listener: the hub's service was not running
    assert re.search(r"hubworks-http: 127\.0\.0\.1 \"GET /\.well-known/acme-challenge/\S+ "
                     r"HTTP/1\.1\" 200", run.output), run.output
    served = served_certificate(site, verify_with=pebble.fetch("roots/0"), hostname=DOMAIN)
    assert served == leaf(lineage(site) / "fullchain.pem")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_letsencrypt_a_certificate_near_expiry_is_renewed_by_a_rerun_and_servers_survive(
        site, pebble):
    session = site.session()
    session.verify = False  # the certificate names the domain; this connects to 127.0.0.1
    log_in_and_open_lab(site, session=session)
    server = site.server_pid(site.user)
    hub_pid = site.hub_pid()
    short = make_it_expire_soon(site, pebble)
    before = pebble.issued()
    plan = site.doit("install_hub_plan", env=letsencrypt(pebble)).output
    assert re.search(r"would run\s+tls\s+the certificate expires in (9|10) days", plan), plan

    run = site.install(letsencrypt(pebble))
    assert run.executed == {"tls"}, run.output
    assert "the proxy restarted" in run.output
    assert pebble.issued() == before + 1
    served = served_certificate(site, verify_with=pebble.fetch("roots/0"), hostname=DOMAIN)
    assert served not in (short, None)
    assert tls_service.days_left((lineage(site) / "fullchain.pem").read_bytes()) > 30
    assert site.hub_pid() == hub_pid and site.server_pid(site.user) == server
    status = session.get(f"{site.url}/user/{site.user}/api/status", timeout=30)
    assert status.status_code == 200, status.text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_letsencrypt_the_hubs_service_renews_between_runs(site, pebble):
    """Without systemd the hubworks-http service checks the certificate when it starts and
    every 12 hours; here it is stopped, the hub starts it again, and it renews."""
    session = site.session()
    session.verify = False
    log_in_and_open_lab(site, session=session)
    server = site.server_pid(site.user)
    short = make_it_expire_soon(site, pebble)
    before = pebble.issued()
    service = tls_service_pid(site)
    assert service
    os.kill(service, signal.SIGTERM)
    deadline = time.monotonic() + 180
    renewed = False
    while not renewed and time.monotonic() < deadline:
        time.sleep(2)
        try:
            served = served_certificate(site)
        except OSError:
            continue  # the proxy is restarting
        renewed = pebble.issued() == before + 1 and served != short and \
            served == leaf(lineage(site) / "fullchain.pem")
    assert renewed, f"no renewal within 180 s:\n{site.log()[-3000:]}"
    assert tls_service_pid(site) not in (None, service)
    assert site.server_pid(site.user) == server
    assert site.install(letsencrypt(pebble)).executed == set()


# ---- the loaded configuration and settings (no install needed) -----------------------------

def layout(tmp_path: Path, toml: str, **environ: str) -> HubLayout:
    (tmp_path / "hubworks.toml").write_text(f'[hub]\nprefix = "/srv/hub"\n{toml}')
    return HubLayout(load_settings(tmp_path, environ=environ))


def wanted_steps(hub: HubLayout) -> set[str]:
    return {step.name for step in STEPS if step.wanted(hub)}


def test_docker_servers_get_the_limits_as_container_limits(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, 'spawner = "docker"\nmem_limit = "2G"\ncpu_limit = 1.5\n')
    c = written_config(hub, monkeypatch)
    assert (c.Spawner.mem_limit, c.Spawner.cpu_limit) == ("2G", 1.5)
    # the limits do not replace hubworks' spawner: the engine enforces them
    assert c.JupyterHub.spawner_class == "hubworks_spawner.HubworksSpawner"
    https = written_config(hub_in(tmp_path, 'spawner = "docker"\nhttps = "files"\n'),
                           monkeypatch)
    assert "JUPYTER_CONFIG_PATH" not in https.Spawner.get("environment", {})


def test_local_servers_under_systemd_run_in_systemd_units_with_the_limits(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, 'service = "systemd"\nmem_limit = "1G"\n')
    c = written_config(hub, monkeypatch)
    assert c.Spawner.mem_limit == "1G"
    assert c.JupyterHub.spawner_class == "systemdspawner.SystemdSpawner"
    assert "systemdspawner" in wanted_steps(hub)
    assert "systemdspawner" not in wanted_steps(layout(tmp_path, 'service = "systemd"\n'))


def test_local_servers_without_systemd_get_the_memory_limit_per_process(tmp_path, monkeypatch):
    from jupyterhub.spawner import LocalProcessSpawner

    c = written_config(hub_in(tmp_path, 'service = "background"\nmem_limit = "1G"\n'),
                       monkeypatch)
    assert c.Spawner.mem_limit == "1G"
    spawner = c.JupyterHub.spawner_class
    assert issubclass(spawner, LocalProcessSpawner) and "make_preexec_fn" in vars(spawner)
    # what a server's process gets: the spawner's own preexec, run in a child as the hub
    # runs it before exec (as root, for root here), then the limit read back there
    preexec = spawner(config=c).make_preexec_fn(pwd.getpwuid(os.getuid()).pw_name)
    child = subprocess.run(
        [sys.executable, "-c", "import resource; print(*resource.getrlimit(resource.RLIMIT_AS))"],
        preexec_fn=preexec, capture_output=True, text=True, check=True)
    assert child.stdout.split() == [str(1024 ** 3)] * 2
    cpu_only = written_config(hub_in(tmp_path, 'service = "background"\ncpu_limit = 2\n'),
                              monkeypatch)
    assert cpu_only.JupyterHub.spawner_class == "localprocess"


def test_letsencrypt_under_systemd_renews_from_a_timer(tmp_path):
    hub = layout(tmp_path, 'service = "systemd"\nhttps = "letsencrypt"\n'
                           'domain = "hub.example.org"\nport = 443\n')
    assert {"certbot", "tls", "tls_renewal"} <= wanted_steps(hub)
    units = {path.name: text for path, text in renewal_units(hub).items()}
    assert ("ExecStart=/srv/hub/venv/bin/python /srv/hub/libexec/hubworks_tls_service.py renew "
            "/srv/hub/etc/hubworks_tls.json") in units["hubworks-tls-renew.service"]
    assert "OnCalendar=*-*-* 00/12:00:00" in units["hubworks-tls-renew.timer"]
    assert hub.public_url == "https://hub.example.org/"
    files = layout(tmp_path, 'https = "files"\n')
    assert "tls_renewal" not in wanted_steps(files) and "certbot" not in wanted_steps(files)


def test_https_serves_the_kept_certificate_with_secure_cookies(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, 'https = "files"\nport = 443\nhttp_port = 80\n')
    c = written_config(hub, monkeypatch)
    assert c.JupyterHub.bind_url == "https://:443/"
    assert c.JupyterHub.ssl_cert == f"{hub.prefix}/secrets/tls/fullchain.pem"
    assert c.JupyterHub.ssl_key == f"{hub.prefix}/secrets/tls/privkey.pem"
    assert "cookie_options" not in c.JupyterHub  # not a JupyterHub trait: a warning at start
    assert c.JupyterHub.tornado_settings == {"cookie_options": {"secure": True},
                                             "xsrf_cookie_kwargs": {"secure": True}}
    # local servers read the secure _xsrf cookie setting from there
    assert c.Spawner.environment["JUPYTER_CONFIG_PATH"] == f"{hub.prefix}/etc/jupyter"
    (http,) = [s for s in c.JupyterHub.services if s["name"] == "hubworks-http"]
    assert http["command"] == [f"{hub.prefix}/venv/bin/python",
                               f"{hub.prefix}/libexec/hubworks_tls_service.py", "serve",
                               "--http-port", "80", f"{hub.prefix}/etc/hubworks_tls.json"]
    no_redirect = written_config(hub_in(tmp_path, 'https = "files"\nhttp_port = 0\n'),
                                 monkeypatch)
    assert "hubworks-http" not in [s["name"] for s in no_redirect.JupyterHub.services]
    plain = written_config(hub_in(tmp_path), monkeypatch)
    assert "ssl_cert" not in plain.JupyterHub and "JUPYTER_CONFIG_PATH" not in \
        plain.Spawner.environment


def test_the_ports_the_written_config_names_are_the_running_hubs_own(tmp_path, monkeypatch):
    hub = hub_in(tmp_path, 'https = "files"\nport = 8443\nhttp_port = 8080\nhub_port = 8081\n'
                           'proxy_api_port = 8082\n')
    written_config(hub, monkeypatch)
    assert written_ports(hub) == {"port": 8443, "http_port": 8080, "hub_port": 8081,
                                  "proxy_api_port": 8082}
    # a hub installed before the config became data: its jupyterhub_config.py says them
    hub.config_data_file.unlink()
    hub.config_file.write_text("c.JupyterHub.bind_url = 'https://:8443/'\n"
                               "c.JupyterHub.hub_port = 8081\n")
    assert written_ports(hub) == {"port": 8443, "hub_port": 8081}


def culler(config) -> list[str] | None:
    found = [s["command"] for s in config.JupyterHub.get("services", [])
             if s["name"] == "idle-culler"]
    return found[0] if found else None


def test_culling_is_on_by_default_and_off_at_zero(tmp_path, monkeypatch):
    c = written_config(hub_in(tmp_path), monkeypatch)
    assert culler(c)[-3:] == ["--timeout=3600", "--max-age=0", "--cull-every=300"]
    assert {"name": "idle-culler", "services": ["idle-culler"],
            "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]} \
        in c.JupyterHub.load_roles
    assert c.JupyterHub.last_activity_interval == 300
    assert c.Spawner.environment["JUPYTERHUB_ACTIVITY_INTERVAL"] == "300"
    off = written_config(hub_in(tmp_path, "cull_idle_minutes = 0\n"), monkeypatch)
    assert culler(off) is None
    assert "idle-culler" not in [role["name"] for role in off.JupyterHub.load_roles]
    assert "idle_culler" not in wanted_steps(layout(tmp_path, "cull_idle_minutes = 0\n"))
    aged = written_config(hub_in(tmp_path, "cull_idle_minutes = 0\ncull_max_age_hours = 8\n"),
                          monkeypatch)
    assert culler(aged)[-3:-1] == ["--timeout=28800", "--max-age=28800"]


def test_the_plain_http_port_redirects_and_answers_acme_challenges(tmp_path):
    webroot = tmp_path / "webroot"
    challenges = webroot / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / "tok-EN_1").write_text("tok-EN_1.thumbprint")
    (port,) = free_ports(1)
    conf = {"domain": "", "listen_ip": "127.0.0.1", "https_port": 443, "webroot": str(webroot),
            "redirect_host": "hub.example.org"}
    with tls_service.http_listener(conf, port):
        base = f"http://127.0.0.1:{port}"
        challenge = requests.get(f"{base}/.well-known/acme-challenge/tok-EN_1", timeout=5)
        assert challenge.status_code == 200 and challenge.text == "tok-EN_1.thumbprint"
        for path in ("/.well-known/acme-challenge/nope", "/.well-known/acme-challenge/..%2f"):
            assert requests.get(base + path, timeout=5).status_code == 404
        # the hub's own name, whatever Host the request claims (no open redirect)
        moved = requests.get(f"{base}/user/a/lab?x=1", allow_redirects=False, timeout=5,
                             headers={"Host": "evil.example.net:80"})
        assert moved.status_code == 301
        assert moved.headers["Location"] == "https://hub.example.org/user/a/lab?x=1"
        posted = requests.post(f"{base}/hub/login", allow_redirects=False, timeout=5)
        assert posted.status_code == 308


def test_redirects_go_to_the_domain_or_the_hubs_own_address(tmp_path):
    from tasks.hub.tls import service_conf

    named = layout(tmp_path, 'https = "files"\ndomain = "hub.example.org"\n')
    assert service_conf(named)["redirect_host"] == "hub.example.org"
    by_address = layout(tmp_path, 'https = "files"\nip = "192.0.2.7"\n')
    assert service_conf(by_address)["redirect_host"] == "192.0.2.7"
    everywhere = layout(tmp_path, 'https = "files"\n')
    assert service_conf(everywhere)["redirect_host"] == os.uname().nodename


def office_files_hub(tmp_path: Path, monkeypatch, *, days: int, key_mode: int):
    """A hub in tmp_path serving a self-signed certificate with ``days`` left, its key file
    with ``key_mode``; the TLS step run once."""
    from tasks.hub.tls import ensure_tls

    certs = tmp_path / "certs"
    certs.mkdir()
    key = make_key(certs, "hub.key")
    openssl("req", "-x509", "-key", str(key), "-subj", "/CN=localhost", "-days", str(days),
            "-out", "hub.crt", cwd=certs)
    key.chmod(key_mode)
    hub = hub_in(tmp_path, f'https = "files"\ntls_cert = "{certs / "hub.crt"}"\n'
                           f'tls_key = "{key}"\n')
    hub.tls_dir.parent.mkdir(parents=True)  # what the prefix and secrets steps make
    return hub, key, ensure_tls(hub)


def test_a_world_readable_source_key_gets_a_warning(tmp_path, monkeypatch):
    from tasks.hub.tls import check_tls

    hub, key, said = office_files_hub(tmp_path, monkeypatch, days=300, key_mode=0o644)
    assert f"warning: {key} (hub.tls_key) is readable by every user of this server" in said
    check = check_tls(hub)
    assert check.ok and f"chmod 600 {key}" in check.says
    key.chmod(0o600)
    assert "warning" not in check_tls(hub).says


def test_a_certificate_near_its_end_makes_the_plan_say_so(tmp_path, monkeypatch):
    from tasks.hub.tls import check_tls

    hub, _, _ = office_files_hub(tmp_path, monkeypatch, days=10, key_mode=0o600)
    check = check_tls(hub)
    assert check.ok, check.says
    assert "fewer than 14 days left: replace it (hub.tls_cert) soon" in check.says


def test_an_encrypted_key_is_named_with_how_to_give_an_unencrypted_one(tmp_path, monkeypatch):
    from tasks.core.errors import HubworksError

    certs = tmp_path / "certs"
    certs.mkdir()
    plain = make_key(certs, "plain.key")
    openssl("req", "-x509", "-key", str(plain), "-subj", "/CN=localhost", "-days", "300",
            "-out", "hub.crt", cwd=certs)
    openssl("pkey", "-in", "plain.key", "-aes256", "-passout", "pass:secret", "-out",
            "hub.key", cwd=certs)
    hub = hub_in(tmp_path, f'https = "files"\ntls_cert = "{certs / "hub.crt"}"\n'
                           f'tls_key = "{certs / "hub.key"}"\n')
    hub.tls_dir.parent.mkdir(parents=True)  # what the prefix and secrets steps make
    from tasks.hub.tls import ensure_tls
    with pytest.raises(HubworksError) as caught:
        ensure_tls(hub)
    assert f"{certs / 'hub.key'} (hub.tls_key) is encrypted with a passphrase" in str(caught.value)
    assert f"openssl pkey -in {certs / 'hub.key'} -out <plain key>" in str(caught.value)


def test_the_expiry_read_from_the_certificate_is_the_one_openssl_reads(tmp_path):
    key = make_key(tmp_path, "k.pem")
    for days in (3, 20000):  # UTCTime until 2049, GeneralizedTime after
        openssl("req", "-x509", "-key", str(key), "-subj", "/CN=x", "-days", str(days),
                "-out", "c.pem", cwd=tmp_path)
        said = subprocess.run(["openssl", "x509", "-in", "c.pem", "-noout", "-enddate"],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        expiry = tls_service.certificate_expiry((tmp_path / "c.pem").read_bytes())
        assert said.strip() == f"notAfter={expiry:%b %e %H:%M:%S %Y} GMT"


@pytest.mark.parametrize("toml, expected", [
    ('mem_limit = "lots"\n', "hub.mem_limit from"),
    ('cpu_limit = -1\n', "is -1.0, below 0"),
    ('cull_idle_minutes = -5\n', "is -5, below 0"),
    ('acme_directory = "http://acme.example.org/dir"\n', "not an https:// URL"),
    ('http_port = 70000\n', "which is not a port"),
])
def test_network_settings_that_cannot_work_are_refused(tmp_path, toml, expected):
    from tasks.core.errors import HubworksError
    with pytest.raises(HubworksError) as caught:
        layout(tmp_path, toml)
    assert expected in str(caught.value) and "fix:" in str(caught.value)
