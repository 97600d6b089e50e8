"""hub_values: the zero-to-jupyterhub values file, loaded by a real KubeSpawner.

Build two images (podman, offline base image), write the values, hand their
``singleuser.profileList`` to KubeSpawner as its ``profile_list`` (no cluster needed: a
throwaway kubeconfig), render the options form a user sees, and pick a profile.
"""

from __future__ import annotations

import asyncio
import re
import textwrap

import pytest
from ruamel.yaml import YAML

from tests.test_images import add_fetching_image, record

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: nobody, user: {token: unused}}]
contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody}}]
current-context: nowhere
"""


class HubUser:
    """What KubeSpawner reads of a JupyterHub user."""

    name = escaped_name = "alice"
    id = 1
    url = "/user/alice/"


def spawner_form_and_choice(profiles: list[dict], slug: str, tmp_path, monkeypatch):
    """KubeSpawner's rendered options form, and the image it would start for ``slug``."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    # kubernetes_asyncio reads KUBECONFIG when it is first imported
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    from jupyterhub.objects import Hub
    from kubespawner import KubeSpawner
    from traitlets.config import Config

    async def render():
        config = Config()
        config.KubeSpawner.profile_list = profiles
        spawner = KubeSpawner(config=config, user=HubUser(), hub=Hub(), _mock=False)
        form = spawner._render_options_form(profiles)
        spawner.user_options = {"profile": slug}
        await spawner.load_user_options()
        return form, spawner.image

    return asyncio.run(render())


@pytest.mark.slow
def test_values_file_offers_every_image_to_kubespawner(workspace, busybox_base_image,
                                                       tmp_path, monkeypatch):
    ws = workspace
    ws.configure(textwrap.dedent("""
        [recipes]
        package_format = "tar.bz2"
        [channel]
        port = 0
        [images]
        isolation = "chroot"  # podman cannot start RUN containers on every host
        prefix = "office"
        [hub]
        default_image = "reports"
    """))
    ws.base = busybox_base_image
    ws.add_recipe("tool", version="1.4.0")
    add_fetching_image(ws, "analysis", "tool", version="1.4.0")
    reports = ws.root / "images" / "reports"
    reports.mkdir()
    (reports / "Dockerfile").write_text(f"FROM {busybox_base_image}\nRUN echo reports > /r\n")

    missing = ws.doit("hub_values", check=False)   # nothing built yet
    assert missing.returncode != 0
    assert "the local engine lacks the current tag of: analysis (office/analysis:" in \
        missing.output
    assert "fix: build and push them first (doit build_images" in missing.output

    ws.doit("build_images")
    run = ws.doit("hub_values")
    values_file = ws.root / "hub-values.yaml"
    assert f"wrote {values_file}: 2 images, default reports" in run.output
    assert "helm upgrade --install" in values_file.read_text()
    values = YAML(typ="safe").load(values_file)
    tags = {name: record(ws, name)["tag"] for name in ("analysis", "reports")}
    single = values["singleuser"]
    repository, _, content_hash = tags["reports"].rpartition(":")
    assert single["image"] == {"name": repository, "tag": content_hash}
    assert single["uid"] == 1000

    form, image = spawner_form_and_choice(single["profileList"], "analysis", tmp_path,
                                          monkeypatch)
    for name, tag in tags.items():
        assert f"<h3>{name}</h3>" in form
        assert tag in form
    assert "internal packages: tool 1.4.0" in form
    assert re.search(r'value="reports"\s+checked', form)   # hub.default_image
    assert image == tags["analysis"]

    # Written again with nothing changed: the file is left alone.
    assert f"{values_file} is up to date" in ws.doit("hub_values").output

    ws.env["HUBWORKS_HUB_DEFAULT_IMAGE"] = "nope"
    wrong = ws.doit("hub_values", check=False)
    assert "hub.default_image is 'nope', which is not an image in" in wrong.output
    assert "fix: use one of: analysis, reports" in wrong.output
