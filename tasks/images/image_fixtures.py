"""The pytest plugin behind image tests: fixtures for the tests in ``images/<name>/tests/``.

``build_images`` loads it (``-p tasks.images.image_fixtures``) when it runs an image's tests
against the content-hash tag it just built; by hand::

    python -m pytest -p tasks.images.image_fixtures --image hubworks/lab:latest images/lab/tests

Fixtures (docs/image-tests.md has an example of each):

- ``image_tag``, ``image_name``: the tag under test and the image's folder name;
- ``run_in_image``: run a command in a fresh container of the image, as the image's user, on
  the build's network (``images.network``); returns its exit status and output;
- ``image_server``: a Jupyter server in a container of the image, started as the hub starts
  users' servers (the image's entrypoint, user and working folder), with ``jupyter server``
  in place of ``jupyterhub-singleuser``, which needs a hub to log in through: its URL and
  token, and kernels that run code and notebooks;
- ``docker_services`` and ``docker_ip`` (pytest-docker): the services of the compose file in
  the tests folder, with podman-compose under podman and ``docker compose`` under Docker.
  ``${IMAGE_TAG}`` in the compose file is the tag under test.

Every container these start carries the label ``org.hubworks.image-test=<run>`` (compose
containers the compose project's), so build_images removes whatever is left when the tests
end, however they end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from .image_tests import TEST_LABEL, compose_project_name, container_removal_command

SERVER_START_SECONDS = 120
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ---- options, the report build_images reads -----------------------------------------------

def pytest_addoption(parser) -> None:
    group = parser.getgroup("hubworks image tests")
    group.addoption("--image", dest="image_tag", default="",
                    help="the image (tag) under test")
    group.addoption("--image-name", default="",
                    help="the image's folder name (default: the tag's last path part)")
    group.addoption("--image-engine", default="",
                    help="container CLI: podman or docker (default: podman when installed)")
    group.addoption("--image-network", default="host",
                    help="network of the test containers (images.network; default host)")
    group.addoption("--image-run", default="",
                    help="label value of this run's containers (default: a new one)")
    group.addoption("--image-report", default="",
                    help="write the outcome (counts, failed tests and output) to this JSON file")


@dataclass(frozen=True)
class ImageUnderTest:
    """What the tests run against, and how this run's containers are started and found."""
    tag: str
    name: str
    engine: str  # the container CLI
    network: str
    run: str  # value of the TEST_LABEL label on this run's containers

    @property
    def podman(self) -> bool:
        return Path(self.engine).name == "podman"

    @property
    def compose_project(self) -> str:
        return compose_project_name(self.run)

    def engine_command(self, *args: str) -> list[str]:
        return [self.engine, *args]


def _image_under_test(config) -> ImageUnderTest:
    tag = config.getoption("image_tag")
    if not tag:
        raise pytest.UsageError("image tests need the image: --image <tag> (build_images "
                                "passes the tag it built)")
    name = config.getoption("image_name") or tag.rsplit("/", 1)[-1].split(":")[0]
    engine = config.getoption("image_engine") or ("podman" if shutil.which("podman")
                                                  else "docker")
    run = config.getoption("image_run") or uuid.uuid4().hex[:12]
    return ImageUnderTest(tag, name, engine, config.getoption("image_network"), run)


class _Report:
    """Counts and the failed tests with their output, written when the session ends."""

    def __init__(self, path: Path):
        self.path = path
        self.counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        self.failures: list[dict[str, str]] = []

    def _failed(self, report, when: str) -> None:
        self.failures.append({"test": report.nodeid, "when": when,
                              "output": _ANSI.sub("", report.longreprtext)})

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.counts["failed" if report.when == "call" else "errors"] += 1
            self._failed(report, report.when)
        elif report.skipped:
            self.counts["skipped"] += 1
        elif report.when == "call":
            self.counts["passed"] += 1

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.counts["errors"] += 1
            self._failed(report, "collect")

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self.path.write_text(json.dumps({"exit_status": int(exitstatus), **self.counts,
                                         "failures": self.failures}, indent=1))


def pytest_configure(config) -> None:
    image = config._hubworks_image = _image_under_test(config)
    # compose files name the image under test as ${IMAGE_TAG}
    os.environ["IMAGE_TAG"], os.environ["IMAGE_NAME"] = image.tag, image.name
    # after pytest-docker (an entry-point plugin, loaded after -p ones), so its settings win
    config.pluginmanager.import_plugin("tasks.images.compose_fixtures")
    if report := config.getoption("image_report"):
        config.pluginmanager.register(_Report(Path(report)), "hubworks-image-report")
    # build_images stops the tests with SIGTERM (Ctrl-C): unwind so fixtures remove containers
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def stop(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, stop)


def pytest_report_header(config) -> str:
    image = config._hubworks_image
    return (f"image under test: {image.tag} (images/{image.name}), engine {image.engine}, "
            f"network {image.network or 'default'}, containers labelled "
            f"{TEST_LABEL}={image.run}")


# ---- the image, and commands in it --------------------------------------------------------

@pytest.fixture(scope="session")
def image_under_test(pytestconfig) -> ImageUnderTest:
    return pytestconfig._hubworks_image


@pytest.fixture(scope="session")
def image_tag(image_under_test) -> str:
    """The tag under test: the content-hash tag build_images just built."""
    return image_under_test.tag


@pytest.fixture(scope="session")
def image_name(image_under_test) -> str:
    """The image's name: its folder in images/."""
    return image_under_test.name


@dataclass
class ContainerRun:
    """A command that ran in a container of the image."""
    command: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Standard output, then standard error."""
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return (f"`{shlex.join(self.command)}` exited with status {self.returncode}; "
                f"output:\n{self.output}")


class _Containers:
    """Names and start flags of this run's containers."""

    def __init__(self, image: ImageUnderTest):
        self.image = image
        self.count = 0

    def new_name(self, kind: str) -> str:
        self.count += 1
        return f"hubworks-test-{self.image.run}-{kind}-{self.count}"

    def run_flags(self, name: str, network: str | None) -> list[str]:
        network = self.image.network if network is None else network
        return ["--name", name, "--label", f"{TEST_LABEL}={self.image.run}",
                *(["--network", network] if network else [])]

    def remove(self, name: str) -> None:
        subprocess.run(container_removal_command(self.image.engine, [name]),
                       capture_output=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def _containers(image_under_test) -> _Containers:
    return _Containers(image_under_test)


@pytest.fixture(scope="session")
def run_in_image(image_under_test, _containers):
    """``run_in_image(command, *, user=None, env=None, network=None, timeout=300)``: run
    ``command`` (a list, or a string for ``sh -c``) in a fresh container of the image, as
    its user (or ``user``), on the build's network; a ``ContainerRun`` (``returncode``,
    ``stdout``, ``stderr``, ``output``). The container is removed afterwards."""

    def run(command: str | Sequence[str], *, user: str | None = None,
            env: dict[str, str] | None = None, network: str | None = None,
            timeout: float = 300) -> ContainerRun:
        argv = ["sh", "-c", command] if isinstance(command, str) else [str(c) for c in command]
        name = _containers.new_name("run")
        flags = [*_containers.run_flags(name, network), *(["--user", user] if user else [])]
        for key, value in (env or {}).items():
            flags += ["--env", f"{key}={value}"]
        try:
            proc = subprocess.run(
                image_under_test.engine_command("run", "--rm", *flags, image_under_test.tag,
                                                *argv),
                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            _containers.remove(name)
            raise TimeoutError(f"`{shlex.join(argv)}` in {image_under_test.tag} did not end "
                               f"within {timeout} s") from None
        return ContainerRun(argv, proc.returncode, proc.stdout, proc.stderr)

    return run


# ---- a Jupyter server of the image --------------------------------------------------------

class CellError(Exception):
    """Code run in the image's kernel raised: the exception and its traceback."""


class Kernel:
    """A kernel of the image's server, over its websocket: runs code and notebooks."""

    def __init__(self, server: ImageServer, kernel_id: str, channels):
        self.server, self.id, self._channels = server, kernel_id, channels
        self._session = uuid.uuid4().hex

    def execute(self, code: str, timeout: float = 120) -> str:
        """Run ``code``; what it printed and returned (text). Raises CellError when it fails."""
        __tracebackhide__ = True  # a failure shows the test's line and the kernel's traceback
        msg_id = uuid.uuid4().hex
        self._channels.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "version": "5.3",
                       "username": "", "session": self._session, "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        printed: list[str] = []
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            self._channels.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = json.loads(self._channels.recv())
            except Exception as exc:  # websocket's timeout, or the kernel died
                raise CellError(f"no answer from the kernel within {timeout} s ({exc!r}) "
                                f"running:\n{code}") from None
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message.get("msg_type"), message.get("content", {})
            if kind == "stream":
                printed.append(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                text = content.get("data", {}).get("text/plain", "")
                printed.append(text if text.endswith("\n") else text + "\n")
            elif kind == "error":
                trace = _ANSI.sub("", "\n".join(content.get("traceback", [])))
                errors.append(f"{content.get('ename')}: {content.get('evalue')}\n{trace}")
            elif kind == "status" and content.get("execution_state") == "idle":
                break
        if errors:
            raise CellError("\n".join(errors))
        return "".join(printed)

    def run_notebook(self, notebook: dict | str | os.PathLike, timeout: float = 300
                     ) -> list[str]:
        """Run every code cell of ``notebook`` (its JSON, or a file on this machine) in
        order; the output of each. Raises CellError naming the cell that failed."""
        __tracebackhide__ = True
        if not isinstance(notebook, dict):
            notebook = json.loads(Path(notebook).read_text())
        outputs = []
        cells = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
        for number, cell in enumerate(cells, 1):
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            try:
                outputs.append(self.execute(source, timeout))
            except CellError as exc:
                raise CellError(f"code cell {number} of {len(cells)} failed:\n{source}\n"
                                f"---\n{exc}") from None
        return outputs


@dataclass
class ImageServer:
    """A Jupyter server running in a container of the image."""
    url: str  # http://127.0.0.1:<port>/
    token: str
    container: str
    image: ImageUnderTest

    def api(self, method: str, path: str, **kwargs):
        """A request to the server's REST API (``path`` below /api/), with the token."""
        import requests

        session = requests.Session()
        session.trust_env = False  # loopback: never through a proxy
        return session.request(method, f"{self.url}api/{path.lstrip('/')}",
                               headers={"Authorization": f"token {self.token}"}, timeout=60,
                               **kwargs)

    @contextlib.contextmanager
    def kernel(self, name: str = "") -> Iterator[Kernel]:
        """A new kernel (``name``: a kernelspec, default the server's), shut down after."""
        import websocket

        started = self.api("POST", "kernels", json={"name": name} if name else {})
        if started.status_code != 201:
            raise CellError(f"the server in {self.image.tag} could not start a kernel: "
                            f"{started.status_code} {started.text[:500]}")
        kernel_id = started.json()["id"]
        try:
            channels = websocket.create_connection(
                f"{self.url.replace('http', 'ws', 1)}api/kernels/{kernel_id}/channels",
                header=[f"Authorization: token {self.token}"], timeout=60)
            try:
                yield Kernel(self, kernel_id, channels)
            finally:
                channels.close()
        finally:
            self.api("DELETE", f"kernels/{kernel_id}")

    def execute(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a new kernel; what it printed and returned."""
        __tracebackhide__ = True
        with self.kernel() as kernel:
            return kernel.execute(code, timeout)

    def run_notebook(self, notebook: dict | str | os.PathLike, timeout: float = 300
                     ) -> list[str]:
        """Run ``notebook``'s code cells in a new kernel; the output of each."""
        __tracebackhide__ = True
        with self.kernel() as kernel:
            return kernel.run_notebook(notebook, timeout)

    def logs(self) -> str:
        proc = subprocess.run(self.image.engine_command("logs", self.container),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def image_server_command() -> list[str]:
    """The server ``image_server`` starts (override it in a conftest.py, e.g. for an image
    whose server is ``jupyter notebook``); its address and port options are added."""
    return ["jupyter", "server"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def image_server(image_under_test, _containers, image_server_command) -> Iterator[ImageServer]:
    """A Jupyter server in a container of the image, shared by the tests of the session;
    its ``url`` and ``token``, ``execute(code)``, ``run_notebook(nb)`` and ``kernel()``."""
    image = image_under_test
    token, port = uuid.uuid4().hex, _free_port()
    name = _containers.new_name("server")
    if image.network == "host":
        address, publish = ["--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}"], []
    else:
        address = ["--ServerApp.ip=0.0.0.0", "--ServerApp.port=8888"]
        publish = ["--publish", f"127.0.0.1:{port}:8888"]
    command = image.engine_command(
        "run", "--detach", *_containers.run_flags(name, None), *publish,
        "--env", "JUPYTER_TOKEN", image.tag,  # the token's value stays off command lines
        *image_server_command, *address, "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False")
    started = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**os.environ, "JUPYTER_TOKEN": token})
    server = ImageServer(f"http://127.0.0.1:{port}/", token, name, image)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"could not start a server of {image.tag}: "
                               f"{started.stderr.strip()[-2000:]}")
        _wait_until_serving(server)
        yield server
    finally:
        _containers.remove(name)


def _wait_until_serving(server: ImageServer) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        try:
            if server.api("GET", "status").status_code == 200:
                return
        except OSError:
            pass
        state = subprocess.run(
            server.image.engine_command("container", "inspect", "--format",
                                        "{{.State.Running}}", server.container),
            capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
        if state != "true":
            raise RuntimeError(f"the server in {server.image.tag} stopped while starting; "
                               f"its output:\n{server.logs()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"the server in {server.image.tag} did not answer at {server.url} "
                       f"within {SERVER_START_SECONDS} s; its output:\n{server.logs()[-3000:]}")
