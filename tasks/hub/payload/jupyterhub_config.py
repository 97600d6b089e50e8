"""JupyterHub's configuration on a hub that ``doit install_hub`` installed (hubworks).

This file is the same on every hub. It reads ``hubworks_config.json`` beside it, which
install_hub writes from the ``[hub]`` settings (change those and re-run rather than editing
either file), and applies its sections to ``c`` in order, a later value winning. Then it loads
every ``jupyterhub_config.d/*.py`` in name order, so the office's own files override anything.

A section holds, besides its ``section`` name and what it is ``about``:

- ``set``: ``{"Class.trait": value}``, assigned as they are;
- ``set_from_files``: ``{"Class.trait": file}``, the file's text (secrets stay in their files);
- ``services``, ``roles``: added to ``JupyterHub.services`` and ``JupyterHub.load_roles``; a
  service's ``api_token_file`` becomes its ``api_token``, read from that file;
- ``environment``: added to ``Spawner.environment``;
- ``import_path``: folders put first on ``sys.path`` (hubworks' spawner module lives in etc/);
- ``hub_ip_from_engine``: ``{"docker_url", "images_file"}``: the hub listens on the gateway of
  the container engine's bridge, asked when JupyterHub applies this configuration;
- ``limit_address_space``: local servers get ``RLIMIT_AS`` = ``Spawner.mem_limit``;
- ``load_config_d``: the folder of the office's own files.

Runs in the hub's venv as root: the standard library, traitlets and JupyterHub only.
"""

import glob
import json
import os
import sys

from traitlets.config.loader import DeferredConfig

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hubworks_config.json")
FIX = "run `doit install_hub` (as root), which writes it"


def read_data(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"hubworks: cannot read the hub's settings {path} ({exc}); fix: {FIX}")


def read_secret(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError as exc:
        raise SystemExit(f"hubworks: cannot read {path} ({exc.strerror}); fix: {FIX}")


def set_trait(config, path, value):
    section, _, name = path.partition(".")
    config[section][name] = value


class BridgeGateway(DeferredConfig):
    """The gateway of the engine's bridge (hubworks_spawner.hub_address), asked only when
    JupyterHub applies the value, and once for hub_ip and hub_connect_ip together."""

    found = {}  # a class attribute: the copies traitlets makes share it

    def __init__(self, docker_url, images_file):
        self.docker_url, self.images_file = docker_url, images_file

    def get_value(self, trait):
        key = (self.docker_url, self.images_file)
        if key not in self.found:
            from hubworks_spawner import hub_address

            self.found[key] = hub_address(*key)
        return self.found[key]

    def __repr__(self):
        return f"BridgeGateway({self.docker_url!r}, {self.images_file!r})"


def address_space_limited_spawner():
    """Without systemd there is no cgroup: each process of a local server (the server, every
    kernel) may map at most mem_limit; the CPU limit is not enforced."""
    import resource

    from jupyterhub.spawner import LocalProcessSpawner

    class AddressSpaceLimitedSpawner(LocalProcessSpawner):
        def make_preexec_fn(self, name):
            become_user, limit = super().make_preexec_fn(name), self.mem_limit

            def preexec():
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                become_user()
            return preexec

    return AddressSpaceLimitedSpawner


def apply_data(config, data, load_subconfig):
    services, roles, environment = [], [], {}
    for section in data["sections"]:
        for key, value in section.items():
            if key in ("section", "about"):
                continue
            if key == "set":
                for path, item in value.items():
                    set_trait(config, path, item)
            elif key == "set_from_files":
                for path, secret_file in value.items():
                    set_trait(config, path, read_secret(secret_file))
            elif key == "services":
                for service in value:
                    service = dict(service)
                    if "api_token_file" in service:
                        service["api_token"] = read_secret(service.pop("api_token_file"))
                    services.append(service)
                config.JupyterHub.services = services
            elif key == "roles":
                roles.extend(value)
                config.JupyterHub.load_roles = roles
            elif key == "environment":
                environment.update(value)
                config.Spawner.environment = environment
            elif key == "import_path":
                sys.path[:0] = [folder for folder in value if folder not in sys.path]
            elif key == "hub_ip_from_engine":
                gateway = BridgeGateway(value["docker_url"], value["images_file"])
                config.JupyterHub.hub_ip = config.JupyterHub.hub_connect_ip = gateway
            elif key == "limit_address_space":
                config.JupyterHub.spawner_class = address_space_limited_spawner()
            elif key == "load_config_d":
                for path in sorted(glob.glob(os.path.join(value, "*.py"))):
                    load_subconfig(path)
            else:
                raise SystemExit(f"hubworks: {DATA_FILE} has {key!r} in its section "
                                 f"{section.get('section')!r}, which this file does not know; "
                                 f"fix: {FIX} again with the same hubworks")


apply_data(get_config(), read_data(DATA_FILE), load_subconfig)  # noqa: F821
