"""Image tests: an image reaches users only when its own tests pass.

The story: an office's reports image carries tests in images/reports/tests/: the ones this
repository ships for it, and the office's own: a command in the image, a notebook run in the
image's server with a cell's output checked, and a compose service (the image itself, serving
the templates) through pytest-docker on podman. `doit build_images` runs them against each new
build. A build whose tests pass is tagged latest and the hub offers it; one whose tests fail is
not: the run names the failing test with its output, the other images still build under
--continue, the hub keeps offering the previous build and a user's new server starts in it.
Fixing only the tests rebuilds no layer, runs them again and rolls the image out.

The image is a stand-in for images/reports (whose base image and conda-forge packages need the
internet): the offline hub base image with the shipped recipes' packages unpacked into its
Python prefix from the served channel, REPORT_TEMPLATES set as images/reports sets it. Needs root
(a hub with the docker spawner on podman's API, as in test_hub_images), podman with runc,
mmdebstrap, PyPI and npm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import DODO, REPO, interrupted_output
from tests.docker_hubs import (DockerSite, add_image, browser_of, build_and_install,
                               channel_dockerfile, docker_hub, steps_run)

TEMPLATES = "/opt/venv/share/lab-templates"

def reports_dockerfile(base: str) -> str:
    """images/reports as it would be without the internet: the packages come from the served
    channel, unpacked into the base image's Python prefix (so new-notebook finds the
    templates)."""
    return channel_dockerfile(base, ("lab-templates", "lab-settings", "new-notebook"),
                              "/opt/venv", env=f"ENV REPORT_TEMPLATES={TEMPLATES}\n")


# The office's own tests, next to the ones images/reports ships.
OFFICE_TESTS = '''\
import urllib.request
from pathlib import Path


def test_new_notebook_lists_the_templates(run_in_image):
    run = run_in_image(["new-notebook", "list"])
    assert run.returncode == 0, run
    assert run.stdout.split() == {expected}


def test_the_report_notebook_prints_its_title(image_server):
    outputs = image_server.run_notebook(Path(__file__).with_name("title.ipynb"))
    assert outputs[-1] == "Report title\\n"


def test_a_compose_service_of_the_image_serves_the_stylesheet(docker_services, docker_ip,
                                                              run_in_image):
    url = f"http://{{docker_ip}}:{{docker_services.port_for('templates', 8000)}}/report.css"

    def answers():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    docker_services.wait_until_responsive(answers, timeout=60, pause=0.3)
    served = urllib.request.urlopen(url, timeout=10).read().decode()
    assert served == run_in_image('cat "$REPORT_TEMPLATES/report.css"').stdout
'''
PASSING = OFFICE_TESTS.format(expected='["analysis", "report"]')
FAILING = OFFICE_TESTS.format(expected='["report"]')  # as if a template had been dropped
FIXED = OFFICE_TESTS.format(expected='sorted(["report", "analysis"])')  # passes; new content

TITLE_NOTEBOOK = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
    {"cell_type": "markdown", "metadata": {}, "source": "The report template's title."},
    {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
     "source": "import json, os\n"
               "path = os.path.join(os.environ['REPORT_TEMPLATES'], 'report.ipynb')\n"
               "template = json.load(open(path))"},
    {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
     "source": "print(template['cells'][0]['source'][0].lstrip('# ').strip())"},
]}

COMPOSE = """\
services:
  templates:
    image: ${IMAGE_TAG}
    command: ["python3", "-m", "http.server", "8000", "--directory", "%s"]
    ports:
      - "8000"
""" % TEMPLATES

TEST_NAMES = [  # the shipped ones, then the office's
    "test_reports.py::test_the_templates_are_where_report_templates_points",
    "test_reports.py::test_a_report_made_from_the_template_renders",
    "test_reports.py::test_the_kernel_sees_the_templates",
    "test_office.py::test_new_notebook_lists_the_templates",
    "test_office.py::test_the_report_notebook_prints_its_title",
    "test_office.py::test_a_compose_service_of_the_image_serves_the_stylesheet",
]


def leftovers(runtime) -> dict[str, list[str]]:
    """What image tests might leave in the engine: their containers, compose containers,
    pods and networks (the default network aside)."""
    def names(*args: str) -> list[str]:
        return runtime.podman(*args).stdout.split()
    return {
        "test containers": names("ps", "-a", "--filter", "label=org.hubworks.image-test",
                                 "--format", "{{.Names}}"),
        "compose containers": names("ps", "-a", "--filter", "label=com.docker.compose.project",
                                    "--format", "{{.Names}}"),
        "pods": names("pod", "ls", "--format", "{{.Name}}"),
        "networks": [n for n in names("network", "ls", "--format", "{{.Name}}")
                     if n != "podman"],
    }


def nothing_left(runtime) -> bool:
    return not any(leftovers(runtime).values())


def image_id(runtime, ref: str) -> str:
    return runtime.podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def record(site: DockerSite, image: str) -> dict:
    return json.loads((site.ws.state / "images" / f"{image}.json").read_text())


def offered_tag(site: DockerSite, image: str) -> str:
    return next(i["tag"] for i in site.offered()["offered"] if i["name"] == image)


def write_office_tests(site: DockerSite, text: str) -> None:
    (site.ws.root / "images" / "reports" / "tests" / "test_office.py").write_text(text)


# ---- the site, made once -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tested_site(podman_runtime, hub_base_image):
    with docker_hub(podman_runtime, tag="hwimgt", image_prefix="hubworks-test",
                    channel_port=True, hub='default_image = "reports"') as site:
        ws = site.ws
        shutil.rmtree(ws.root / "recipes")
        shutil.copytree(REPO / "recipes", ws.root / "recipes")
        add_image(ws, "reports", reports_dockerfile(hub_base_image))
        tests = ws.root / "images" / "reports" / "tests"
        shutil.copytree(REPO / "images" / "reports" / "tests", tests)
        write_office_tests(site, PASSING)
        (tests / "title.ipynb").write_text(json.dumps(TITLE_NOTEBOOK, indent=1))
        (tests / "docker-compose.yml").write_text(COMPOSE)
        build_and_install(site)
        yield site


@pytest.fixture
def browser(tested_site):
    with browser_of(tested_site) as browser:
        yield browser


# ---- the story -----------------------------------------------------------------------------

@pytest.mark.slow
def test_an_image_whose_tests_pass_is_tagged_latest_and_offered(tested_site):
    site, runtime = tested_site, tested_site.runtime
    build = site.runs["build"].output
    assert "build_images:reports" in site.runs["build"].executed
    assert re.search(r"image reports: built hubworks-test/reports:\w+; tests: 6 passed", build)
    log = (site.ws.state / "logs" / "images" / "reports.log").read_text()
    for name in TEST_NAMES:  # the shipped tests, the notebook's cell, the compose service
        assert f"{name} PASSED" in log, log[-3000:]

    built = record(site, "reports")
    assert built["state"] == "built"
    assert built["tests"]["passed"] == 6 and built["tests"]["summary"] == "6 passed"
    assert image_id(runtime, "hubworks-test/reports:latest") == image_id(runtime, built["tag"])
    assert offered_tag(site, "reports") == built["tag"]
    assert nothing_left(runtime), leftovers(runtime)
    # the tests ran from a copy: nothing pytest writes lands in images/
    assert sorted(p.name for p in (site.ws.root / "images" / "reports" / "tests").iterdir()) \
        == ["docker-compose.yml", "test_office.py", "test_reports.py", "title.ipynb"]


@pytest.mark.slow
def test_failing_tests_keep_users_on_the_previous_build_until_fixed_tests_pass(
        tested_site, browser, hub_base_image):
    site, runtime = tested_site, tested_site.runtime
    previous = record(site, "reports")["tag"]

    # a test that fails, and another image built in the same run
    write_office_tests(site, FAILING)
    add_image(site.ws, "other", f"FROM {hub_base_image}\nLABEL purpose=built-meanwhile\n")
    failed = site.doit("--continue", "build_images")
    assert failed.returncode != 0
    assert {"build_images:reports", "build_images:other"} <= set(failed.executed)
    assert "FAILED build_images:reports" in failed.output
    assert re.search(r"^ok build_images:other", failed.output, re.M), failed.output
    attempt = re.search(r"image 'reports': its tests failed against (hubworks-test/reports:\w+) "
                        r"\(1 failed, 5 passed\); it is not tagged latest, pushed or offered "
                        rf"\(users keep {re.escape(previous)}\)\.", failed.output)
    assert attempt, failed.output
    assert "FAILED images/reports/tests/test_office.py::test_new_notebook_lists_the_templates" \
        in failed.output
    assert "assert ['analysis', 'report'] == ['report']" in failed.output  # its output
    log = site.ws.state / "logs" / "images" / "reports.log"
    assert f"full log: {log}" in failed.output
    assert "fix: fix the image or its tests in images/reports/tests/" in failed.output

    # :latest, the record and the hub stay on the previous build; the failed one is kept
    assert image_id(runtime, "hubworks-test/reports:latest") == image_id(runtime, previous)
    assert image_id(runtime, attempt.group(1))
    kept = record(site, "reports")
    assert kept["tag"] == previous and kept["state"] == "tests failed"
    assert kept["tests_failed"]["tag"] == attempt.group(1)
    assert kept["tests_failed"]["log"] == str(log)
    (failure,) = kept["tests_failed"]["failures"]
    assert failure["test"] == "test_office.py::test_new_notebook_lists_the_templates"
    assert "AssertionError" in failure["output"]
    assert nothing_left(runtime), leftovers(runtime)
    # what the hub's Images page shows of it
    status = subprocess.run([sys.executable, "-m", "tasks.images.status", "--json"],
                            cwd=site.ws.root, env=site.ws.env, capture_output=True, text=True)
    row = next(r for r in json.loads(status.stdout.splitlines()[-1])["images"]
               if r["name"] == "reports")
    assert row["state"] == "tests failed" and row["tag"] == previous, row
    assert "AssertionError" in row["tests_failed"]["failures"][0]["output"]

    install = site.install()
    assert "images" in steps_run(install)
    assert offered_tag(site, "reports") == previous
    assert "other" in {image["name"] for image in site.offered()["offered"]}
    browser.pick("reports")  # a user's new server: the previous build
    (container,) = site.containers()
    started = runtime.podman("container", "inspect", "--format", "{{.Image}}", container)
    assert started.stdout.strip() == image_id(runtime, previous)
    browser.stop_server()

    # only the tests change: no layer is rebuilt, the tests run again, the image rolls out
    write_office_tests(site, FIXED)
    fixed = site.doit("build_images")
    assert fixed.returncode == 0, fixed.output
    assert [t for t in fixed.executed if t.startswith("build_images:")] == \
        ["build_images:reports"], fixed.output
    new = record(site, "reports")
    assert new["state"] == "built" and "tests_failed" not in new
    assert new["tag"] not in (previous, attempt.group(1))
    assert f"image reports: built {new['tag']}; tests: 6 passed" in fixed.output

    def layers(ref: str) -> str:
        return runtime.podman("image", "inspect", "--format", "{{.RootFS.Layers}}", ref).stdout
    # no layer is built anew: the fixed build takes them from the cache, which holds the
    # previous build's or (when that attempt built its own) the failed attempt's
    assert layers(new["tag"]) in (layers(previous), layers(attempt.group(1))), \
        "changing only tests/ rebuilds no layer"
    assert image_id(runtime, "hubworks-test/reports:latest") == image_id(runtime, new["tag"])
    site.install()
    assert offered_tag(site, "reports") == new["tag"]


# ---- Ctrl-C --------------------------------------------------------------------------------

WAITING_TESTS = """\
def test_waits(docker_services, run_in_image):
    run_in_image("echo waiting-for-ctrl-c; sleep 300")
"""
BUSYBOX_COMPOSE = """\
services:
  web:
    image: ${IMAGE_TAG}
    command: ["httpd", "-f", "-p", "8080"]
    ports:
      - "8080"
"""


@pytest.mark.slow
def test_ctrl_c_during_image_tests_removes_their_containers(workspace, podman_runtime,
                                                             runtime_busybox_image):
    ws = workspace
    ws.env.update(podman_runtime.env)
    ws.configure('[channel]\nport = 0\n[images]\nprefix = "hubworks-test"\nengine = "podman"\n'
                 'isolation = "chroot"\n')
    add_image(ws, "waits", f"FROM {runtime_busybox_image}\n")
    tests = ws.root / "images" / "waits" / "tests"
    tests.mkdir()
    (tests / "test_waits.py").write_text(WAITING_TESTS)
    (tests / "docker-compose.yml").write_text(BUSYBOX_COMPOSE)
    doit = subprocess.Popen(
        [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root), "build_images"],
        env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (leftovers(podman_runtime)["test containers"]
                   and leftovers(podman_runtime)["compose containers"]):
            assert time.monotonic() < deadline and doit.poll() is None, doit.stdout.read()
            time.sleep(0.3)
        os.killpg(doit.pid, signal.SIGINT)  # Ctrl-C in a terminal
        output = interrupted_output(doit)
    finally:
        if doit.poll() is None:
            os.killpg(doit.pid, signal.SIGKILL)
    assert "interrupted: build_images:waits" in output, output
    assert nothing_left(podman_runtime), leftovers(podman_runtime)
    assert not (ws.state / "images" / "waits.json").exists()  # not recorded as built
    latest = podman_runtime.podman("image", "exists", "hubworks-test/waits:latest", check=False)
    assert latest.returncode == 1, "not tagged latest"


# ---- the hash and the staged copy ----------------------------------------------------------

def test_tests_are_part_of_the_hash_but_not_of_the_staged_copy(tmp_path):
    from tasks.core.settings import load_settings
    from tasks.images.discovery import read_image
    from tasks.images.hashing import image_hash
    from tasks.images.solve import Resolution
    from tasks.images.staging import stage_image

    folder = tmp_path / "images" / "lab"
    (folder / "tests").mkdir(parents=True)
    (folder / "src" / "tests").mkdir(parents=True)
    (folder / "Dockerfile").write_text("FROM scratch\nCOPY src /src\n")
    (folder / "src" / "tests" / "data.txt").write_text("part of the image\n")
    (folder / "tests" / "test_lab.py").write_text("def test_lab(): pass\n")
    settings = load_settings(tmp_path, environ={})

    def hashed() -> str:
        return image_hash(settings, read_image(folder), Resolution([]))

    first = hashed()
    (folder / "tests" / "test_lab.py").write_text("def test_lab(): assert True\n")
    second = hashed()
    assert second != first, "a changed test runs the tests again, against a new tag"
    (folder / "tests" / ".pytest_cache").mkdir()
    (folder / "tests" / ".pytest_cache" / "README.md").write_text("pytest run by hand\n")
    assert hashed() == second

    stage = stage_image(read_image(folder), tmp_path / "stage", "internal", "http://x/",
                        Resolution([]))
    staged = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    assert staged == ["Dockerfile", "src", "src/tests", "src/tests/data.txt"]
