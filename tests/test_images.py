"""build_images with real repo2docker builds through podman, against the served channel.

Base images are made locally from busybox-static (no registry is needed); the test images
fetch internal packages from the channel while they build, so a build fails if the channel
is not reachable from inside it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import DODO, DoitRun, free_port, interrupted_output, port_refuses
from tests.podman_fixtures import (files_in_image_containing, image_file, image_metadata,
                                   registry_tags)

FETCH_DOCKERFILE = """\
FROM {base}
ARG CHANNEL_URL
# Installs the newest build of the internal package {package} {version} straight from the
# channel, as a conda client would pick it (busybox has no conda).
RUN wget -q -O /tmp/repodata.json "${{CHANNEL_URL}}noarch/repodata.json" \\
 && file=$(grep -o '"{package}-{version}-[^"]*_[0-9]*[.]tar[.]bz2"' /tmp/repodata.json \\
           | tr -d '"' | sort -t _ -k 2 -n | tail -n 1) \\
 && wget -q -O /tmp/pkg.tar.bz2 "${{CHANNEL_URL}}noarch/$file" \\
 && mkdir -p /opt/{package} && tar -xjf /tmp/pkg.tar.bz2 -C /opt/{package} \\
 && rm /tmp/pkg.tar.bz2 /tmp/repodata.json
"""


def configure(ws, *, channel: str = "", images: str = 'prefix = "hubworks-test"') -> None:
    """Settings of an image test: .tar.bz2 packages (busybox tar reads those), the channel on
    a fixed port, and chroot isolation as users set it where podman cannot start containers."""
    ws.configure(f"""
        [recipes]
        package_format = "tar.bz2"
        [channel]
        port = {ws.port}
        {channel}
        [images]
        isolation = "chroot"
        {images}
    """)


@pytest.fixture
def preflight_workspace(workspace):
    """An image workspace for what fails before any engine runs: no base image needed."""
    workspace.port = free_port()
    workspace.env.pop("BUILDAH_ISOLATION", None)  # only images.isolation may ask for chroot
    configure(workspace)
    return workspace


@pytest.fixture
def image_workspace(preflight_workspace, busybox_base_image):
    preflight_workspace.base = busybox_base_image
    return preflight_workspace


def add_fetching_image(ws, image: str, package: str, version: str = "1.0.0") -> None:
    folder = ws.root / "images" / image
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(
        FETCH_DOCKERFILE.format(base=ws.base, package=package, version=version))


def record(ws, image: str) -> dict:
    return json.loads((ws.state / "images" / f"{image}.json").read_text())


@pytest.mark.slow
def test_dockerfile_image_installs_internal_package_from_served_channel(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool", version="1.0.0")
    add_fetching_image(ws, "fetcher", "tool")
    dockerfile = ws.root / "images" / "fetcher" / "Dockerfile"
    original = dockerfile.read_text()
    run = ws.doit("build_images")
    assert "build_images:fetcher" in run.executed
    assert re.search(r"image fetcher: built hubworks-test/fetcher:\w+ \(\d+\.\d s\)", run.output)

    built = record(ws, "fetcher")
    assert built["internal_packages"][0]["name"] == "tool"
    content = image_file(built["tag"], "/opt/tool/share/tool/version.txt")
    assert content.decode().strip() == "tool 1.0.0"
    assert image_file(built["latest"], "/opt/tool/share/tool/version.txt") == content
    # The channel was served for the build, over the configured port, and is gone now.
    access_log = ws.state / "logs" / "channel-server.log"
    access = access_log.read_text()
    assert re.search(r"GET /noarch/tool-1\.0\.0-h4616a5c_0\.tar\.bz2\S* 200", access)
    assert port_refuses(ws.port)
    # images/ is untouched: the build used a staged copy.
    assert [p.name for p in dockerfile.parent.iterdir()] == ["Dockerfile"]
    assert dockerfile.read_text() == original

    # Nothing changed: nothing builds, and the server is not even started.
    again = ws.doit("build_images")
    assert again.executed == []
    assert "build_images:fetcher" in again.up_to_date
    assert access_log.read_text() == access   # no "serving" line, no request


@pytest.mark.slow
def test_changing_a_recipe_rebuilds_only_the_images_that_use_it(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool")
    ws.add_recipe("data")
    add_fetching_image(ws, "uses-tool", "tool")
    add_fetching_image(ws, "uses-data", "data")
    ws.doit("build_images")
    old_tag = record(ws, "uses-tool")["tag"]

    ws.add_recipe("tool", script=["echo patched > $PREFIX/share/tool/patch.txt"])
    run = ws.doit("build_images")
    assert [t for t in run.executed if t.startswith("build_images")] == ["build_images:uses-tool"]
    new_tag = record(ws, "uses-tool")["tag"]
    assert new_tag != old_tag   # a new content hash: repo2docker cannot reuse the old image
    assert image_file(new_tag, "/opt/tool/share/tool/patch.txt").strip() == b"patched"

    # The engine lost the image: it is built again although nothing else changed.
    subprocess.run(["podman", "rmi", "-f", new_tag, record(ws, "uses-tool")["latest"]],
                   check=True, capture_output=True)
    assert ws.doit("build_images").executed == ["build_images:uses-tool"]


@pytest.mark.slow
def test_parallel_builds_share_one_server_and_it_stops_after_a_failure(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool")
    add_fetching_image(ws, "first", "tool")
    add_fetching_image(ws, "second", "tool")
    broken = ws.root / "images" / "broken"
    broken.mkdir()
    (broken / "Dockerfile").write_text(
        f"FROM {ws.base}\nRUN echo 'configuring the frobnicator' && exit 3\n")

    run = ws.doit("-n", "2", "--continue", "build_images", check=False)
    assert run.returncode != 0
    assert "image 'broken' failed to build" in run.output
    assert "configuring the frobnicator" in run.output        # the tail of its log
    assert str(ws.state / "logs" / "images" / "broken.log") in run.output
    # The summary counts the failed image once, not again as its group task.
    assert "hubworks: 4 ran, 1 failed (build_images:broken)" in run.output, run.output
    assert record(ws, "first") and record(ws, "second")
    log = (ws.state / "logs" / "channel-server.log").read_text()
    starts = len(re.findall(r"^\S+ serving ", log, re.MULTILINE))
    assert starts == 1, "one server for the whole run"
    assert port_refuses(ws.port)


@pytest.mark.slow
def test_an_image_needing_a_failed_recipe_is_named_and_the_others_build(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool")
    ws.add_recipe("broken", script=["exit 7"])
    add_fetching_image(ws, "uses-tool", "tool")
    add_fetching_image(ws, "uses-broken", "broken")
    run = ws.doit("--continue", "build_images", check=False)
    assert run.returncode != 0
    assert "FAILED build_recipes:broken" in run.output
    assert "image 'uses-broken' not built: it needs recipe 'broken', which failed" in run.output
    assert "UnmetDependency" not in run.output
    assert "build_images:uses-broken" not in run.executed   # never built against a stale one
    assert record(ws, "uses-tool")["internal_packages"][0]["name"] == "tool"
    assert not (ws.state / "images" / "uses-broken.json").exists()
    assert "hubworks: 3 ran, 1 failed (build_recipes:broken), 1 not built " \
        "(build_images:uses-broken)" in run.output
    assert port_refuses(ws.port)


@pytest.mark.slow
def test_an_image_waits_for_a_recipe_that_can_no_longer_be_read(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool")
    add_fetching_image(ws, "uses-tool", "tool")
    ws.doit("build_recipes")
    # Its package is still in the channel, but the recipe as it is now cannot be built.
    (ws.root / "recipes" / "tool" / "recipe.yaml").write_text("package: [\n")
    run = ws.doit("--continue", "build_images", check=False)
    assert "recipe 'tool' cannot be read" in run.output
    assert "image 'uses-tool' not built: it needs recipe 'tool', which failed" in run.output
    assert "build_images:uses-tool" not in run.executed


@pytest.mark.slow
def test_ctrl_c_during_a_build_stops_the_server(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool")
    folder = ws.root / "images" / "slow"
    folder.mkdir()
    (folder / "Dockerfile").write_text(
        f"FROM {ws.base}\nARG CHANNEL_URL\nRUN wget -q -O /tmp/r.json ${{CHANNEL_URL}}noarch/"
        f"repodata.json && echo building-slowly && sleep 120\n")
    command = [sys.executable, "-m", "doit", "-f", str(DODO), "-d", str(ws.root),
               "build_images"]
    # Like Ctrl-C in a terminal: SIGINT to the whole process group.
    doit = subprocess.Popen(command, env=ws.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = ws.state / "logs" / "images" / "slow.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "building-slowly" in log.read_text()):
        assert time.monotonic() < deadline and doit.poll() is None, doit.stdout.read()
        time.sleep(0.2)
    assert not port_refuses(ws.port)           # serving while the build runs
    os.killpg(doit.pid, signal.SIGINT)
    output = interrupted_output(doit)
    assert "interrupted: build_images:slow (nothing is tagged or recorded; the next run " \
        "builds it again)" in output
    assert "stopped: channel server" in output
    assert port_refuses(ws.port)
    access = (ws.state / "logs" / "channel-server.log").read_text()
    assert re.search(r"stopped serving http://127\.0\.0\.1:\d+/ after \d+ requests", access)
    assert not (ws.state / "images" / "slow.json").exists()   # not recorded as built


FIXED_TOKEN = "fixed-TOKEN-for-serve-channel-only"
ENVIRONMENT_DOCKERFILE = """\
FROM {base}
ARG CHANNEL_URL
# The staged environment.yml goes into the image, as repo2docker's conda buildpack copies it.
COPY environment.yml /opt/env/environment.yml
RUN wget -q -O /tmp/pkg.tar.bz2 "${{CHANNEL_URL}}noarch/tool-1.0.0-h4616a5c_0.tar.bz2" \\
 && mkdir -p /opt/tool && tar -xjf /tmp/pkg.tar.bz2 -C /opt/tool && rm /tmp/pkg.tar.bz2
"""


def add_image_with_environment(ws, image: str) -> None:
    """An image whose environment.yml names the internal channel and lands in the image."""
    folder = ws.root / "images" / image
    folder.mkdir(parents=True)
    (folder / "Dockerfile").write_text(ENVIRONMENT_DOCKERFILE.format(base=ws.base))
    (folder / "environment.yml").write_text("channels:\n  - internal\ndependencies:\n  - tool\n")


def build_environment_image(ws, image: str, *, channel: str) -> tuple[DoitRun, str]:
    """Build an image of ``add_image_with_environment`` with the [channel] settings
    ``channel``: the run and the built tag, checked to hold the internal package."""
    configure(ws, channel=channel)
    ws.add_recipe("tool")
    add_image_with_environment(ws, image)
    run = ws.doit("build_images")
    tag = record(ws, image)["tag"]
    assert image_file(tag, "/opt/tool/share/tool/version.txt").strip() == b"tool 1.0.0"
    return run, tag


def places_holding(ws, run, tag: str, text: str) -> list[str]:
    """Everywhere ``text`` is to be found after a build: the console output, every file of
    the state folder (logs, staged copies, caches, records, doit's database), the channel
    and images folders, the image's files and its metadata (history, labels, config)."""
    found = ["console output"] if text in run.output else []
    for folder in (ws.state, ws.channel, ws.root / "images"):
        found += [str(path.relative_to(ws.root)) for path in sorted(folder.rglob("*"))
                  if path.is_file() and text.encode() in path.read_bytes()]
    found += [f"image:{path}" for path in files_in_image_containing(tag, text)]
    if text in image_metadata(tag):
        found.append("image metadata")
    return found


@pytest.mark.slow
def test_a_local_build_carries_no_token_even_with_a_fixed_one_set(image_workspace):
    """Bound to every address with a fixed token for serve_channel: the build reaches the
    server on loopback, which lets this machine in without a token, so none is needed."""
    ws = image_workspace
    run, tag = build_environment_image(ws, "local",
                                       channel=f'host = "0.0.0.0"\ntoken = "{FIXED_TOKEN}"')
    url = f"http://127.0.0.1:{ws.port}/"
    assert f"  - {url}\n" in image_file(tag, "/opt/env/environment.yml").decode()
    assert f"CHANNEL_URL={url} " in (ws.state / "logs" / "images" / "local.log").read_text()

    assert places_holding(ws, run, tag, FIXED_TOKEN) == []
    assert places_holding(ws, run, tag, f"{url}t/") == []  # no token of any kind
    access = (ws.state / "logs" / "channel-server.log").read_text()
    assert re.search(r"127\.0\.0\.1 GET /noarch/tool-1\.0\.0-h4616a5c_0\.tar\.bz2 200", access)
    assert re.search(r"serving \S+ at http://\S+/t/<token>/$", access, re.MULTILINE)
    assert port_refuses(ws.port)


@pytest.mark.slow
def test_a_remote_build_gets_a_per_run_token_that_dies_with_the_run(image_workspace):
    """A remote engine (channel.public_url; here a loopback name for the same server): the
    build needs a token, and gets the run's own, never the fixed one; it is in what the
    build must carry (the staged environment.yml, the build argument) and nowhere else."""
    ws = image_workspace
    public = f"http://127.0.0.1:{ws.port}/"
    run, tag = build_environment_image(
        ws, "remote", channel=f'host = "0.0.0.0"\ntoken = "{FIXED_TOKEN}"\npublic_url = "{public}"')
    staged = image_file(tag, "/opt/env/environment.yml").decode()
    per_run = re.search(rf"  - {re.escape(public)}t/([^/\s]+)/\n", staged)[1]
    assert per_run != FIXED_TOKEN and len(per_run) >= 16

    assert places_holding(ws, run, tag, FIXED_TOKEN) == []
    assert places_holding(ws, run, tag, per_run) == [
        ".hubworks/images/remote/stage/environment.yml", "image:/opt/env/environment.yml",
        "image metadata"]   # the history of the RUN step that used CHANNEL_URL
    access = (ws.state / "logs" / "channel-server.log").read_text()
    assert re.search(r"GET /t/<token>/noarch/tool-\S+ 200", access)   # token used, not logged
    assert not re.search(r"GET /noarch/tool-\S+ 200", access)         # never without it
    assert port_refuses(ws.port)   # the server, and with it the token, is gone


@pytest.mark.slow
def test_the_isolation_setting_reaches_podman(image_workspace):
    """images.isolation = "chroot" (set as users set it; nothing else asks for chroot) is
    what podman builds with: chroot isolation gives a RUN step no PID namespace of its own,
    so its shell is not PID 1 as in an OCI container (where this host cannot build at all)."""
    ws = image_workspace
    folder = ws.root / "images" / "isolated"
    folder.mkdir()
    (folder / "Dockerfile").write_text(f"FROM {ws.base}\nRUN echo $$ > /run-step-pid\n")
    ws.doit("build_images")
    assert int(image_file(record(ws, "isolated")["tag"], "/run-step-pid")) != 1


@pytest.mark.slow
def test_push_sends_both_tags_to_the_registry(image_workspace, local_registry):
    ws = image_workspace
    ws.env["CONTAINERS_REGISTRIES_CONF"] = os.environ["CONTAINERS_REGISTRIES_CONF"]
    configure(ws, images=f'prefix = "{local_registry}/analytics"\npush = true')
    ws.add_recipe("tool")
    add_fetching_image(ws, "pushed", "tool")
    ws.doit("build_images")
    tag = record(ws, "pushed")["tag"]
    assert sorted(registry_tags(local_registry, "analytics/pushed")) == \
        sorted([tag.rsplit(":", 1)[1], "latest"])


def test_preflight_names_the_missing_package_or_version(preflight_workspace):
    ws = preflight_workspace
    ws.add_recipe("tool", version="1.0.0")
    for name, spec in (("wants-version", "tool >=9"), ("wants-missing", "internal::toool")):
        folder = ws.root / "images" / name
        folder.mkdir()
        (folder / "environment.yml").write_text(
            f"channels: [internal, conda-forge]\ndependencies:\n  - {spec}\n")
    started = time.monotonic()
    run = ws.doit("--continue", "build_images", check=False)
    assert time.monotonic() - started < 60
    assert "no version of tool in the internal channel matches 'tool >=9' (it has 1.0.0)" \
        in run.output
    assert "the internal channel has no package 'toool' (it has: tool)" in run.output
    # Failed before repo2docker ran: no build log was started.
    assert not (ws.state / "logs" / "images" / "wants-version.log").exists()


@pytest.mark.slow
def test_base_image_without_a_registry_gets_the_full_name_to_use(image_workspace, tmp_path):
    ws = image_workspace
    registries = tmp_path / "registries.conf"
    registries.write_text("unqualified-search-registries = []\n")
    ws.env["CONTAINERS_REGISTRIES_CONF"] = str(registries)
    folder = ws.root / "images" / "short"
    folder.mkdir()
    (folder / "Dockerfile").write_text("FROM someone/base-image:1\nRUN true\n")
    run = ws.doit("build_images", check=False)
    assert run.returncode != 0
    assert "podman cannot tell which registry the base image 'someone/base-image:1'" \
        in run.output
    assert "fix: name the base image with its registry in the FROM line, e.g. " \
        "docker.io/someone/base-image:1" in run.output


def test_folder_with_nothing_to_build_is_named(preflight_workspace):
    ws = preflight_workspace
    (ws.root / "images" / "empty" / "notes").mkdir(parents=True)
    (ws.root / "images" / "empty" / "README.md").write_text("todo\n")
    run = ws.doit("build_images", check=False)
    assert run.returncode != 0
    assert "image 'empty': images/empty/ has nothing repo2docker can build from" in run.output
    assert "add an environment.yml" in run.output


@pytest.mark.slow
def test_environment_image_is_staged_with_the_served_url(image_workspace):
    ws = image_workspace
    ws.add_recipe("tool")
    folder = ws.root / "images" / "analysis"
    folder.mkdir()
    original = textwrap.dedent("""\
        # comments survive staging
        channels:
          - internal
          - conda-forge
        dependencies:
          - python=3.12
          - tool>=1
          - internal::tool
    """)
    (folder / "environment.yml").write_text(original)
    run = ws.doit("build_images", check=False)   # needs conda-forge: fails on offline hosts
    assert (folder / "environment.yml").read_text() == original
    staged = (ws.state / "images" / "analysis" / "stage" / "environment.yml").read_text()
    url = f"http://127.0.0.1:{ws.port}/"
    assert f"  - {url}\n" in staged and f"{url.rstrip('/')}::tool" in staged
    assert "# comments survive staging" in staged and "- internal" not in staged
    assert "#   tool 1.0.0 h4616a5c_0 sha256:" in staged  # exact packages: cache keys on them
    # repo2docker accepts the staged folder: --no-build renders its Dockerfile, no engine.
    rendered = subprocess.run(
        [sys.executable, "-m", "repo2docker", "--no-build", "--user-id", "1000",
         "--user-name", "jovyan", str(ws.state / "images" / "analysis" / "stage")],
        capture_output=True, text=True, check=True).stdout
    assert "environment.yml" in rendered and "FROM " in rendered
    if run.returncode != 0:
        # The failure says which host the build could not reach.
        assert "the build could not reach:" in run.output, run.output


@pytest.mark.slow
def test_built_image_serves_its_internal_package_from_a_container(
        workspace, podman_runtime, runtime_busybox_image, podman_api):
    """A built image runs: started through podman's Docker-compatible API (what the hub's
    DockerSpawner uses), it serves the file its build fetched from the served channel."""
    import requests

    from tasks.hub.containers import docker_client

    ws = workspace
    ws.env.update(podman_runtime.env)
    ws.configure('[recipes]\npackage_format = "tar.bz2"\n[channel]\nport = 0\n'
                 '[images]\nengine = "podman"\nprefix = "hubworks-test"\n')
    ws.add_recipe("site", script=["echo hello-from-internal > $PREFIX/share/site/index.html"])
    folder = ws.root / "images" / "web"
    folder.mkdir()
    (folder / "Dockerfile").write_text(textwrap.dedent(f"""\
        FROM {runtime_busybox_image}
        ARG CHANNEL_URL
        RUN wget -q -O /tmp/site.tar.bz2 "${{CHANNEL_URL}}noarch/site-1.0.0-h4616a5c_0.tar.bz2" \\
         && mkdir -p /srv && tar -xjf /tmp/site.tar.bz2 -C /srv
        CMD ["httpd", "-f", "-p", "8080", "-h", "/srv/share/site"]
    """))
    ws.doit("build_images")

    client = docker_client(podman_api)
    container = client.containers.run(record(ws, "web")["tag"], detach=True,
                                      ports={"8080/tcp": ("127.0.0.1", None)})
    try:
        container.reload()
        port = container.ports["8080/tcp"][0]["HostPort"]
        url = f"http://127.0.0.1:{port}/index.html"
        deadline = time.monotonic() + 60
        while True:
            try:
                page = requests.get(url, timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"{url} never answered"
                time.sleep(0.2)
        assert page.text.strip() == "hello-from-internal"
    finally:
        container.remove(force=True)
