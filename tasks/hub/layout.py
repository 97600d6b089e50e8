"""Where everything of an installed hub lives under the prefix, and what its settings choose."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..core.netaddr import listens_everywhere, local_address, url_host
from ..core.settings import Section, Settings

UNIT_NAME = "jupyterhub.service"
PODMAN_UNIT_NAME = "jupyterhub-podman.service"
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
PROXY_PACKAGE = "configurable-http-proxy"


@dataclass(frozen=True)
class HubLayout:
    """The hub's files, derived from settings; nothing here touches the disk."""

    settings: Settings

    @property
    def hub_settings(self) -> Section:
        """The [hub] section of hubworks.toml: ``hub.hub_settings.port``."""
        return self.settings.hub

    @property
    def prefix(self) -> Path:
        return self.hub_settings.prefix

    # venv: readable and executable by every user, their servers run from it
    @property
    def venv(self) -> Path:
        """A link to the venv in use (one of venvs/): config, units and servers name this."""
        return self.prefix / "venv"

    @property
    def venvs(self) -> Path:
        """Every venv install_hub built, each beside the last: an upgrade can switch back."""
        return self.prefix / "venvs"

    @property
    def venv_bin(self) -> Path:
        return self.venv / "bin"

    @property
    def venv_python(self) -> Path:
        return self.venv_bin / "python"

    @property
    def jupyterhub(self) -> Path:
        return self.venv_bin / "jupyterhub"

    def site_packages(self) -> Path | None:
        found = sorted((self.venv / "lib").glob("python3*/site-packages"))
        return found[-1] if found else None

    # npm prefix: node_modules/configurable-http-proxy
    @property
    def node_modules(self) -> Path:
        return self.prefix / "node_modules"

    @property
    def proxies(self) -> Path:
        """Each proxy release under its own npm prefix; node_modules links to the one in use."""
        return self.prefix / "proxies"

    @property
    def proxy_dir(self) -> Path:
        return self.node_modules / PROXY_PACKAGE

    @property
    def proxy_script(self) -> Path:
        return self.proxy_dir / "bin" / PROXY_PACKAGE

    # etc: configuration, world-readable, holds no secret
    @property
    def etc(self) -> Path:
        return self.prefix / "etc"

    @property
    def config_file(self) -> Path:
        """The same on every hub: it applies config_data_file (see payload/)."""
        return self.etc / "jupyterhub_config.py"

    @property
    def config_data_file(self) -> Path:
        """The hub's settings as data, written by install_hub; it names secrets, holds none."""
        return self.etc / "hubworks_config.json"

    @property
    def proxy_releases_file(self) -> Path:
        return self.etc / "proxy-releases.json"

    # spawner = docker: what the hub offers and the code it runs them with
    @property
    def images_file(self) -> Path:
        return self.etc / "images.json"

    @property
    def spawner_module(self) -> Path:
        return self.etc / "hubworks_spawner.py"

    @property
    def podman_env_file(self) -> Path:
        return self.etc / "podman-service.env"

    # the office's own config, and what HTTPS needs
    @property
    def config_d(self) -> Path:
        """The office's own config files, loaded last; install_hub never writes them."""
        return self.etc / "jupyterhub_config.d"

    @property
    def tls_service_conf(self) -> Path:
        return self.etc / "hubworks_tls.json"

    @property
    def server_config_dir(self) -> Path:
        """Jupyter config every local server reads (JUPYTER_CONFIG_PATH), e.g. for HTTPS."""
        return self.etc / "jupyter"

    # libexec: programs the hub runs as services, world-readable
    @property
    def libexec(self) -> Path:
        return self.prefix / "libexec"

    @property
    def tls_service_script(self) -> Path:
        return self.libexec / "hubworks_tls_service.py"

    @property
    def images_service_script(self) -> Path:
        """The Images page (/services/images/), run by the hub as its service ``images``."""
        return self.libexec / "hubworks_images_service.py"

    @property
    def images_service_templates(self) -> Path:
        return self.libexec / "hubworks_images_templates"

    @property
    def images_service_conf(self) -> Path:
        return self.etc / "hubworks_images.json"

    # secrets: root only
    @property
    def secrets(self) -> Path:
        return self.prefix / "secrets"

    @property
    def cookie_secret(self) -> Path:
        return self.secrets / "jupyterhub_cookie_secret"

    @property
    def proxy_token(self) -> Path:
        return self.secrets / "proxy_auth_token"

    @property
    def status_token(self) -> Path:
        """API token of the hubworks-status service, which `doit hub_status` uses."""
        return self.secrets / "status_api_token"

    @property
    def tls_dir(self) -> Path:
        """The certificate and key the proxy serves (copies; the key 0600)."""
        return self.secrets / "tls"

    @property
    def tls_cert_file(self) -> Path:
        return self.tls_dir / "fullchain.pem"

    @property
    def tls_key_file(self) -> Path:
        return self.tls_dir / "privkey.pem"

    @property
    def letsencrypt_dir(self) -> Path:
        """certbot's configuration: ACME account and certificate lineage."""
        return self.secrets / "letsencrypt"

    # var: database, pid files, log; root only
    @property
    def var(self) -> Path:
        return self.prefix / "var"

    @property
    def database(self) -> Path:
        return self.var / "jupyterhub.sqlite"

    @property
    def pid_file(self) -> Path:
        return self.var / "jupyterhub.pid"

    @property
    def proxy_pid_file(self) -> Path:
        return self.var / "jupyterhub-proxy.pid"

    @property
    def log_file(self) -> Path:
        return self.var / "jupyterhub.log"

    @property
    def upgrade_file(self) -> Path:
        """An upgrade under way: what to switch back to if the new version fails."""
        return self.var / "upgrade.json"

    @property
    def backup_dir(self) -> Path:
        """hub_backup's archives, root-only."""
        return self.hub_settings.backup_dir or self.prefix / "backups"

    # podman's Docker-compatible API service: its socket lives in root-only var/
    @property
    def podman_socket(self) -> Path:
        return self.var / "podman.sock"

    @property
    def podman_pid_file(self) -> Path:
        return self.var / "podman-service.pid"

    @property
    def podman_log_file(self) -> Path:
        return self.var / "podman-service.log"

    @property
    def acme_webroot(self) -> Path:
        """certbot writes ACME challenge files here; port hub.http_port serves them."""
        return self.var / "acme-webroot"

    @property
    def unit_file(self) -> Path:
        return SYSTEMD_UNIT_DIR / UNIT_NAME

    @property
    def unit_link(self) -> Path:
        return SYSTEMD_UNIT_DIR / "multi-user.target.wants" / UNIT_NAME

    @property
    def podman_unit_file(self) -> Path:
        return SYSTEMD_UNIT_DIR / PODMAN_UNIT_NAME

    @property
    def podman_unit_link(self) -> Path:
        return SYSTEMD_UNIT_DIR / "multi-user.target.wants" / PODMAN_UNIT_NAME

    # choices
    def choice(self, key: str) -> str:
        """A [hub] setting with a fixed set of values; loading the settings refused others."""
        return getattr(self.hub_settings, key)

    @cached_property
    def uses_systemd(self) -> bool:
        service = self.choice("service")
        if service == "auto":
            return systemd_is_running()
        return service == "systemd"

    @property
    def uses_docker(self) -> bool:
        return self.choice("spawner") == "docker"

    @property
    def needs_root_to_run(self) -> bool:
        """PAM reads the password database; local servers start as their users; the engine's
        socket (Docker's, or podman's under var/) is root's unless hub.docker_url names another."""
        return (self.choice("authenticator") == "pam" or self.choice("spawner") == "local"
                or not self.hub_settings.docker_url)

    @property
    def listens_everywhere(self) -> bool:
        return listens_everywhere(self.hub_settings.ip)

    @property
    def https(self) -> str:
        return self.choice("https")

    @property
    def scheme(self) -> str:
        return "http" if self.https == "off" else "https"

    @property
    def redirects_http(self) -> bool:
        """With HTTPS, hub.http_port answers plain HTTP (redirects, ACME challenges)."""
        return self.https != "off" and self.hub_settings.http_port != 0

    @property
    def local_host(self) -> str:
        """Where this machine reaches the proxy."""
        return local_address(self.hub_settings.ip)

    @property
    def local_url(self) -> str:
        """The proxy as this machine reaches it."""
        return f"{self.scheme}://{url_host(self.local_host)}:{self.hub_settings.port}/"

    @property
    def health_url(self) -> str:
        return f"{self.local_url}hub/health"

    @property
    def public_host(self) -> str:
        """The name users reach the hub by: hub.domain, else this machine's name or address."""
        return self.hub_settings.domain or (os.uname().nodename if self.listens_everywhere
                                            else self.hub_settings.ip)

    @property
    def public_url(self) -> str:
        default_port = {"http": 80, "https": 443}[self.scheme]
        port = "" if self.hub_settings.port == default_port else f":{self.hub_settings.port}"
        return f"{self.scheme}://{url_host(self.public_host)}{port}/"


def systemd_is_running() -> bool:
    """sd_booted(): systemd is PID 1 exactly when this directory exists."""
    return os.path.isdir("/run/systemd/system")
