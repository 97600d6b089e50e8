"""A hub whose users' servers run in containers of images build_images made (podman here).

Shared by the modules that need one: each makes its own workspace and hub with
``docker_hub()``, adds its recipes and images, then ``build_and_install()``; the context
manager's exit stops the hub and removes its containers, home volumes, users and folders.
``Browser`` is a user logged in through the login form.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import requests

from tests.conftest import DoitRun, Workspace, free_ports
from tests.test_hub import add_user, missing, public_tempdir

NOTES = "/opt/site-notes/share/site-notes/notes.txt"
NOTES_TEXT = "notes from the internal channel"
SPAWN_TIMEOUT = 25  # seconds; the sleepy image's spawn fails after it


def channel_dockerfile(base: str, packages: tuple[str, ...], into: str, env: str = "") -> str:
    """A Dockerfile FROM ``base`` that unpacks ``packages`` from the channel build_images
    serves (CHANNEL_URL) into ``into``: the base image has Python but no conda, so it reads
    repodata.json and unpacks each package file itself. ``env``: ENV lines to add."""
    unpack = ("import io, json, sys, tarfile, urllib.request as web; \\\n"
              "channel = sys.argv[1]; \\\n"
              "index = json.load(web.urlopen(channel + 'noarch/repodata.json')); \\\n"
              "[tarfile.open(fileobj=io.BytesIO(web.urlopen(channel + 'noarch/' + name)"
              ".read())) \\\n"
              f".extractall('{into}') for name, package in index['packages'].items() \\\n"
              f"if package['name'] in {tuple(packages)!r}]")
    return (f"FROM {base}\nARG CHANNEL_URL\nUSER root\n"
            f'RUN python3 -c "{unpack}" "${{CHANNEL_URL}}"\n{env}USER jovyan\n')


def lab_dockerfile(base: str) -> str:
    """The image that installs the internal package site-notes from the served channel."""
    return channel_dockerfile(base, ("site-notes",), "/opt/site-notes")


def steps_run(run: DoitRun) -> set[str]:
    """install_hub steps whose actions ran."""
    return set(re.findall(r"^\.  install_hub:(\w+)", run.output, re.M))


@dataclass
class DockerSite:
    """A workspace whose hub runs users' servers in containers of its built images."""

    ws: Workspace
    prefix: Path
    user: str
    password: str
    port: int
    runtime: object  # tests.podman_fixtures.PodmanRuntime
    runs: dict[str, DoitRun] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)  # every user of the hub

    def as_user(self, name: str) -> DockerSite:
        """The same hub, seen by another of its users."""
        return replace(self, user=name, password=self.passwords[name])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def doit(self, *args: str, env: dict[str, str] | None = None) -> DoitRun:
        saved = dict(self.ws.env)
        self.ws.env.update(env or {})
        try:
            return self.ws.doit(*args, check=False)
        finally:
            self.ws.env = saved

    def install(self, env: dict[str, str] | None = None) -> DoitRun:
        run = self.doit("install_hub", env=env)
        assert run.returncode == 0, run.output
        return run

    def hub_log(self) -> str:
        return (self.prefix / "var" / "jupyterhub.log").read_text(errors="replace")

    def offered(self) -> dict:
        return json.loads((self.prefix / "etc" / "images.json").read_text())

    def containers(self) -> dict[str, str]:
        """name -> id of every container this hub started (running or not)."""
        out = self.runtime.podman("ps", "-a", "--filter", f"label=org.hubworks.hub={self.prefix}",
                                  "--format", "{{.Names}} {{.ID}}").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_no_containers(self, seconds: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while (left := self.containers()) and time.monotonic() < deadline:
            time.sleep(0.3)
        return left


class Browser:
    """A user's browser on the hub, logged in through the login form."""

    def __init__(self, site: DockerSite):
        self.site = site
        self.session = requests.Session()
        self.session.get(f"{site.url}/hub/login", timeout=30).raise_for_status()
        response = self.session.post(
            f"{site.url}/hub/login?next=",
            data={"username": site.user, "password": site.password, "_xsrf": self.xsrf()},
            timeout=60)
        assert response.ok and "/hub/login" not in response.url, "login failed"
        self._token = ""

    def xsrf(self) -> str:
        found = {c.path: c.value for c in self.session.cookies if c.name == "_xsrf"}
        return found.get("/hub/") or next(iter(found.values()))

    def hub_api(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, f"{self.site.url}/hub/api{path}",
                                    headers={"X-XSRFToken": self.xsrf()}, timeout=60, **kwargs)

    @property
    def token(self) -> str:
        if not self._token:
            made = self.hub_api("POST", f"/users/{self.site.user}/tokens", json={"note": "test"})
            assert made.status_code == 201, made.text
            self._token = made.json()["token"]
        return self._token

    def picker(self) -> list[tuple[str, str, bool]]:
        """(value, label, preselected) of every image the spawn form offers."""
        page = self.session.get(f"{self.site.url}/hub/spawn", timeout=30)
        assert page.status_code == 200, page.text[-2000:]
        return [(html.unescape(value), html.unescape(label), bool(selected)) for value, selected,
                label in re.findall(r'<option value="([^"]*)"( selected)?>([^<]*)</option>',
                                    page.text)]

    def pick(self, image: str) -> float:
        """Submit the picker with ``image``; seconds until /user/<name>/lab answers 200."""
        started = time.monotonic()
        response = self.session.post(f"{self.site.url}/hub/spawn",
                                     data={"image": image, "_xsrf": self.xsrf()}, timeout=60)
        assert response.status_code == 200, response.text[-2000:]
        self.wait_for_lab()
        return time.monotonic() - started

    def wait_for_lab(self, seconds: float = 90) -> None:
        url = f"{self.site.url}/user/{self.site.user}/lab"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lab = self.session.get(url, timeout=60)
            if lab.status_code == 200 and lab.url == url:
                return
            time.sleep(0.5)
        pytest.fail(f"{url} never answered 200; last: {lab.status_code} {lab.url}\n"
                    f"{self.site.hub_log()[-3000:]}")

    def server(self) -> dict:
        user = self.hub_api("GET", f"/users/{self.site.user}").json()
        return user["servers"].get("", {})

    def spawn_via_api(self, image: str) -> requests.Response:
        """POST /hub/api/users/<name>/server {"image": ...}; waits until it is not pending."""
        response = self.hub_api("POST", f"/users/{self.site.user}/server", json={"image": image})
        deadline = time.monotonic() + SPAWN_TIMEOUT + 90
        while self.server().get("pending") and time.monotonic() < deadline:
            time.sleep(0.5)
        return response

    def failure_page(self) -> str:
        page = self.session.get(f"{self.site.url}/hub/spawn-pending/{self.site.user}",
                                timeout=30)
        return html.unescape(page.text)

    def stop_server(self) -> None:
        response = self.hub_api("DELETE", f"/users/{self.site.user}/server")
        assert response.status_code in (202, 204), response.text
        deadline = time.monotonic() + 60
        while self.server() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not self.server(), "the server did not stop"

    def server_api(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.site.url}/user/{self.site.user}/api{path}",
                                headers={"Authorization": f"token {self.token}"}, timeout=60,
                                **kwargs)

    def run_in_kernel(self, code: str) -> str:
        """Run ``code`` in a new kernel of the user's server; what it printed."""
        import websocket

        kernel = self.server_api("POST", "/kernels", json={})
        assert kernel.status_code == 201, kernel.text
        channels = websocket.create_connection(
            f"ws://127.0.0.1:{self.site.port}/user/{self.site.user}/api/kernels/"
            f"{kernel.json()['id']}/channels",
            header=[f"Authorization: token {self.token}"], timeout=60)
        msg_id = uuid.uuid4().hex
        channels.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "version": "5.3",
                       "username": self.site.user, "session": uuid.uuid4().hex, "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False}}))
        printed, errors = [], []
        try:
            while True:
                message = json.loads(channels.recv())
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "stream":
                    printed.append(content["text"])
                elif kind == "error":
                    errors.append(f"{content['ename']}: {content['evalue']}")
                elif kind == "status" and content["execution_state"] == "idle":
                    break
        finally:
            channels.close()
            self.server_api("DELETE", f"/kernels/{kernel.json()['id']}")
        assert not errors, errors
        return "".join(printed)



# ---- a hub, made by each module that needs one ---------------------------------------------

def add_image(ws: Workspace, name: str, dockerfile: str) -> None:
    folder = ws.root / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(dockerfile)


@contextmanager
def docker_hub(runtime, *, tag: str, image_prefix: str, users: tuple[str, ...] = ("",),
               hub: str = "", channel_port: bool = False) -> Iterator[DockerSite]:
    """A workspace configured for a docker-spawner hub, not yet built or installed.

    ``tag`` starts the system users' names (one per entry of ``users``, the first is the
    site's user and an admin); ``image_prefix`` keeps the module's images apart from other
    modules'; ``hub`` adds lines to the ``[hub]`` table. ``channel_port``: a fixed free port
    for the channel rather than any, so that CHANNEL_URL, and with it the layer cache's key,
    stays the same from build to build.
    """
    if os.geteuid() != 0:
        missing("root: installing a hub, adding users and podman's API socket need it")
    names = [f"{tag}{os.getpid() % 100000}{suffix}" for suffix in users]
    passwords = {}
    root = Path(tempfile.mkdtemp(prefix=f"hubworks-{tag}-ws-"))
    outer = public_tempdir(f"hubworks-{tag}-hub-")
    port, hub_port, api_port, images_port, fixed_port = free_ports(5)
    ws = Workspace(root)
    ws.env.update(runtime.env)
    site = DockerSite(ws, outer / "hub", names[0], "", port, runtime)
    listed = ", ".join(f'"{name}"' for name in names)
    ws.configure(f"""
        [recipes]
        package_format = "tar.bz2"
        [channel]
        port = {fixed_port if channel_port else 0}
        [images]
        prefix = "{image_prefix}"
        engine = "podman"
        isolation = "chroot"
        [hub]
        prefix = "{site.prefix}"
        port = {port}
        hub_port = {hub_port}
        proxy_api_port = {api_port}
        images_port = {images_port}
        spawner = "docker"
        allowed_users = [{listed}]
        admin_users = ["{names[0]}"]
    """ + "\n".join(f"        {line.strip()}" for line in hub.strip().splitlines()))
    try:
        for name in names:
            passwords[name] = add_user(name)
        site.passwords, site.password = passwords, passwords[names[0]]
        yield site
    finally:
        site.doit("hub_stop")
        for name in site.containers():
            runtime.podman("rm", "--force", "--time", "0", name, check=False)
        for name in names:
            runtime.podman("volume", "rm", "--force", f"hubworks-home-{name}", check=False)
            subprocess.run(["userdel", "-r", name], capture_output=True)
        shutil.rmtree(outer, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def browser_of(site: DockerSite) -> Iterator[Browser]:
    """The site's user logged in; their server, if the test left one running, stopped after."""
    browser = Browser(site)
    yield browser
    if browser.server():
        browser.stop_server()


def build_and_install(site: DockerSite, env: dict[str, str] | None = None) -> None:
    """build_images, then install_hub; both runs are kept in ``site.runs``."""
    site.runs["build"] = site.doit("build_images")
    assert site.runs["build"].returncode == 0, site.runs["build"].output
    site.runs["install"] = site.install(env)
