"""Images built on CI runners against a published channel, the registry deciding what is done.

The story: one job builds the recipes and publishes the channel to S3 (moto's server on
loopback); two runners, each with its own empty podman storage and no recipes/ or channel/,
build one image each against the published channel (no local server) and push it to the
registry (Debian's docker-registry on loopback); a third runner with empty storage finds both
up to date, `image_matrix` prints `[]`, and `hub_values` offers both pushed images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
from ruamel.yaml import YAML

from tests.conftest import DODO, Workspace
from tests.podman_fixtures import (_READ_FROM_MOUNT, BUSYBOX_IMAGE, PATH_IN_IMAGE,
                                   busybox_rootfs, free_port, registry_server, registry_tags)
from tests.test_images import FETCH_DOCKERFILE

pytest_plugins = ["tests.s3_fixtures"]  # the moto_endpoint and s3_store fixtures


def podman_storage_env(root) -> dict[str, str]:
    """A runner's own, empty vfs image store (what a fresh CI machine has)."""
    root.mkdir(parents=True)
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{root / "run"}"\n'
                    f'graphroot = "{root / "graph"}"\n')
    return {"CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot"}


def podman_images(env: dict) -> list[str]:
    out = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def image_file(env: dict, ref: str, path: str) -> bytes:
    """A file of an image in a runner's own storage, read from a mount of it."""
    namespace = [] if os.geteuid() == 0 else ["podman", "unshare"]
    return subprocess.run([*namespace, "sh", "-c", _READ_FROM_MOUNT, "sh", ref, path], check=True,
                          capture_output=True, env={**os.environ, **env}).stdout


def import_base_image(env: dict) -> None:
    subprocess.run(["podman", "import", "--change", f"ENV PATH={PATH_IN_IMAGE}",
                    "--change", 'CMD ["/bin/sh"]', "-", BUSYBOX_IMAGE],
                   input=busybox_rootfs(), capture_output=True, check=True,
                   env={**os.environ, **env})


def add_images(ws: Workspace) -> None:
    """The same images/ on every runner (a checkout of the repository)."""
    for image, package in (("uses-tool", "tool"), ("uses-data", "data")):
        folder = ws.root / "images" / image
        folder.mkdir(parents=True)
        (folder / "Dockerfile").write_text(FETCH_DOCKERFILE.format(
            base=BUSYBOX_IMAGE, package=package, version="1.0.0"))


def image_runner(tmp_path, name: str, channel_url: str, registry: str, *,
                 with_base_image: bool = True) -> Workspace:
    ws = Workspace(tmp_path / name)
    shutil.rmtree(ws.root / "recipes")  # an image runner has neither
    shutil.rmtree(ws.root / "channel")
    add_images(ws)
    ws.configure(f"""
        [images]
        isolation = "chroot"  # podman cannot start RUN containers on every host
        prefix = "{registry}/office"
        push = true
    """)
    ws.env["HUBWORKS_CHANNEL_URL"] = channel_url
    ws.storage = podman_storage_env(tmp_path / f"{name}-podman")
    ws.env.update(ws.storage)
    if with_base_image:
        import_base_image(ws.storage)  # a CI runner pulls it; here it is made offline
    return ws


def doit_at_once(*workspaces_and_args) -> list[str]:
    runs = [subprocess.Popen([sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root),
                              *args], env=ws.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for ws, args in workspaces_and_args]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * len(runs), "\n".join(outputs)
    return outputs


@pytest.mark.slow
def test_runners_build_against_the_published_channel_and_the_registry_decides(
        tmp_path, s3_store, local_registry, podman_storage):
    # The publishing job: recipes built, channel published to the bucket.
    publisher = Workspace(tmp_path / "publisher")
    publisher.configure('[recipes]\npackage_format = "tar.bz2"\n')
    publisher.add_recipe("tool")
    publisher.add_recipe("data")
    bucket = s3_store.make_bucket("office-channel")
    s3_store.configure(publisher, f"s3://{bucket}/conda")
    publisher.doit("publish_channel")
    channel_url = f"{s3_store.endpoint}/{bucket}/conda/"

    first = image_runner(tmp_path, "runner-1", channel_url, local_registry)
    second = image_runner(tmp_path, "runner-2", channel_url, local_registry)
    matrix = first.doit("image_matrix", "--output", "matrix.json")
    assert '["uses-data", "uses-tool"]' in matrix.output.splitlines()
    assert json.loads((first.root / "matrix.json").read_text()) == ["uses-data", "uses-tool"]

    # One image per runner, side by side, each with its own storage.
    outputs = doit_at_once((first, ["build_images:uses-tool"]),
                           (second, ["build_images:uses-data"]))
    for ws, image, output in ((first, "uses-tool", outputs[0]),
                              (second, "uses-data", outputs[1])):
        assert re.search(rf"image {image}: built {re.escape(local_registry)}/office/{image}:\w+",
                         output), output
        # No local server, no recipe builds, no local index: the published channel served.
        assert not (ws.state / "logs" / "channel-server.log").exists()
        assert "serving" not in output and "index_channel" not in output
        assert "build_recipes" not in output
        assert not (ws.root / "channel").exists() and not (ws.root / "recipes").exists()
    # Each build fetched its internal package from the bucket.
    assert image_file(first.storage, f"{local_registry}/office/uses-tool:latest",
                      "/opt/tool/share/tool/version.txt") == b"tool 1.0.0\n"
    assert image_file(second.storage, f"{local_registry}/office/uses-data:latest",
                      "/opt/data/share/data/version.txt") == b"data 1.0.0\n"
    assert not any("uses-data" in ref for ref in podman_images(first.storage))
    assert not any("uses-tool" in ref for ref in podman_images(second.storage))
    tags = {image: [t for t in registry_tags(local_registry, f"office/{image}") if t != "latest"]
            for image in ("uses-tool", "uses-data")}
    assert all(len(found) == 1 for found in tags.values()), tags

    # A fresh runner: empty storage (not even the base image), only the registry to ask.
    third = image_runner(tmp_path, "runner-3", channel_url, local_registry,
                         with_base_image=False)
    run = third.doit("build_images")
    assert run.executed == [], run.output
    assert {"build_images:uses-tool", "build_images:uses-data"} <= set(run.up_to_date)
    matrix = third.doit("image_matrix", "--output", "matrix.json")
    assert "[]" in matrix.output.splitlines()
    assert json.loads((third.root / "matrix.json").read_text()) == []
    assert podman_images(third.storage) == []   # nothing was pulled

    # The last job: the hub's values offer both pushed images, by content-hash tag.
    third.doit("hub_values")
    profiles = YAML(typ="safe").load(third.root / "hub-values.yaml")["singleuser"]["profileList"]
    assert [(p["display_name"], p["kubespawner_override"]["image"]) for p in profiles] == [
        (image, f"{local_registry}/office/{image}:{tags[image][0]}")
        for image in ("uses-data", "uses-tool")]
    assert [p.get("default", False) for p in profiles] == [True, False]
    assert "internal packages: data 1.0.0" in profiles[0]["description"]
    assert "internal packages: tool 1.0.0" in profiles[1]["description"]


@pytest.fixture
def read_only_registry(podman_storage, tmp_path, monkeypatch):
    """A registry in maintenance mode: it answers, and refuses every push."""
    with registry_server(tmp_path / "ro-registry", monkeypatch,
                         storage_extra="  maintenance:\n    readonly:\n      enabled: true\n"
                         ) as host:
        yield host


@pytest.mark.slow
def test_a_registry_that_refuses_the_push_is_named_with_the_fix(
        tmp_path, read_only_registry, busybox_base_image):
    ws = Workspace(tmp_path / "ws")
    ws.configure(f"""
        [channel]
        port = 0
        [images]
        isolation = "chroot"  # podman cannot start RUN containers on every host
        prefix = "{read_only_registry}/office"
        push = true
    """)
    folder = ws.root / "images" / "plain"
    folder.mkdir()
    (folder / "Dockerfile").write_text(f"FROM {busybox_base_image}\nRUN echo built > /built\n")
    run = ws.doit("build_images", check=False)
    assert run.returncode != 0
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert f"podman could not push {read_only_registry}/office/plain:" in run.output
    assert f"to the registry {read_only_registry}" in run.output
    assert f"fix: check that {read_only_registry} is reachable, log in with `podman login " \
           f"{read_only_registry}`" in run.output
    # Not recorded as done: the next run tries again.
    assert not (ws.state / "images" / "plain.json").exists()


@pytest.fixture
def registry_with_login(podman_storage, tmp_path, monkeypatch):
    """A registry that lets in only user ci (password s3cret), with HTTP basic auth."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # the standard library's bcrypt, the hash the registry's htpasswd reads (to 3.12)
        crypt = pytest.importorskip("crypt")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ci:" + crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH)) + "\n")
    with registry_server(tmp_path / "login-registry", monkeypatch,
                         extra=f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n"
                         ) as host:
        yield host


@pytest.mark.slow
def test_the_registry_check_logs_in_like_the_engine(tmp_path, registry_with_login,
                                                    busybox_base_image):
    host = registry_with_login
    auth_file = tmp_path / "auth.json"
    subprocess.run(["podman", "login", "--authfile", str(auth_file), "-u", "ci",
                    "--password-stdin", host], input="s3cret", text=True, check=True,
                   capture_output=True)

    def workspace(name: str, auth: str) -> Workspace:
        ws = Workspace(tmp_path / name)
        ws.configure(f'[channel]\nport = 0\n[images]\nisolation = "chroot"\n'
                     f'prefix = "{host}/office"\npush = true\n')
        folder = ws.root / "images" / "plain"
        folder.mkdir()
        (folder / "Dockerfile").write_text(f"FROM {busybox_base_image}\nRUN echo ok > /ok\n")
        ws.env["REGISTRY_AUTH_FILE"] = auth
        return ws

    builder = workspace("builder", str(auth_file))
    builder.doit("build_images")

    fresh = workspace("fresh", str(auth_file))
    fresh.env.update(podman_storage_env(tmp_path / "fresh-podman"))
    assert "build_images:plain" in fresh.doit("build_images").up_to_date
    assert "[]" in fresh.doit("image_matrix").output.splitlines()

    # Without the login the registry refuses to answer, and the matrix says so.
    stranger = workspace("stranger", str(tmp_path / "no-auth.json"))
    run = stranger.doit("image_matrix", check=False)
    assert run.returncode != 0
    assert f"the registry {host} refused to say whether it has {host}/office/plain:" in run.output
    assert f"fix: log in to {host} on this machine (`podman login {host}`" in run.output


@pytest.mark.slow
def test_an_unreachable_channel_url_is_named_with_the_fix(workspace, busybox_base_image):
    ws = workspace
    url = f"http://127.0.0.1:{free_port()}/conda/"
    ws.env["HUBWORKS_CHANNEL_URL"] = url
    folder = ws.root / "images" / "plain"
    folder.mkdir()
    (folder / "Dockerfile").write_text(f"FROM {busybox_base_image}\nRUN true\n")
    run = ws.doit("build_images", check=False)
    assert run.returncode != 0
    assert f"the published channel {url} cannot be reached" in run.output
    assert "fix: check channel.url (HUBWORKS_CHANNEL_URL)" in run.output
    assert run.output.count("fix:") == 1 and "Traceback" not in run.output, run.output
    assert not (ws.state / "logs" / "channel-server.log").exists()
