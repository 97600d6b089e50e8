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

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docker_hubs import (NOTES, NOTES_TEXT, SPAWN_TIMEOUT, add_image, browser_of,
                               build_and_install, docker_hub, lab_dockerfile, steps_run)
from tests.test_hub import PREVIOUS_JUPYTERHUB

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


# ---- the site, made once -----------------------------------------------------------------

@pytest.fixture(scope="module")
def docker_site(podman_runtime, hub_base_image):
    with docker_hub(podman_runtime, tag="hwdock", image_prefix="hubworks-test", hub=f"""
        default_image = "lab"
        spawn_timeout = {SPAWN_TIMEOUT}
    """) as site:
        site.ws.add_recipe("site-notes", script=[f"echo {NOTES_TEXT} > "
                                                 "$PREFIX/share/site-notes/notes.txt"])
        add_image(site.ws, "lab", lab_dockerfile(hub_base_image))
        for name, change in BROKEN_IMAGES.items():
            add_image(site.ws, name, f"FROM {hub_base_image}\n{change}")
        build_and_install(site)
        yield site


@pytest.fixture
def browser(docker_site):
    with browser_of(docker_site) as browser:
        yield browser


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
    from tasks.core.settings import load_settings
    from tasks.images.discovery import read_image
    from tasks.images.hashing import image_hash
    from tasks.images.solve import Resolution

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
