"""Podman for tests: a private image store, a base image made offline, and reading files of
built images without running them (containers cannot start on every host that builds).

Load with ``pytest_plugins = ["tests.podman_fixtures"]`` in the top-level conftest. Every
test that uses podman is marked ``slow``, so ``pytest -m "not slow"`` runs without it.

Builds here need chroot isolation (podman cannot start OCI containers on every host): tests
ask for it as users do, with ``images.isolation = "chroot"`` for hubworks and
``BUILDAH_ISOLATION=chroot`` for plain repo2docker, never in the whole session's environment.

For running containers (the hub's users' servers, a built image serving HTTP) there is a
second set-up, ``podman_runtime``: the runc runtime with explicit rlimits in a containers.conf
of its own, and overlay storage in its own graphroot (a container is created in a fraction of
a second; vfs copies the whole image per container). ``hub_base_image`` is a Debian image with
JupyterHub and JupyterLab made without a registry. Both are configured through environment
variables only (``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``), never in the machine's own
podman configuration, and built once per session. When a selected test needs the base image,
its build starts in a thread as soon as collection ends, so that it is ready, or nearly, when
the first of them runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import free_port

REGISTRY = "/usr/bin/docker-registry"  # Debian's docker-registry: a registry without containers
BUSYBOX = "/bin/busybox"  # Debian's busybox-static: one static binary with every applet
BUSYBOX_IMAGE = "localhost/hubworks-test/busybox:latest"
PATH_IN_IMAGE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _missing(what: str, package: str) -> None:
    """Skip on a developer's machine; fail in CI, which installs everything the tests need."""
    message = f"{what} is missing; install it with apt-get install {package}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def pytest_collection_modifyitems(items):
    for item in items:
        if "podman_storage" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def podman_storage(tmp_path_factory):
    """A private vfs image store, set in os.environ for the session."""
    if shutil.which("podman") is None:
        _missing("podman", "podman")
    root = tmp_path_factory.mktemp("podman")
    conf = root / "storage.conf"
    # vfs needs no kernel overlay support
    conf.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{root / "run"}"\n'
                    f'graphroot = "{root / "graph"}"\n')
    wanted = {"CONTAINERS_STORAGE_CONF": str(conf)}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield root
    finally:
        if os.geteuid() != 0:
            # rootless layers belong to sub-uids that only podman's namespace may delete
            subprocess.run(["podman", "unshare", "rm", "-rf", str(root / "graph")])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _add(tar: tarfile.TarFile, name: str, *, data: bytes = b"", mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size = kind, mode, target, len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


def busybox_rootfs() -> bytes:
    """A root filesystem as a tar: busybox and its applets, /tmp, root and nobody."""
    if not os.path.exists(BUSYBOX):
        _missing(BUSYBOX, "busybox-static")
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    folders = sorted({os.path.dirname(a) for a in applets} | {"etc", "root", "usr"})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in folders:
            _add(tar, folder, kind=tarfile.DIRTYPE, mode=0o700 if folder == "root" else 0o755)
        _add(tar, "tmp", kind=tarfile.DIRTYPE, mode=0o1777)
        with open(BUSYBOX, "rb") as handle:
            _add(tar, "bin/busybox", data=handle.read(), mode=0o755)
        for applet in applets:
            if applet != "bin/busybox":
                _add(tar, applet, kind=tarfile.SYMTYPE, target="/bin/busybox")
        _add(tar, "etc/passwd", data=PASSWD.encode())
        _add(tar, "etc/group", data=GROUP.encode())
    return buffer.getvalue()


@pytest.fixture(scope="session")
def busybox_base_image(podman_storage) -> str:
    """A tiny base image imported from busybox-static: no registry, no network."""
    subprocess.run(["podman", "import", "--change", f"ENV PATH={PATH_IN_IMAGE}",
                    "--change", 'CMD ["/bin/sh"]', "-", BUSYBOX_IMAGE],
                   input=busybox_rootfs(), capture_output=True, check=True)
    return BUSYBOX_IMAGE


_READ_FROM_MOUNT = ('dir=$(podman image mount "$1") || exit 1; cat "$dir/$2"; status=$?; '
                    'podman image unmount "$1" >/dev/null; exit $status')


_GREP_MOUNT = ('dir=$(podman image mount "$1") || exit 2; cd "$dir" && grep -rlF -e "$2" .; '
               'status=$?; podman image unmount "$1" >/dev/null; exit $status')


def _in_mount(script: str, ref: str, argument: str) -> subprocess.CompletedProcess:
    # mounting needs root; rootless podman mounts inside its own user namespace
    namespace = [] if os.geteuid() == 0 else ["podman", "unshare"]
    return subprocess.run([*namespace, "sh", "-c", script, "sh", ref, argument],
                          capture_output=True)


def image_file(ref: str, path: str) -> bytes:
    """The contents of ``path`` inside the podman image ``ref``, read from a mount of it."""
    proc = _in_mount(_READ_FROM_MOUNT, ref, path)
    if proc.returncode != 0:
        raise FileNotFoundError(f"{path} in image {ref}: {proc.stderr.decode().strip()}")
    return proc.stdout


def files_in_image_containing(ref: str, text: str) -> list[str]:
    """Paths of the files in the podman image ``ref`` that contain ``text``."""
    proc = _in_mount(_GREP_MOUNT, ref, text)
    if proc.returncode not in (0, 1):  # grep: 1 is "no match"
        raise RuntimeError(f"cannot search image {ref}: {proc.stderr.decode().strip()}")
    return [line.removeprefix(".") for line in proc.stdout.decode().splitlines()]


def image_metadata(ref: str) -> str:
    """Everything the image ``ref`` says about itself: config, labels, history (no files)."""
    inspect = subprocess.run(["podman", "image", "inspect", ref], capture_output=True,
                             text=True, check=True).stdout
    history = subprocess.run(["podman", "history", "--no-trunc", "--format", "json", ref],
                             capture_output=True, text=True, check=True).stdout
    return inspect + history


@contextlib.contextmanager
def registry_server(folder, monkeypatch, *, storage_extra: str = "",
                    extra: str = "") -> Iterator[str]:
    """Debian's docker-registry on a free loopback port, serving from ``folder``; podman is
    told (CONTAINERS_REGISTRIES_CONF) that it speaks plain HTTP. Yields its host:port.

    ``storage_extra`` and ``extra``: YAML lines to add under ``storage:`` (indented by two)
    and at the top level (auth, say)."""
    if not os.path.exists(REGISTRY):
        _missing(REGISTRY, "docker-registry")
    host = f"127.0.0.1:{free_port()}"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{folder / 'data'}\n{storage_extra}{extra}http:\n  addr: {host}\n")
    # podman speaks HTTPS to registries unless registries.conf calls one insecure
    registries = folder / "registries.conf"
    registries.write_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(registries))
    server = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for(host, server)
        yield host
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def local_registry(podman_storage, tmp_path, monkeypatch):
    """A plain-HTTP registry on loopback that podman may push to; yields its host:port."""
    with registry_server(tmp_path / "registry", monkeypatch) as host:
        yield host


def _wait_for(host: str, server: subprocess.Popen, seconds: float = 10) -> None:
    """Until the registry at ``host`` accepts connections (with auth, /v2/ answers 401)."""
    deadline = time.monotonic() + seconds
    while server.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(tuple(host.rsplit(":", 1)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the test registry did not answer at {host} within {seconds} s")


def registry_tags(host: str, repository: str) -> list[str]:
    """The tags ``repository`` has in the registry at ``host``."""
    with _LOOPBACK.open(f"http://{host}/v2/{repository}/tags/list", timeout=5) as page:
        return json.load(page)["tags"]


# ---- running containers --------------------------------------------------------------------

MMDEBSTRAP = "/usr/bin/mmdebstrap"  # Debian's mmdebstrap: a Debian root filesystem, no registry
HUB_BASE_PACKAGES = "python3,python3-venv,ca-certificates,passwd,libstdc++6"
HOST_CA_FOLDER = "/usr/local/share/ca-certificates"  # extra CAs the host trusts (Debian's place)
RUNTIME_IMAGE_PREFIX = "localhost/hubworks-test"


def container_limits() -> tuple[int, int]:
    """rlimits a container may ask for here: open files up to this process's hard limit,
    processes up to what podman's monitor holds (the kernel's pid_max where that is lower)."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    processes = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if processes == resource.RLIM_INFINITY or processes > pid_max:
        processes = pid_max
    if files == resource.RLIM_INFINITY:
        files = 1048576
    return files, processes


@dataclass
class PodmanRuntime:
    """A podman set-up that runs containers; ``env`` selects it for any podman process."""

    root: Path
    env: dict[str, str]

    def podman(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *args], env={**os.environ, **self.env},
                              capture_output=True, text=True, check=check, **kwargs)

    def containers(self, label: str) -> list[str]:
        """Names of the containers (running or not) that carry ``label`` (key=value)."""
        out = self.podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}")
        return out.stdout.split()


@pytest.fixture(scope="session")
def podman_runtime(tmp_path_factory) -> PodmanRuntime:
    """podman with runc, explicit rlimits and overlay storage of its own, for running."""
    if shutil.which("podman") is None:
        _missing("podman", "podman")
    if _runc() is None:
        _missing("runc (podman's other runtime)", "runc")
    if _EARLY_BASE_IMAGE is not None:  # its set-up, which it removes when the session ends
        yield _EARLY_BASE_IMAGE.runtime
        return
    runtime = make_podman_runtime(tmp_path_factory.mktemp("podman-run"))
    try:
        yield runtime
    finally:
        remove_podman_runtime(runtime)


def _runc() -> str | None:
    return shutil.which("runc") or shutil.which("runc", path="/usr/sbin:/sbin")


def make_podman_runtime(root: Path) -> PodmanRuntime:
    """containers.conf and storage.conf in ``root``; the variables that select them."""
    root.mkdir(parents=True, exist_ok=True)
    files, processes = container_limits()
    # a --ulimit flag would replace these defaults entirely; the API applies them too
    (root / "containers.conf").write_text(
        f'[containers]\ndefault_ulimits = ["nofile={files}:{files}", '
        f'"nproc={processes}:{processes}"]\n[engine]\nruntime = "runc"\n')
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{root / "run"}"\n'
        f'graphroot = "{root / "graph"}"\n')
    return PodmanRuntime(root, {"CONTAINERS_CONF": str(root / "containers.conf"),
                                "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
                                "BUILDAH_ISOLATION": "chroot"})


def remove_podman_runtime(runtime: PodmanRuntime) -> None:
    """Every container, volume and image of the set-up, then its folder."""
    runtime.podman("rm", "--all", "--force", "--time", "0", check=False)
    runtime.podman("volume", "rm", "--all", "--force", check=False)
    runtime.podman("rmi", "--all", "--force", check=False)
    if unmount_under(runtime.root):
        shutil.rmtree(runtime.root, ignore_errors=True)


def unmount_under(folder: Path) -> bool:
    """Unmount whatever is mounted below ``folder`` (a stopped mmdebstrap leaves /proc, /sys
    and /dev/pts mounted in its root filesystem); True when nothing is left, so that removing
    the folder cannot reach into a mount."""
    def mounted() -> list[str]:
        points = [line.split()[4] for line in
                  Path("/proc/self/mountinfo").read_text().splitlines()]
        inside = str(folder.resolve()) + "/"
        return sorted((p for p in points if p.startswith(inside)), key=len, reverse=True)

    for point in mounted():
        subprocess.run(["umount", "--lazy", point], capture_output=True)
    return not mounted()


def debian_suite() -> str:
    """This machine's Debian release (its archive is what apt here reaches), else stable."""
    release = dict(line.split("=", 1) for line in
                   Path("/etc/os-release").read_text().splitlines() if "=" in line)
    if release.get("ID", "").strip('"') != "debian":
        return "stable"
    return release.get("VERSION_CODENAME", "").strip('"') or "stable"


def hub_base_rootfs_command(jupyterhub: str, jupyterlab: str) -> list[str]:
    """mmdebstrap writing a Debian root filesystem with a JupyterHub venv, as a tar on stdout."""
    trust = (f'if [ -d {HOST_CA_FOLDER} ]; then cp -r {HOST_CA_FOLDER}/. '
             f'"$1{HOST_CA_FOLDER}/"; fi; chroot "$1" update-ca-certificates')
    venv = ('chroot "$1" python3 -m venv /opt/venv && chroot "$1" /opt/venv/bin/pip install '
            f'--no-cache-dir --quiet jupyterhub=={jupyterhub} jupyterlab=={jupyterlab}')
    user = 'chroot "$1" useradd --create-home --uid 1000 --shell /bin/bash jovyan'
    return [MMDEBSTRAP, "--variant=minbase", f"--include={HUB_BASE_PACKAGES}",
            # pip in the image must trust what the host trusts (networks that inspect TLS)
            f"--customize-hook={trust}", f"--customize-hook={venv}",
            f"--customize-hook={user}", debian_suite(), "-"]


def make_hub_base_image(runtime: PodmanRuntime, name: str, jupyterhub: str, jupyterlab: str,
                        log: Path, started: list | None = None, niceness: int = 0) -> str:
    """A Python image with JupyterHub and JupyterLab from Debian and PyPI, no registry.

    mmdebstrap works in the runtime's folder (``remove_podman_runtime`` then unmounts what
    a stopped mmdebstrap left mounted). ``started``: gets the two processes (mmdebstrap and
    podman import), so that another thread can stop them; ``niceness``: how much lower than
    this process they run."""
    nice = ["nice", "-n", str(niceness)] if niceness else []
    scratch = runtime.root / "scratch"
    scratch.mkdir(exist_ok=True)
    with log.open("wb") as errors:
        # a process group of its own: stopping it stops the helpers mmdebstrap forks too
        rootfs = subprocess.Popen([*nice, *hub_base_rootfs_command(jupyterhub, jupyterlab)],
                                  stdout=subprocess.PIPE, stderr=errors,
                                  env={**os.environ, "TMPDIR": str(scratch)},
                                  start_new_session=started is not None)
        imported = subprocess.Popen(
            [*nice, "podman", "import",
             "--change", "ENV PATH=/opt/venv/bin:" + PATH_IN_IMAGE,
             "--change", "USER jovyan", "--change", "WORKDIR /home/jovyan",
             "--change", 'CMD ["jupyterhub-singleuser"]', "-", name],
            stdin=rootfs.stdout, env={**os.environ, **runtime.env},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=started is not None)
        if started is not None:
            started += [rootfs, imported]
        rootfs.stdout.close()
        import_errors = imported.communicate()[1]
        rootfs.wait()
    if rootfs.returncode or imported.returncode:
        raise RuntimeError(f"making {name} failed: mmdebstrap exit {rootfs.returncode} "
                           f"(log {log}), podman import: {import_errors.decode()[-2000:]}")
    return name


def _hub_base_pins() -> tuple[str, str, str]:
    """The image's name, and the JupyterHub and JupyterLab releases hubworks pins."""
    from tasks.core.settings import SETTINGS

    pins = {s.key: s.default for s in SETTINGS if s.section == "hub"}
    jupyterhub, jupyterlab = pins["jupyterhub_version"], pins["jupyterlab_version"]
    return f"{RUNTIME_IMAGE_PREFIX}/hub-base:{jupyterhub}-{jupyterlab}", jupyterhub, jupyterlab


class EarlyBaseImage:
    """The hub base image, made in a thread from the end of collection on.

    It takes minutes, mostly waiting for Debian's archive and PyPI, and the first test that
    needs it runs minutes after the session starts: made meanwhile, the session is that much
    shorter. Its processes run at a lower priority than the tests'. ``result()`` waits for it
    and raises what the build raised; ``close()`` stops a build still under way and removes
    the podman set-up it made (``runtime``, which the session's tests share)."""

    def __init__(self):
        self.runtime = make_podman_runtime(Path(tempfile.mkdtemp(prefix="hubworks-podman-")))
        self.processes: list[subprocess.Popen] = []
        self.closed = False
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="base-image")
        name, jupyterhub, jupyterlab = _hub_base_pins()
        self.future = self.pool.submit(
            make_hub_base_image, self.runtime, name, jupyterhub, jupyterlab,
            self.runtime.root / "mmdebstrap.log", started=self.processes, niceness=10)

    def result(self) -> str:
        return self.future.result()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # SIGTERM first: mmdebstrap then removes its temporary root filesystem
        for how in (signal.SIGTERM, signal.SIGKILL):
            for process in self.processes:
                try:
                    os.killpg(process.pid, how)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.pool.shutdown(wait=True)
        remove_podman_runtime(self.runtime)


_EARLY_BASE_IMAGE: EarlyBaseImage | None = None


def pytest_collection_finish(session):
    """Start the base image when a selected test needs it and what it needs is here (else
    the fixture says what is missing)."""
    global _EARLY_BASE_IMAGE
    wanted = any("hub_base_image" in getattr(item, "fixturenames", ())
                 for item in session.items)
    if not wanted or session.config.option.collectonly or shutil.which("podman") is None \
            or _runc() is None or not os.path.exists(MMDEBSTRAP):
        return
    _EARLY_BASE_IMAGE = EarlyBaseImage()


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown, which may still use podman
def pytest_sessionfinish(session):
    """However the session ended (Ctrl-C included): no build left running, nothing left."""
    if _EARLY_BASE_IMAGE is not None:
        _EARLY_BASE_IMAGE.close()


@pytest.fixture(scope="session")
def hub_base_image(podman_runtime, tmp_path_factory) -> str:
    """Debian + venv with the pinned JupyterHub and JupyterLab + user jovyan (uid 1000)."""
    if not os.path.exists(MMDEBSTRAP):
        _missing(MMDEBSTRAP, "mmdebstrap")
    if _EARLY_BASE_IMAGE is not None:
        return _EARLY_BASE_IMAGE.result()
    name, jupyterhub, jupyterlab = _hub_base_pins()
    log = tmp_path_factory.mktemp("hub-base") / "mmdebstrap.log"
    return make_hub_base_image(podman_runtime, name, jupyterhub, jupyterlab, log)


@pytest.fixture(scope="session")
def runtime_busybox_image(podman_runtime) -> str:
    """The busybox base image, in the store that runs containers."""
    subprocess.run(["podman", "import", "--change", f"ENV PATH={PATH_IN_IMAGE}",
                    "--change", 'CMD ["/bin/sh"]', "-", BUSYBOX_IMAGE],
                   input=busybox_rootfs(), env={**os.environ, **podman_runtime.env},
                   capture_output=True, check=True)
    return BUSYBOX_IMAGE


@pytest.fixture
def podman_api(podman_runtime, tmp_path):
    """podman's Docker-compatible API on a socket of this test, over ``podman_runtime``."""
    from tasks.hub.containers import start_podman_process

    socket_path = tmp_path / "podman.sock"
    service = start_podman_process(socket_path, podman_runtime.env, tmp_path / "podman.log")
    try:
        yield f"unix://{socket_path}"
    finally:
        service.terminate()
        service.wait(timeout=30)
