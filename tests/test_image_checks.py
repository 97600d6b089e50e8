"""What is checked of an image before any engine runs: folder names, channel names, the hash.

Fast: no container engine, no image build. The builds themselves are in test_images.py.
"""

from __future__ import annotations

import textwrap

import pytest
import yaml  # PyYAML reads YAML 1.1, as Helm does

from tasks.core.settings import load_settings
from tasks.hub.values import render_values
from tasks.images.discovery import read_image
from tasks.images.hashing import image_hash
from tasks.images.solve import Resolution
from tasks.images.specs import one_edit_apart


@pytest.mark.parametrize("folder", ["My Image", "Reports", "-reports", "reports-", "a..b"])
def test_a_folder_name_that_cannot_be_a_tag_is_named_before_any_server(workspace, folder):
    image = workspace.root / "images" / folder
    image.mkdir()
    (image / "Dockerfile").write_text("FROM scratch\n")
    run = workspace.doit("build_images", check=False)
    assert run.returncode != 0
    assert f"image folder images/{folder}/ cannot name an image" in run.output
    assert "lowercase letters and digits" in run.output and "rename the folder" in run.output
    assert not list(workspace.state.rglob("channel-server.log")), "a server was started"


def test_valid_folder_names_are_accepted(tmp_path):
    for name in ("reports", "team.reports", "team_reports", "team__reports", "team--reports",
                 "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "Dockerfile").write_text("FROM scratch\n")
        assert read_image(tmp_path / name).problem is None, name


@pytest.mark.parametrize("alias, channel, typo", [
    ("internal", "internl", True), ("internal", "interanl", True),
    ("internal", "internals", True), ("internal", "Internal", True),
    ("internal", "internal", False), ("internal", "conda-forge", False),
    ("internal", "intern", False), ("internal", "nodefaults", False),
])
def test_one_edit_apart(alias, channel, typo):
    assert one_edit_apart(alias, channel) is typo


@pytest.mark.parametrize("environment", [
    """channels: [internl, conda-forge]\ndependencies: [tool]\n""",
    """channels: [conda-forge]\ndependencies: ["internl::tool >=1"]\n""",
])
def test_a_channel_one_letter_from_the_alias_is_named_as_a_typo(workspace, environment):
    workspace.add_recipe("tool")
    image = workspace.root / "images" / "analysis"
    image.mkdir()
    (image / "environment.yml").write_text(environment)
    run = workspace.doit("build_images", check=False)
    assert run.returncode != 0
    assert ("image 'analysis': images/analysis/environment.yml names the channel 'internl', "
            "one letter away from the internal channel's alias 'internal': likely a typo"
            ) in run.output
    assert "write 'internal' (images.channel_alias)" in run.output


def test_the_image_hash_follows_the_internal_packages_sha256(tmp_path):
    folder = tmp_path / "images" / "reports"
    folder.mkdir(parents=True)
    (folder / "Dockerfile").write_text("FROM scratch\n")
    settings, image = load_settings(tmp_path, environ={}), read_image(folder)

    def packages(sha256: str) -> Resolution:
        return Resolution(["tool"], [{"name": "tool", "version": "1.0", "build": "0",
                                      "sha256": sha256}])

    first = image_hash(settings, image, packages("a" * 64))
    assert image_hash(settings, image, packages("a" * 64)) == first
    # same name, version and build, other contents: a rebuilt package rebuilds the image
    assert image_hash(settings, image, packages("b" * 64)) != first


def test_hub_values_quote_what_a_yaml_1_1_reader_would_misread():
    words = ["on", "no", "yes", "off", "y", "n", "~", "010", "1:20", "2024-01-01", "1_000",
             ".inf", "0x1f", "reports"]
    values = {"singleuser": {"image": {"name": "hubworks/no", "tag": "010"},
                             "profileList": [{"display_name": word, "slug": word,
                                              "description": word} for word in words]}}
    text = render_values(values)
    assert yaml.safe_load(text) == values
    assert "slug: reports\n" in text  # plain words stay plain
    assert textwrap.dedent('  tag: "010"') in text
