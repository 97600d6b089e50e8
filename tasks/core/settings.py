"""Every hubworks setting, in one place.

A setting has a built-in default, can be set in ``hubworks.toml`` at the workspace root
(``[section] key = value``) and can be overridden by the environment variable
``HUBWORKS_<SECTION>_<KEY>`` (for example ``HUBWORKS_CHANNEL_PORT=8010``). Lists in the
environment are comma-separated; booleans accept 1/0, true/false, yes/no, on/off.

The workspace root is the directory doit runs in (the folder of ``dodo.py``, or the one
given with ``doit -d``); relative paths in settings are relative to it.

``doit settings`` prints every effective value and where it came from; the settings table
in docs/settings.md is generated from ``SETTINGS`` below (a test keeps the two in step).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .errors import HubworksError

CONFIG_FILE = "hubworks.toml"
ENV_PREFIX = "HUBWORKS_"
# A channel token stands in a URL path (/t/<token>/); shorter ones can be guessed.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]+")
MIN_TOKEN_LENGTH = 16
# Memory as JupyterHub reads it from a string (ByteSpecification): a number with K, M, G or
# T (powers of 1024); it refuses a string of bare digits.
BYTES_PATTERN = re.compile(r"(\d+(?:\.\d+)?)([KMGT])")
BYTE_UNITS = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
HIGHEST_PORT = 65535


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    help: str
    # "path": a str resolved against the workspace root (empty stays empty); "port" (1 to
    # 65535, and 0 when `zero` says what it does), "token", "url", "https_url", "bytes" (2G,
    # 512M): values checked when the settings are read
    kind: str = ""
    # The values that work, where there is a fixed set: the one list of them in hubworks.
    choices: tuple[str, ...] = ()
    # A number's bounds (an amount of memory's, for "bytes", written like "256M"); None: open.
    minimum: float | str | None = None
    maximum: float | None = None
    # What 0 (an empty amount of memory) does, e.g. "picks a free port"; a port without it
    # refuses 0.
    zero: str = ""

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section}_{self.key}".upper()

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def bounds(self) -> tuple[float | str | None, float | None]:
        """The smallest and largest value that work (None: no bound)."""
        if self.kind == "port":
            return (0 if self.zero else 1), HIGHEST_PORT
        return self.minimum, self.maximum


SETTINGS: list[Setting] = [
    # workspace
    Setting("workspace", "state_dir", ".hubworks",
            "Scratch space: build directories, logs, doit's database. Never inside channel/.",
            kind="path"),
    # recipes
    Setting("recipes", "dir", "recipes", "Folder of recipes, one sub-folder per recipe.",
            kind="path"),
    Setting("recipes", "channels", ["conda-forge"],
            "Upstream channels for recipes that need packages no internal recipe makes. "
            "A recipe whose requirements are all internal builds offline."),
    Setting("recipes", "package_format", "conda", "Format of the packages builds make.",
            choices=("conda", "tar.bz2")),
    Setting("recipes", "conda_build", "",
            "Command that builds legacy meta.yaml recipes; empty: conda-build or "
            "'conda build' from PATH."),
    Setting("recipes", "log_tail", 30, "Lines of a failed build's log printed with the error.",
            minimum=1),
    Setting("recipes", "republish", "bump",
            "A rebuild whose package is already published with other contents (published "
            "files never change): bump (build it as the next free build number, and say so) "
            "or error.", choices=("bump", "error")),
    # channel
    Setting("channel", "dir", "channel", "The conda channel: build output, indexed and served.",
            kind="path"),
    Setting("channel", "host", "127.0.0.1",
            "Address the channel server binds. Loopback unless a remote engine must reach it."),
    Setting("channel", "port", 8000, "Port of the channel server.", kind="port",
            zero="picks a free port"),
    Setting("channel", "token", "auto",
            "Path token serve_channel requires (/t/<token>/...). auto: a random token when "
            "bound to a non-loopback address, none on loopback; off: never; anything else "
            f"(at least {MIN_TOKEN_LENGTH} letters, digits or ._~-): that token. Image builds "
            "never use it: their server has a fresh token per run.", kind="token"),
    Setting("channel", "public_url", "",
            "URL image builds use to reach the channel (remote engines), without a token; "
            "empty: the served URL.", kind="url"),
    Setting("channel", "url", "",
            "A published channel (any http(s) URL conda clients read) that build_images uses "
            "instead of channel/: no local server, no recipe builds, no local index."),
    # images
    Setting("images", "dir", "images", "Folder of images, one repo2docker repository each.",
            kind="path"),
    Setting("images", "channel_alias", "internal",
            "Name environment.yml files use for the internal channel; replaced by its URL."),
    Setting("images", "prefix", "hubworks", "Tags are <prefix>/<image>:<hash> and :latest."),
    Setting("images", "engine", "auto",
            "Container engine: auto (Docker if its daemon answers, else podman), docker, podman.",
            choices=("auto", "docker", "podman")),
    Setting("images", "network", "host",
            "Network of build containers; host lets them reach a loopback channel. Empty: "
            "the engine's default."),
    Setting("images", "isolation", "",
            "podman only: how RUN steps are isolated; empty: podman's default. chroot works "
            "where podman cannot start containers (nested containers, some cgroup setups).",
            choices=("", "chroot", "oci", "rootless")),
    Setting("images", "push", False, "Push both tags after a build (prefix names the registry)."),
    Setting("images", "user_name", "jovyan", "User repo2docker creates in the images."),
    Setting("images", "user_id", 1000, "Uid of that user; repo2docker refuses 0 (root).",
            minimum=1),
    # publish
    Setting("publish", "url", "",
            "Where publish_channel copies the channel: s3://bucket/prefix or file:///folder "
            "(a plain folder path works too)."),
    Setting("publish", "endpoint_url", "",
            "S3 endpoint of an S3-compatible store (MinIO, Ceph, ...); empty: AWS (or "
            "AWS_ENDPOINT_URL)."),
    Setting("publish", "region", "",
            "S3 region; empty: AWS_REGION / AWS_DEFAULT_REGION / the profile's, else us-east-1."),
    Setting("publish", "force_path_style", False,
            "S3 path-style addressing (endpoint/bucket/key), which most S3-compatible stores "
            "need; false: virtual-host style (bucket.endpoint/key)."),
    # hub
    Setting("hub", "prefix", "/opt/jupyterhub",
            "Where install_hub puts the hub: venv, proxy, config, secrets, database, log. "
            "Every user must be able to enter it (their servers run from its venv).",
            kind="path"),
    Setting("hub", "python", "",
            "Interpreter for the hub's venv; empty: the first Python >= 3.10 every user can run."),
    Setting("hub", "node", "",
            "Node.js that runs the proxy; empty: the first new enough node on PATH or in "
            "/usr/bin, /usr/local/bin. A node named here is never replaced."),
    Setting("hub", "jupyterhub_version", "6.1.1", "JupyterHub release installed in the hub venv."),
    Setting("hub", "jupyterlab_version", "4.6.6", "JupyterLab release installed in the hub venv."),
    Setting("hub", "dockerspawner_version", "14.0.0",
            "DockerSpawner release, installed only when spawner = docker."),
    Setting("hub", "proxy_version", "5.3.0",
            "configurable-http-proxy release from npm. Where the Node.js here cannot run it "
            "(5.2 needs node >= 20; 5.3 pulls commander 15, which needs 22.12), install_hub "
            "takes the newest release of the same major that it can run, and says so."),
    Setting("hub", "ip", "", "Address the hub's proxy listens on; empty: all interfaces."),
    Setting("hub", "port", 8000, "Port users open in the browser.", kind="port"),
    Setting("hub", "hub_port", 8081, "Port of the hub process behind the proxy (loopback).",
            kind="port"),
    Setting("hub", "proxy_api_port", 8001, "Port of the proxy's REST API (loopback).",
            kind="port"),
    Setting("hub", "authenticator", "pam", "pam (system users) or dummy (any password; tests).",
            choices=("pam", "dummy")),
    Setting("hub", "admin_users", [], "Users with admin rights in the hub."),
    Setting("hub", "allowed_users", [],
            "Users who may log in. With allowed_groups also empty, every user the "
            "authenticator accepts may log in."),
    Setting("hub", "allowed_groups", [], "System groups whose members may log in."),
    Setting("hub", "spawner", "local",
            "local (a process per user, run as that user) or docker (a container per user, "
            "of an image build_images made, picked by its folder name).",
            choices=("local", "docker")),
    Setting("hub", "service", "auto",
            "auto: a systemd unit when systemd runs, else hub_start/hub_stop; systemd; background.",
            choices=("auto", "systemd", "background")),
    Setting("hub", "docker_url", "",
            "spawner = docker: the Docker API users' containers run through, e.g. "
            "unix:///var/run/docker.sock. Empty: the engine images.engine chooses; for podman, "
            "the API service install_hub runs on a root-only socket under the prefix."),
    Setting("hub", "default_image", "",
            "spawner = docker: the image (folder name in images/) preselected in the picker; "
            "empty: the first offered, by name."),
    Setting("hub", "spawn_timeout", 60,
            "spawner = docker: seconds a user's server may take to answer after its container "
            "starts; then it is stopped and removed and the user is told.", minimum=1),
    # the Images page (/services/images/): the images, their state, builds
    Setting("hub", "workspace", "",
            "spawner = docker: the hubworks workspace whose images the Images page shows and "
            "builds; empty: the one install_hub runs from.", kind="path"),
    Setting("hub", "image_builders", [],
            "Users who may build on the Images page besides the hub's admins; @name: the "
            "members of the group name."),
    Setting("hub", "images_port", 8002,
            "spawner = docker: port of the Images page's service (loopback; the proxy routes "
            "/services/images/ to it).", kind="port"),
    Setting("hub", "values_file", "hub-values.yaml",
            "Where hub_values writes the zero-to-jupyterhub values (helm upgrade --values).",
            kind="path"),
    # hub on the network: HTTPS, idle culling, per-user limits
    Setting("hub", "https", "off",
            "off (plain HTTP), files (the office's certificate: tls_cert, tls_key) or "
            "letsencrypt (a certificate for hub.domain from acme_directory, renewed before it "
            "expires). With HTTPS, set port = 443.", choices=("off", "files", "letsencrypt")),
    Setting("hub", "http_port", 80,
            "With HTTPS on: plain-HTTP port that only redirects to HTTPS and answers the ACME "
            "challenge (letsencrypt needs it).", kind="port",
            zero="turns the plain-HTTP listener off"),
    Setting("hub", "domain", "",
            "The hub's DNS name: in its URL and, for letsencrypt, on its certificate."),
    Setting("hub", "tls_cert", "",
            "https = files: the certificate (PEM, with its chain); install_hub keeps a copy.",
            kind="path"),
    Setting("hub", "tls_key", "",
            "https = files: its private key (PEM); install_hub keeps a root-only copy (0600).",
            kind="path"),
    Setting("hub", "acme_email", "",
            "letsencrypt: address for the ACME account (expiry notices); empty: none."),
    Setting("hub", "acme_directory", "https://acme-v02.api.letsencrypt.org/directory",
            "letsencrypt: the ACME server's directory URL (Let's Encrypt's staging server, or "
            "an office's own ACME server).", kind="https_url"),
    Setting("hub", "acme_ca_bundle", "",
            "letsencrypt: CA certificates (PEM) that the ACME client trusts for "
            "acme_directory; empty: the public ones.", kind="path"),
    Setting("hub", "certbot_version", "5.8.0",
            "certbot release in the hub venv (https = letsencrypt only)."),
    Setting("hub", "cull_idle_minutes", 60,
            "Stop a user's server after this many minutes without activity "
            "(jupyterhub-idle-culler); at most a year.", minimum=0, maximum=365 * 24 * 60,
            zero="turns idle culling off"),
    Setting("hub", "cull_max_age_hours", 0,
            "Stop a user's server this many hours after it started, active or not; at most a "
            "year.", minimum=0, maximum=365 * 24, zero="sets no maximum age"),
    Setting("hub", "idle_culler_version", "2.0.0",
            "jupyterhub-idle-culler release in the hub venv (cull_idle_minutes > 0 only)."),
    Setting("hub", "mem_limit", "",
            "Memory per user server, e.g. 2G; the smallest allowed leaves room for a Jupyter "
            "server with one idle kernel (about 130M). Containers and systemd get a cgroup "
            "limit; a local server without systemd a per-process address-space limit, where "
            "one kernel alone maps about 1G.", kind="bytes", minimum="256M",
            zero="sets no limit"),
    Setting("hub", "cpu_limit", 0.0,
            "CPUs per user server, e.g. 1.5. Enforced for containers and under systemd; not "
            "without systemd.", minimum=0, zero="sets no limit"),
    Setting("hub", "systemdspawner_version", "1.0.2",
            "jupyterhub-systemdspawner release (local servers with limits under systemd only)."),
    # hub backups (hub_backup, hub_restore, and the one an upgrade takes first)
    Setting("hub", "backup_dir", "",
            "Where hub_backup writes its archives (root-only); empty: backups/ under the prefix.",
            kind="path"),
    Setting("hub", "backup_keep", 7, "hub_backup keeps this many newest archives.", minimum=1),
    Setting("hub", "backup_homes", False,
            "spawner = local: also back up the users' home folders (the docker spawner's home "
            "volumes are always in the backup)."),
]

_BY_NAME = {(s.section, s.key): s for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def declared(section: str, key: str) -> Setting:
    """One setting's declaration: its choices and bounds, for code that checks a value itself."""
    return _BY_NAME[(section, key)]


class Section:
    """Attribute access to one section's values: ``settings.channel.port``."""

    def __init__(self, name: str, values: dict[str, Any]):
        self._name = name
        self.__dict__.update(values)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"<{self._name}: {items}>"


class Settings:
    """The effective settings of one workspace; ``sources`` says where each value came from."""

    def __init__(self, root: Path, values: dict[tuple[str, str], Any],
                 sources: dict[tuple[str, str], str]):
        self.root = root
        self.values = values
        self.sources = sources
        sections: dict[str, dict[str, Any]] = {}
        for (section, key), value in values.items():
            sections.setdefault(section, {})[key] = value
        for section, items in sections.items():
            setattr(self, section, Section(section, items))

    # The folders every module needs, resolved once.
    @property
    def state_dir(self) -> Path:
        return self.workspace.state_dir

    @property
    def recipes_dir(self) -> Path:
        return self.recipes.dir

    @property
    def channel_dir(self) -> Path:
        return self.channel.dir

    @property
    def images_dir(self) -> Path:
        return self.images.dir

    def state(self, *parts: str) -> Path:
        """A path inside the state directory (created on demand by callers)."""
        return self.state_dir.joinpath(*parts)


def _coerce(setting: Setting, raw: Any, origin: str, root: Path) -> Any:
    """The setting's value from ``raw`` (text from a variable, or a TOML value), checked."""
    want = setting.type
    problem = f"{setting.section}.{setting.key} from {origin}"
    if isinstance(raw, str) and want is not str:
        raw = _from_text(want, raw, problem)
        if want is bool:  # true or false: nothing more to check
            return raw
    as_default = f"write it as in the default: {setting.key} = {_toml_literal(setting.default)}"
    if want is list and isinstance(raw, list):
        if not all(isinstance(i, str) for i in raw):
            raise HubworksError(f"{problem} is {_toml_literal(raw)}; every item must be a "
                                f"string in quotes.", fix=as_default)
        value = list(raw)
    elif want is int and isinstance(raw, bool):
        raise HubworksError(f"{problem} is {raw!r}, not a whole number.", fix="use e.g. 8000")
    elif want is float and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)  # TOML's cpu_limit = 2
    elif isinstance(raw, want):
        value = raw
    else:
        raise HubworksError(
            f"{problem} is {raw!r} ({type(raw).__name__}); expected {want.__name__}.",
            fix=as_default)
    _check(setting, value, origin)
    if setting.kind == "path" and value != "":
        value = (root / os.path.expanduser(value)).resolve()
    return value


def _from_text(want: type, raw: str, problem: str) -> Any:
    """A value of type ``want`` written as text (environment variables are text)."""
    text = raw.strip()
    if want is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise HubworksError(f"{problem} is {raw!r}, not a boolean.", fix="use true or false")
    if want is int:
        try:
            return int(text)
        except ValueError:
            raise HubworksError(f"{problem} is {raw!r}, not a whole number.",
                                fix="use digits only, e.g. 8000") from None
    if want is float:
        try:
            return float(text)
        except ValueError:
            raise HubworksError(f"{problem} is {raw!r}, not a number.",
                                fix="use digits with an optional decimal point, e.g. 1.5"
                                ) from None
    if want is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    return raw


def _check(setting: Setting, value: Any, origin: str) -> None:
    """Refuse a value of the right type that still cannot work, naming the fix."""
    problem = f"{setting.name} from {origin}"
    if setting.choices and value not in setting.choices:
        raise HubworksError(
            f"{setting.name} is {value!r} (from {origin}); it must be one of: "
            f"{_choices_text(setting)}.", fix=_where_to_set(setting, origin))
    if isinstance(value, float) and not math.isfinite(value):
        raise HubworksError(f"{problem} is {value}, not a finite number.",
                            fix=_range_fix(setting))
    _check_bounds(setting, value, problem)
    if setting.kind == "token" and value not in ("auto", "off", ""):
        if not TOKEN_PATTERN.fullmatch(value):
            raise HubworksError(f"{problem} cannot stand in a URL path (/t/<token>/).",
                                fix='use letters, digits and . _ ~ - only, or token = "auto"')
        if len(value) < MIN_TOKEN_LENGTH:
            raise HubworksError(
                f"{problem} is {len(value)} characters long; a token shorter than "
                f"{MIN_TOKEN_LENGTH} can be guessed.",
                fix=f'use at least {MIN_TOKEN_LENGTH} random characters (e.g. the output of '
                    f'`python3 -c "import secrets; print(secrets.token_urlsafe(24))"`), '
                    f'or token = "auto" for a random one per run')
    elif setting.kind == "https_url" and not re.match(r"https://[^/\s]+", value):
        raise HubworksError(f"{problem} is {value!r}, not an https:// URL.",
                            fix=f"write the server's directory URL, e.g. {setting.key} = "
                                f"{_toml_literal(setting.default)}")
    elif setting.kind == "url" and value:
        if not re.match(r"https?://[^/\s]+", value):
            raise HubworksError(f"{problem} is {value!r}, not an http:// or https:// URL.",
                                fix=f"write the URL builds use to reach the channel, e.g. "
                                    f"{setting.key} = \"http://builder.example.org:8000/\"")
        if re.search(r"/t/[^/]+", value):
            raise HubworksError(
                f"{problem} holds a token (/t/...).",
                fix="leave the token out: image builds add a fresh one per run, which dies "
                    "with the run's channel server")


def _check_bounds(setting: Setting, value: Any, problem: str) -> None:
    """A number (or an amount of memory) within the setting's declared bounds."""
    low, high = setting.bounds
    if setting.kind == "bytes":
        if value and not BYTES_PATTERN.fullmatch(value):
            raise HubworksError(f"{problem} is {value!r}, not an amount of memory.",
                                fix=f'write a number with K, M, G or T, e.g. {setting.key} = '
                                    f'"2G" ({_allowed_range(setting)})')
        if value and low and _bytes(value) < _bytes(low):
            raise HubworksError(f"{problem} is {value!r}, below {low}.", fix=_range_fix(setting))
        return
    if setting.kind == "port" and not low <= value <= high:
        raise HubworksError(f"{problem} is {value}, which is not a port.",
                            fix=_range_fix(setting))
    if low is not None and value < low or high is not None and value > high:
        side = f"below {low}" if low is not None and value < low else f"above {high}"
        raise HubworksError(f"{problem} is {value}, {side}.", fix=_range_fix(setting))


def _bytes(text: str) -> int:
    """An amount of memory in bytes, read as JupyterHub reads it."""
    number, unit = BYTES_PATTERN.fullmatch(text).groups()
    return int(float(number) * BYTE_UNITS[unit])


def _range_fix(setting: Setting) -> str:
    fix = ("use a number from " if setting.bounds[1] is not None else "use "
           ) + _allowed_range(setting)
    if setting.kind == "port" and not setting.zero:
        fix += "; 0 is not allowed: the hub's configuration names this port"
    return fix


def _allowed_range(setting: Setting) -> str:
    """What a number setting allows, and what 0 does: '0 to 65535; 0 picks a free port'."""
    low, high = setting.bounds
    if low is None and high is None:
        return ""
    text = f"{low} or more" if high is None else f"{low} to {high}"
    if setting.zero:
        text += f"; {'empty' if setting.kind == 'bytes' else '0'} {setting.zero}"
    return text


def _choices_text(setting: Setting) -> str:
    return ", ".join(_toml_literal(c) if c == "" else c for c in setting.choices)


def _where_to_set(setting: Setting, origin: str) -> str:
    default = _toml_literal(setting.default)
    if origin.startswith("$"):
        return (f"set {setting.env_var} to one of those, or unset it for the default "
                f"({default})")
    return f"write one of those in {origin}, e.g. [{setting.section}] {setting.key} = {default}"


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return str(value)


def _read_config_file(path: Path) -> dict[str, Any]:
    """hubworks.toml's tables ({} without the file), every key a known setting."""
    if not path.is_file():
        return {}
    data = _parse_toml(path, _utf8_text(path, path.read_bytes()))
    _check_known_keys(path, data)
    return data


def _utf8_text(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        shown = raw.splitlines()[line - 1].decode("utf-8", errors="replace").strip()
        raise HubworksError(
            f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} "
            f"cannot be read.\n  line {line}: {shown}",
            fix="save the file as UTF-8 (TOML files are UTF-8), or write the character "
                "as an escape such as \\u00e9 inside the quotes") from None
    return text


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"line (\d+)", str(exc))
        shown = ""
        if where and 0 < int(where[1]) <= len(text.splitlines()):
            shown = f"\n  line {where[1]}: {text.splitlines()[int(where[1]) - 1].strip()}"
        raise HubworksError(f"{path} is not valid TOML: {exc}.{shown}",
                            fix="correct that line (TOML: [section] headers, key = value, "
                                "strings in quotes)") from None
    return data


def _check_known_keys(path: Path, data: dict[str, Any]) -> None:
    for section, items in data.items():
        if not isinstance(items, dict):
            raise HubworksError(f"{path}: '{section}' must be a [section] table.",
                                fix="put keys under [workspace], [recipes], [channel], ...")
        for key in items:
            if (section, key) not in _BY_NAME:
                known = ", ".join(sorted(k for s, k in _BY_NAME if s == section)) or "none"
                raise HubworksError(f"{path}: unknown setting {section}.{key}.",
                                    fix=f"known keys of [{section}]: {known}")


def load_settings(root: Path | str | None = None, environ: dict[str, str] | None = None
                  ) -> Settings:
    """Read defaults, then ``hubworks.toml``, then ``HUBWORKS_*`` variables."""
    root = Path(root or os.getcwd()).resolve()
    environ = os.environ if environ is None else environ
    config_path = root / CONFIG_FILE
    file_values = _read_config_file(config_path)
    values: dict[tuple[str, str], Any] = {}
    sources: dict[tuple[str, str], str] = {}
    for setting in SETTINGS:
        name = (setting.section, setting.key)
        raw, origin = setting.default, "default"
        if setting.key in file_values.get(setting.section, {}):
            raw, origin = file_values[setting.section][setting.key], str(config_path)
        if setting.env_var in environ:
            raw, origin = environ[setting.env_var], f"${setting.env_var}"
        values[name] = _coerce(setting, raw, origin, root)
        sources[name] = origin
    _check_folders_apart(values, sources)
    return Settings(root, values, sources)


_APART = ('keep the two folders apart: change workspace.state_dir or channel.dir (the '
          'defaults, [workspace] state_dir = ".hubworks" and [channel] dir = "channel", are '
          'side by side in the workspace)')


def _check_folders_apart(values: dict[tuple[str, str], Any],
                         sources: dict[tuple[str, str], str]) -> None:
    """The channel is served as it is: the state folder (doit's database, logs, scratch
    space) must not be inside it, nor the channel inside the state folder."""
    state, channel = values[("workspace", "state_dir")], values[("channel", "dir")]
    shown = (f"workspace.state_dir ({state}, from {sources[('workspace', 'state_dir')]}) and "
             f"channel.dir ({channel}, from {sources[('channel', 'dir')]})")
    if state == channel or channel in state.parents:
        raise HubworksError(
            f"{shown} overlap: the state folder is inside the channel, so the channel server "
            f"would serve doit's database and the build logs.",
            fix=_APART)
    if state in channel.parents:
        raise HubworksError(
            f"{shown} overlap: the channel is inside the state folder, which holds scratch "
            f"space and logs that must not be served, and which you may delete to start over.",
            fix=_APART)


def settings_table() -> str:
    """The table of settings in docs/settings.md, generated so that it cannot drift."""
    lines = ["| Setting | Environment variable | Default | Values | What it does |",
             "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = _toml_literal(s.default) if s.default not in ("", []) else "(empty)"
        lines.append(f"| `{s.name}` | `{s.env_var}` | `{default}` | {_values_text(s)} | "
                     f"{s.help} |")
    return "\n".join(lines)


def _values_text(setting: Setting) -> str:
    """The table's Values cell: the choices, or the bounds and what 0 does."""
    if setting.choices:
        return ", ".join("(empty)" if c == "" else f"`{c}`" for c in setting.choices)
    if setting.type is bool:
        return "`true`, `false`"
    return _allowed_range(setting)


if __name__ == "__main__":  # python -m tasks.core.settings: the table for docs/settings.md
    print(settings_table())
