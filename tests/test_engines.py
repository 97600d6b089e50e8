"""Container engines: choosing one, and repo2docker building with podman through hubworks-podman.

Real podman with a private store (tests.podman_fixtures); builds start FROM a busybox image
made locally, so nothing needs a registry or the internet. repo2docker runs as a user runs it
where podman cannot start OCI containers: with BUILDAH_ISOLATION=chroot.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.core.errors import HubworksError
from tasks.images.engines import select_engine
from tests.conftest import free_port
from tests.podman_fixtures import image_file, registry_tags

DOCKERFILE = """\
FROM {base}
ARG GREETING
ARG NB_USER
# the build arg, the user repo2docker passes, and a file from a server on the host's loopback
RUN mkdir -p /opt/data && echo "$GREETING $NB_USER" > /opt/data/greeting \\
 && wget -q -O /opt/data/payload.txt "http://127.0.0.1:{port}/payload.txt"
"""
ENVIRONMENT_YML = "dependencies:\n  - python=3.12\n"
FAILING_STEP = 'echo "hubworks-test: this step fails on purpose" && false'
# the words runc 1.1 prints when the kernel refuses to seal its copy of itself (EBUSY)
RUNC_SEAL_RACE = "Close_Fd sealing memfd copy: Device or resource busy"


@pytest.fixture
def podman(podman_storage):
    return select_engine("podman")


@pytest.fixture
def no_docker_daemon(monkeypatch, tmp_path_factory):
    """Docker as on a machine whose daemon is not running: its socket does not exist."""
    # a folder named after no test: repo2docker reads "podman" in DOCKER_HOST as podman's socket
    folder = tmp_path_factory.mktemp("docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{folder}/no-daemon.sock")


@pytest.fixture
def empty_path(monkeypatch, tmp_path):
    """PATH with neither docker nor podman on it."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))


@contextmanager
def serving(handler):
    """An http.server on 127.0.0.1 in a thread, answering with ``handler``; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served_folder(tmp_path):
    """A folder served by http.server on 127.0.0.1, as build_images serves the channel."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    with serving(handler) as port:
        yield folder, port


@pytest.fixture
def runc_answers():
    """A server on 127.0.0.1 whose n-th GET answers the n-th of ``answers`` (then the last):
    a RUN step that prints it fails or starts as runc's seal race makes a step fail or start,
    which cannot be caused on demand."""
    answers, asked = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = answers[min(len(asked), len(answers) - 1)].encode()
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with serving(Handler) as port:
        yield answers, asked, port


def repo2docker(repo, *args, env=None, isolation="chroot"):
    """Run repo2docker as the build_images task does; returns (exit code, output)."""
    env = dict(os.environ if env is None else env)
    env.pop("BUILDAH_ISOLATION", None)
    if isolation:
        env["BUILDAH_ISOLATION"] = isolation
    proc = subprocess.run([sys.executable, "-m", "repo2docker", "--engine", "hubworks-podman",
                           "--user-id", "1000", "--user-name", "jovyan", *args, str(repo)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=600)
    return proc.returncode, proc.stdout


def repo_with(tmp_path, name, text):
    """A repo2docker repository holding one file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / name).write_text(text)
    return repo


def one_step(base: str, step: str) -> str:
    return f"FROM {base}\nRUN {step}\n"


def host_network_config(tmp_path):
    """repo2docker's config as build_images writes it: RUN steps reach the host's loopback."""
    config = tmp_path / "repo2docker_config.py"
    config.write_text("c.DockerEngine.extra_buildx_build_args = ['--network=host']\n")
    return config


def engine_error(choice: str = "auto") -> HubworksError:
    with pytest.raises(HubworksError) as caught:
        select_engine(choice)
    return caught.value


def test_auto_picks_podman_and_says_why_not_docker(podman_storage, no_docker_daemon):
    engine = select_engine()
    assert (engine.name, engine.cli, engine.repo2docker_engine) == (
        "podman", "podman", "hubworks-podman")
    assert "Docker not used" in engine.reason and "docker" in engine.reason


def test_docker_host_at_podman_means_podman(podman_storage, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/podman/podman.sock")
    engine = select_engine()
    assert engine.name == "podman" and "DOCKER_HOST names podman" in engine.reason


def test_docker_when_asked_for_says_why_it_cannot(no_docker_daemon):
    error = engine_error("docker")
    assert "Docker cannot build images here" in error.message
    assert "images.engine" in error.fix


def test_no_engine_names_what_was_tried_and_the_fix(empty_path):
    error = engine_error()
    assert "`docker` is not on PATH" in error.message
    assert "`podman` is not on PATH" in error.message
    assert "apt-get install podman" in error.fix and "HUBWORKS_IMAGES_ENGINE" in error.fix
    assert "podman cannot build images here" in engine_error("podman").message


def test_unknown_choice_lists_the_valid_ones():
    error = engine_error("buildah")
    assert "'buildah'" in error.message and "auto, docker, podman" in error.fix


def test_repo2docker_without_podman_says_so(tmp_path):
    repo = repo_with(tmp_path, "Dockerfile", "FROM scratch\n")
    env = dict(os.environ, PATH=str(tmp_path))
    code, output = repo2docker(repo, "--no-run", "--image-name", "hubworks-test/none:1", env=env)
    assert code == 1
    assert "podman cannot build images here: `podman` is not on PATH" in output


def test_repo2docker_builds_with_podman_on_the_host_network(
        podman, busybox_base_image, served_folder, tmp_path):
    folder, port = served_folder
    (folder / "payload.txt").write_text("served from the host\n")
    dockerfile = DOCKERFILE.format(base=busybox_base_image, port=port)
    repo = repo_with(tmp_path, "Dockerfile", dockerfile)
    ref = "hubworks-test/served:1"
    config = host_network_config(tmp_path)
    code, output = repo2docker(repo, "--no-run", "--image-name", ref, "--config", str(config),
                               "--build-arg", "GREETING=hello")
    assert code == 0, output
    assert podman.image_exists(ref)
    assert image_file(ref, "/opt/data/payload.txt") == b"served from the host\n"
    assert image_file(ref, "/opt/data/greeting") == b"hello jovyan\n"

    # repo2docker finds the image again (inspect_image), then cannot run it without the API
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    code, output = repo2docker(repo, "--image-name", ref, env=env)
    assert f"Reusing existing image ({ref})" in output
    assert code != 0 and "--no-run" in output


def test_failed_build_fails_repo2docker_and_shows_why(podman, busybox_base_image, tmp_path):
    repo = repo_with(tmp_path, "Dockerfile", one_step(busybox_base_image, FAILING_STEP))
    ref = "hubworks-test/failing:1"
    code, output = repo2docker(repo, "--no-run", "--image-name", ref)
    assert code != 0
    assert "hubworks-test: this step fails on purpose" in output
    assert f"podman build of {ref} failed" in output
    assert "building once more" not in output  # only runc's race is worth a second build
    assert not podman.image_exists(ref)


def runc_step(port: int) -> str:
    """A RUN step that prints the server's answer and starts only when it says "started"."""
    return (f'answer="$(wget -q -O- http://127.0.0.1:{port}/runc)" && echo "$answer" '
            '&& test "$answer" = started')


def test_a_build_that_lost_runcs_seal_race_is_built_once_more(
        podman, busybox_base_image, runc_answers, tmp_path):
    answers, asked, port = runc_answers
    answers += [RUNC_SEAL_RACE, "started"]
    repo = repo_with(tmp_path, "Dockerfile", one_step(busybox_base_image, runc_step(port)))
    ref = "hubworks-test/seal-race:1"
    code, output = repo2docker(repo, "--no-run", "--image-name", ref,
                               "--config", str(host_network_config(tmp_path)))
    assert code == 0, output
    assert len(asked) == 2
    assert "not a fault of the build); building once more" in output
    assert podman.image_exists(ref)


def test_a_build_that_loses_runcs_seal_race_twice_fails(
        podman, busybox_base_image, runc_answers, tmp_path):
    answers, asked, port = runc_answers
    answers.append(RUNC_SEAL_RACE)
    repo = repo_with(tmp_path, "Dockerfile", one_step(busybox_base_image, runc_step(port)))
    ref = "hubworks-test/seal-race:2"
    code, output = repo2docker(repo, "--no-run", "--image-name", ref,
                               "--config", str(host_network_config(tmp_path)))
    assert code != 0
    assert len(asked) == 2  # built once more, not again and again
    assert f"podman build of {ref} failed" in output
    assert not podman.image_exists(ref)


def test_runtime_failure_suggests_chroot_isolation(podman, busybox_base_image, tmp_path):
    repo = repo_with(tmp_path, "Dockerfile", one_step(busybox_base_image, "true"))
    code, output = repo2docker(repo, "--no-run", "--image-name", "hubworks-test/oci:1",
                               isolation="")
    if code == 0:
        pytest.skip("this host starts containers, so podman builds without chroot isolation")
    assert 'images.isolation = "chroot"' in output and "BUILDAH_ISOLATION=chroot" in output


def test_tag_exists_remove_with_short_and_full_names(podman, busybox_base_image):
    short = "hubworks-test/roundtrip:1"
    assert not podman.image_exists(short)
    podman.tag(busybox_base_image, short)
    assert podman.image_exists(short) and podman.image_exists(f"localhost/{short}")
    assert podman.image_id(short) == podman.image_id(busybox_base_image)
    podman.remove(short)
    assert not podman.image_exists(short)
    assert podman.image_id(short) is None
    podman.remove(short)  # already gone: nothing to do
    assert podman.image_exists(busybox_base_image)


def test_tag_of_a_missing_image_names_it(podman, podman_storage):
    with pytest.raises(HubworksError, match="could not tag hubworks-test/absent:1"):
        podman.tag("hubworks-test/absent:1", "hubworks-test/other:1")


def test_push_failure_names_the_image_and_registry(podman, busybox_base_image):
    registry = f"127.0.0.1:{free_port()}"  # nothing listens there
    ref = f"{registry}/hubworks-test/busybox:1"
    podman.tag(busybox_base_image, ref)
    try:
        with pytest.raises(HubworksError) as caught:
            podman.push(ref)
    finally:
        podman.remove(ref)
    assert f"could not push {ref} to the registry {registry}" in caught.value.message
    assert "connection refused" in caught.value.message
    assert f"podman login {registry}" in caught.value.fix


def test_push_reaches_the_registry(podman, busybox_base_image, local_registry):
    ref = f"{local_registry}/hubworks-test/pushed:1"
    podman.tag(busybox_base_image, ref)
    podman.push(ref)
    assert registry_tags(local_registry, "hubworks-test/pushed") == ["1"]


def test_repo2docker_logs_in_builds_and_pushes(podman, busybox_base_image, local_registry,
                                               tmp_path):
    repo = repo_with(tmp_path, "Dockerfile", one_step(busybox_base_image, "echo built > /built"))
    ref = f"{local_registry}/hubworks-test/built:2"
    login = {"registry": local_registry, "username": "builder", "password": "secret"}
    env = dict(os.environ, CONTAINER_ENGINE_REGISTRY_CREDENTIALS=json.dumps(login))
    code, output = repo2docker(repo, "--no-run", "--push", "--image-name", ref, env=env)
    assert code == 0, output
    assert "Login Succeeded" in output
    assert registry_tags(local_registry, "hubworks-test/built") == ["2"]


def test_repo2docker_push_without_a_registry_fails_at_login(podman, busybox_base_image,
                                                           tmp_path):
    repo = repo_with(tmp_path, "Dockerfile", one_step(busybox_base_image, "true"))
    registry = f"127.0.0.1:{free_port()}"  # nothing listens there
    login = {"registry": registry, "username": "builder", "password": "secret"}
    env = dict(os.environ, CONTAINER_ENGINE_REGISTRY_CREDENTIALS=json.dumps(login))
    code, output = repo2docker(repo, "--no-run", "--push", "--image-name",
                               f"{registry}/hubworks-test/unpushed:1", env=env)
    assert code != 0
    assert f"podman login to {registry} as builder failed" in output
    assert "connection refused" in output


def test_environment_yml_repo_reaches_podman_with_its_generated_context(
        podman, busybox_base_image, tmp_path):
    repo = repo_with(tmp_path, "environment.yml", ENVIRONMENT_YML)
    # busybox lacks the apt-get the generated Dockerfile needs, so the build stops there
    code, output = repo2docker(repo, "--no-run", "--image-name", "hubworks-test/env:1",
                               f"--Repo2Docker.base_image={busybox_base_image}")
    assert "Using CondaBuildPack builder" in output
    assert f"FROM {busybox_base_image}" in output and "apt-get: not found" in output
    assert code != 0 and "podman build of hubworks-test/env:1 failed" in output


def test_no_build_renders_an_environment_yml_repo_without_any_engine(tmp_path):
    repo = repo_with(tmp_path, "environment.yml", ENVIRONMENT_YML)
    env = dict(os.environ, PATH=str(tmp_path))
    code, output = repo2docker(repo, "--no-build", env=env)
    assert code == 0, output
    assert "FROM " in output and "environment.yml" in output
