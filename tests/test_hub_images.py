"""The hub runs the images build_images made: the whole chain, through podman's API here.

The story: an office has an internal package (site-notes) and an image that installs it from
the served channel while it builds. `doit build_images` builds the recipe, indexes the channel
and builds the images; `doit install_hub` with `hub.spawner = "docker"` installs a hub whose
users' servers run in containers. A system user logs in, picks the image by its folder name in
a picker that shows its internal packages, gets JupyterLab, and code in their kernel reads the
package's file as the image's user. Stopping the server removes its container; the home
folder stays in the user's volume. A second build is offered after an install_hub re-run that
runs only the images step, and a running server survives that and a restart of the hub.
Images that cannot serve users are left out with the reason, and each failure a spawn can meet
(image not offered, tag gone, server silent, engine stopped) gives the user a page and the
admin a log line, and leaves no container behind.

Needs root (useradd, PAM, podman's root-only API socket), podman with runc, mmdebstrap (for
the base image), PyPI and npm. The base image, the builds and the hub install are made once
for the module.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import DoitRun, Workspace, free_ports
from tests.test_hub import PREVIOUS_JUPYTERHUB, add_user, missing, public_tempdir

NOTES = "/opt/site-notes/share/site-notes/notes.txt"
NOTES_TEXT = "notes from the internal channel"
SPAWN_TIMEOUT = 25  # seconds; the sleepy image's spawn fails after it

# Installs the internal package site-notes from the served channel: the base image has Python
# but no conda, so it reads repodata.json and unpacks the package file itself.
LAB_DOCKERFILE = """\
FROM {base}
ARG CHANNEL_URL
USER root
RUN python3 -c "import io, json, sys, tarfile, urllib.request as web; \\
channel = sys.argv[1]; \\
index = json.load(web.urlopen(channel + 'noarch/repodata.json')); \\
name = next(f for f, p in index['packages'].items() if p['name'] == 'site-notes'); \\
tarfile.open(fileobj=io.BytesIO(web.urlopen(channel + 'noarch/' + name).read())) \\
.extractall('/opt/site-notes')" "${{CHANNEL_URL}}"
USER jovyan
"""

# Images that must not be offered, or whose spawns fail; each is the base image plus a change.
BROKEN_IMAGES = {
    "no-singleuser": "USER root\nRUN rm /opt/venv/bin/jupyterhub-singleuser\nUSER jovyan\n",
    "as-root": "USER root\n",
    "old-hub": (f"USER root\nRUN /opt/venv/bin/pip install --no-cache-dir --quiet "
                f"jupyterhub=={PREVIOUS_JUPYTERHUB}\nUSER jovyan\n"),
    # a jupyterhub-singleuser that never answers (the check still finds JupyterHub)
    "sleepy": ('USER root\nRUN printf \'#!/bin/sh\\ntrap "exit 0" TERM\\n'
               'while :; do sleep 1; done\\n\' > /opt/venv/bin/jupyterhub-singleuser\n'
               'USER jovyan\n'),
    # a jupyterhub-singleuser that exits at once, saying why
    "crashy": ('USER root\nRUN printf \'#!/bin/sh\\necho "crashy: no licence server" >&2\\n'
               'exit 3\\n\' > /opt/venv/bin/jupyterhub-singleuser\nUSER jovyan\n'),
    "doomed": "LABEL purpose=its-tag-is-removed-by-a-test\n",
}


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


# ---- the site, made once -----------------------------------------------------------------

def add_image(ws: Workspace, name: str, dockerfile: str) -> None:
    folder = ws.root / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(dockerfile)


@pytest.fixture(scope="module")
def docker_site(podman_runtime, hub_base_image):
    if os.geteuid() != 0:
        missing("root: installing a hub, adding users and podman's API socket need it")
    user = f"hwdock{os.getpid() % 100000}"
    password = add_user(user)
    root = Path(tempfile.mkdtemp(prefix="hubworks-dockerws-"))
    outer = public_tempdir("hubworks-dockerhub-")
    port, hub_port, api_port, images_port = free_ports(4)
    ws = Workspace(root)
    ws.env.update(podman_runtime.env)
    site = DockerSite(ws, outer / "hub", user, password, port, podman_runtime)
    ws.configure(f"""
        [recipes]
        package_format = "tar.bz2"
        [channel]
        port = 0
        [images]
        prefix = "hubworks-test"
        engine = "podman"
        isolation = "chroot"
        [hub]
        prefix = "{site.prefix}"
        port = {port}
        hub_port = {hub_port}
        proxy_api_port = {api_port}
        images_port = {images_port}
        spawner = "docker"
        allowed_users = ["{user}"]
        admin_users = ["{user}"]
        default_image = "lab"
        spawn_timeout = {SPAWN_TIMEOUT}
    """)
    ws.add_recipe("site-notes", script=[f"echo {NOTES_TEXT} > "
                                        "$PREFIX/share/site-notes/notes.txt"])
    add_image(ws, "lab", LAB_DOCKERFILE.format(base=hub_base_image))
    for name, change in BROKEN_IMAGES.items():
        add_image(ws, name, f"FROM {hub_base_image}\n{change}")
    try:
        site.runs["build"] = site.doit("build_images")
        assert site.runs["build"].returncode == 0, site.runs["build"].output
        site.runs["install"] = site.install()
        yield site
    finally:
        site.doit("hub_stop")
        for name in site.containers():
            podman_runtime.podman("rm", "--force", "--time", "0", name, check=False)
        podman_runtime.podman("volume", "rm", "--force", f"hubworks-home-{user}", check=False)
        subprocess.run(["userdel", "-r", user], capture_output=True)
        shutil.rmtree(outer, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def browser(docker_site):
    browser = Browser(docker_site)
    yield browser
    if browser.server():
        browser.stop_server()


# ---- the chain ---------------------------------------------------------------------------

@pytest.mark.slow
def test_the_whole_chain_from_a_recipe_to_code_in_a_users_kernel(docker_site, browser):
    site = docker_site
    built = site.runs["build"].executed
    for task in ("build_recipes:site-notes", "index_channel", "build_images:lab"):
        assert task in built, site.runs["build"].output
    install = site.runs["install"]
    assert {"dockerspawner", "engine", "images", "config", "health"} <= steps_run(install)
    assert "lab (internal packages: site-notes 1.0.0)" in install.output

    # the picker: images by folder name, labelled with their internal packages
    picker = browser.picker()
    assert ("lab", "lab (internal packages: site-notes 1.0.0)", True) in picker
    browser.pick("lab")  # /user/<name>/lab answered 200

    printed = browser.run_in_kernel(
        f"import os; print(open({NOTES!r}).read().strip(), os.getuid())\n"
        "open(os.path.expanduser('~/kept.txt'), 'w').write('kept in the volume')")
    image = next(i for i in site.offered()["offered"] if i["name"] == "lab")
    assert printed.split() == [*NOTES_TEXT.split(), str(image["uid"])]
    assert image["uid"] == 1000  # the image's user, never root

    assert list(site.containers()) == [f"jupyter-{site.user}"]
    # the engine's socket is root's alone: only the hub drives containers
    socket_file = site.prefix / "var" / "podman.sock"
    assert socket_file.stat().st_uid == 0 and not socket_file.stat().st_mode & 0o007
    assert stat.S_IMODE((site.prefix / "var").stat().st_mode) == 0o700
    browser.stop_server()
    assert site.wait_no_containers() == {}, "stopping the server removes its container"

    # the home folder lives in the user's named volume: the next server has the file
    volumes = site.runtime.podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert f"hubworks-home-{site.user}" in volumes
    browser.pick("lab")
    kept = browser.server_api("GET", "/contents/kept.txt", params={"content": "1"})
    assert kept.status_code == 200 and kept.json()["content"] == "kept in the volume"


@pytest.mark.slow
def test_a_new_build_is_offered_and_running_servers_survive_reinstall_and_restart(
        docker_site, browser, hub_base_image):
    site = docker_site
    browser.pick("lab")
    running = site.containers()

    add_image(site.ws, "lab-two", f"FROM {hub_base_image}\nLABEL edition=two\n")
    build = site.doit("build_images")
    assert [t for t in build.executed if t.startswith("build_images:")] == \
        ["build_images:lab-two"], build.output
    install = site.install()
    assert steps_run(install) == {"images"}, install.output
    assert re.search(r"checked lab-two; offers", install.output), "only the new tag is checked"
    assert "lab-two" in {image["name"] for image in site.offered()["offered"]}
    assert site.containers() == running
    browser.wait_for_lab()

    # a restart of the hub (and of podman's API service with it) keeps the container
    stopped = site.doit("hub_stop")
    assert "users' containers keep running" in stopped.output, stopped.output
    assert site.containers() == running
    started = site.doit("hub_start")
    assert started.returncode == 0, started.output
    assert site.containers() == running
    browser.wait_for_lab()
    assert browser.run_in_kernel("print(6 * 7)").strip() == "42"
    # the restarted hub knows the server's image from its database, not from the form
    status = site.doit("hub_status")
    assert re.search(rf"^  {site.user} +image lab, container ", status.output, re.M), \
        status.output

    browser.stop_server()  # the picker shows while no server runs
    assert ("lab-two", "lab-two (no internal packages)", False) in browser.picker()


@pytest.mark.slow
def test_a_users_container_gets_the_memory_and_cpu_limits(docker_site, browser):
    site = docker_site
    install = site.install({"HUBWORKS_HUB_MEM_LIMIT": "1G", "HUBWORKS_HUB_CPU_LIMIT": "0.5"})
    assert steps_run(install) == {"config", "health"}, install.output
    try:
        browser.pick("lab")
        (name,) = site.containers()
        host = json.loads(site.runtime.podman("inspect", name).stdout)[0]["HostConfig"]
        assert host["Memory"] == 1024 ** 3, host
        assert host["CpuQuota"] * 2 == host["CpuPeriod"], host
        # what the kernel enforces, read inside the container (cgroup v2 or v1 files)
        printed = browser.run_in_kernel(
            "import os\n"
            "for name in ('memory.max', 'memory/memory.limit_in_bytes', 'cpu.max',\n"
            "             'cpu/cpu.cfs_quota_us', 'cpu/cpu.cfs_period_us'):\n"
            "    path = '/sys/fs/cgroup/' + name\n"
            "    if os.path.exists(path): print(name, open(path).read().strip())\n"
            "print('MEM_LIMIT', os.environ['MEM_LIMIT'])")
        seen = dict(line.split(" ", 1) for line in printed.strip().splitlines())
        memory = seen.get("memory.max") or seen.get("memory/memory.limit_in_bytes")
        assert memory == str(1024 ** 3) and seen["MEM_LIMIT"] == memory, seen
        if "cpu.max" in seen:
            quota, period = seen["cpu.max"].split()
        else:
            quota, period = seen["cpu/cpu.cfs_quota_us"], seen["cpu/cpu.cfs_period_us"]
        assert int(quota) * 2 == int(period), seen
        status = site.doit("hub_status")
        assert re.search(rf"^  {site.user} +image lab, container {name}, up [^,]+, idle ",
                         status.output, re.M), status.output
    finally:
        browser.stop_server()
        back = site.install()
        assert steps_run(back) == {"config", "health"}, back.output


# ---- images left out, and spawns that fail -------------------------------------------------

@pytest.mark.slow
def test_images_that_cannot_serve_users_are_left_out_with_the_reason(docker_site, browser):
    site = docker_site
    install = site.runs["install"].output
    reasons = {
        "no-singleuser": "it has no jupyterhub-singleuser",
        "as-root": "it runs as root, and users' servers never do",
        "old-hub": f"it has JupyterHub {PREVIOUS_JUPYTERHUB} and the hub runs "
                   f"{site.offered()['offered'][0]['jupyterhub']}; their major versions must "
                   f"match",
    }
    for name, reason in reasons.items():
        assert re.search(rf"left out: {name} \(hubworks-test/{name}:\w+\): "
                         rf"{re.escape(reason)}; fix: ", install), install
    offered = {value for value, _, _ in browser.picker()}
    assert offered.isdisjoint(reasons) and "lab" in offered

    response = browser.spawn_via_api("no-singleuser")
    assert response.status_code == 400
    assert response.json()["message"] == \
        "The image 'no-singleuser' is not offered: it has no jupyterhub-singleuser."
    assert re.search(r"hubworks: \w+'s server, image 'no-singleuser' \(\S+\): asked for an "
                     r"image that is not offered: .*; fix: install jupyterhub-singleuser",
                     site.hub_log())
    assert site.containers() == {}


@pytest.mark.slow
def test_a_removed_image_tag_gives_the_user_a_page_and_the_admin_a_line(docker_site, browser):
    site = docker_site
    tag = next(i["tag"] for i in site.offered()["offered"] if i["name"] == "doomed")
    site.runtime.podman("rmi", "--force", tag, tag.rsplit(":", 1)[0] + ":latest")
    response = browser.spawn_via_api("doomed")
    assert response.status_code == 500
    said = "The image 'doomed' is missing on this server; your administrator has been told."
    assert response.json()["message"] == said
    assert said in browser.failure_page()
    assert (f"image 'doomed' ({tag}): the image tag {tag} is not in the container engine any "
            f"more; fix: run doit build_images, then doit install_hub") in site.hub_log()
    assert site.containers() == {}


@pytest.mark.slow
def test_a_server_that_never_answers_is_stopped_after_the_spawn_timeout(docker_site, browser):
    site = docker_site
    started = time.monotonic()
    browser.spawn_via_api("sleepy")
    assert time.monotonic() - started >= SPAWN_TIMEOUT
    assert (f"Your server (image 'sleepy') did not start within {SPAWN_TIMEOUT} seconds and "
            f"was stopped; your administrator has been told.") in browser.failure_page()
    assert re.search(rf"image 'sleepy' \(\S+\): the server did not answer at http://127\.0\.0\.1:"
                     rf"\d+/user/\w+/api within {SPAWN_TIMEOUT} s; .*fix: .*raise "
                     rf"hub\.spawn_timeout", site.hub_log())
    assert site.wait_no_containers() == {}, "nothing is left running after a failed spawn"


@pytest.mark.slow
def test_a_server_that_exits_at_start_is_reported_with_its_last_lines(docker_site, browser):
    site = docker_site
    browser.spawn_via_api("crashy")
    assert ("Your server (image 'crashy') stopped while starting; your administrator has been "
            "told.") in browser.failure_page()
    assert re.search(r"image 'crashy' \(\S+\): the server exited at start \(ExitCode=3\S* .*"
                     r"crashy: no licence server.*; fix: make jupyterhub-singleuser start",
                     site.hub_log()), site.hub_log()[-3000:]
    assert site.wait_no_containers() == {}, "nothing is left running after a failed spawn"


@pytest.mark.slow
def test_a_stopped_engine_gives_the_user_a_page_and_hub_start_brings_it_back(
        docker_site, browser):
    site = docker_site
    service = int((site.prefix / "var" / "podman-service.pid").read_text())
    os.kill(service, 15)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{service}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    response = browser.spawn_via_api("lab")
    said = ("The container engine that runs users' servers is not available; your "
            "administrator has been told.")
    assert response.status_code == 500 and response.json()["message"] == said
    assert said in browser.failure_page()
    assert re.search(r"image 'lab' \(\S+\): the container engine failed: its socket does not "
                     r"exist; fix: start the engine \(podman's API service: doit hub_start",
                     site.hub_log())
    assert site.containers() == {}

    again = site.doit("hub_start")
    assert "started podman's API service" in again.output, again.output
    browser.pick("lab")


@pytest.mark.slow
def test_without_an_engine_the_engine_step_names_the_socket_and_the_fix(docker_site):
    site = docker_site
    config = (site.prefix / "etc" / "hubworks_config.json").read_text()
    nowhere = f"unix://{site.prefix}/var/no-engine.sock"
    run = site.doit("install_hub", env={"HUBWORKS_HUB_DOCKER_URL": nowhere})
    assert run.returncode != 0
    assert "FAILED install_hub:engine" in run.output
    assert (f"users' servers run through the Docker API at {nowhere} (hub.docker_url), which "
            f"does not answer: the socket does not exist.") in run.output, run.output
    assert "fix: start the engine behind it, or correct hub.docker_url" in run.output
    assert (site.prefix / "etc" / "hubworks_config.json").read_text() == config
    assert steps_run(site.install()) == set()


@pytest.mark.slow
def test_a_default_image_that_was_never_built_stops_the_images_step(docker_site):
    site = docker_site
    run = site.doit("install_hub", env={"HUBWORKS_HUB_DEFAULT_IMAGE": "anlysis"})
    assert run.returncode != 0 and "FAILED install_hub:images" in run.output
    assert "hub.default_image is 'anlysis', and build_images has built no image of that name" \
        in run.output, run.output
    assert "fix: set hub.default_image (HUBWORKS_HUB_DEFAULT_IMAGE) to a folder name" in run.output
    assert steps_run(site.install()) == set()


# ---- environment.yml images (no hub needed) ----------------------------------------------

@pytest.mark.slow
def test_environment_images_get_the_hubs_singleuser_through_repo2dockers_appendix(
        workspace, podman_runtime):
    ws = workspace
    ws.env.update(podman_runtime.env)
    ws.configure('[channel]\nport = 0\n[images]\nengine = "podman"\n'
                 '[hub]\njupyterhub_version = "6.1.1"\n')
    folder = ws.root / "images" / "analysis"
    folder.mkdir()
    (folder / "environment.yml").write_text(
        "channels: [conda-forge]\ndependencies: [python=3.12]\n")
    ws.doit("build_images", check=False)  # needs conda-forge; offline it fails, after staging
    config = ws.state / "images" / "analysis" / "repo2docker_config.py"
    assert "c.Repo2Docker.appendix" in config.read_text()
    rendered = subprocess.run(
        [sys.executable, "-m", "repo2docker", "--no-build", "--config", str(config),
         "--user-id", "1000", "--user-name", "jovyan",
         str(ws.state / "images" / "analysis" / "stage")],
        capture_output=True, text=True, check=True).stdout
    appendix = rendered[rendered.index("# Appendix:"):]
    assert ('RUN ${MAMBA_EXE} install -p ${NB_PYTHON_PREFIX} -y "jupyterhub-singleuser=6.1.*" '
            '&& ${MAMBA_EXE} clean --all -f -y') in appendix


def test_the_hubs_jupyterhub_release_is_part_of_environment_images_hashes_only(tmp_path):
    from tasks.images.discovery import read_image
    from tasks.images.hashing import image_hash
    from tasks.images.solve import Resolution
    from tasks.core.settings import load_settings

    for name, filename, text in (("env", "environment.yml", "dependencies: [python]\n"),
                                 ("docker", "Dockerfile", "FROM scratch\n")):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / filename).write_text(text)

    def hashes(version: str) -> dict[str, str]:
        settings = load_settings(tmp_path, environ={"HUBWORKS_HUB_JUPYTERHUB_VERSION": version})
        return {name: image_hash(settings, read_image(tmp_path / "images" / name),
                                 Resolution([])) for name in ("env", "docker")}

    six, five = hashes("6.1.1"), hashes("5.4.6")
    assert six["env"] != five["env"], "a new hub release rebuilds environment.yml images"
    assert six["docker"] == five["docker"], "Dockerfile images are built as written"
