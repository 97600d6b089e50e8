"""Settings: defaults, hubworks.toml, HUBWORKS_* variables, clear errors, the docs table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.errors import HubworksError
from tasks.core.settings import SETTINGS, load_settings, settings_table
from tests.conftest import DODO

SETTINGS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_defaults_then_file_then_environment(tmp_path):
    defaults = load_settings(tmp_path, environ={})
    assert defaults.channel.port == 8000 and defaults.channel.host == "127.0.0.1"
    assert defaults.channel_dir == tmp_path / "channel"

    (tmp_path / "hubworks.toml").write_text(
        '[channel]\nport = 8010\n[recipes]\nchannels = ["conda-forge", "bioconda"]\n'
        '[workspace]\nstate_dir = "/var/tmp/hw-state"\n')
    from_file = load_settings(tmp_path, environ={})
    assert from_file.channel.port == 8010
    assert from_file.recipes.channels == ["conda-forge", "bioconda"]
    assert from_file.state_dir == Path("/var/tmp/hw-state")
    assert from_file.sources[("channel", "port")] == str(tmp_path / "hubworks.toml")

    env = {"HUBWORKS_CHANNEL_PORT": "0", "HUBWORKS_IMAGES_PUSH": "yes",
           "HUBWORKS_RECIPES_CHANNELS": "a, b", "HUBWORKS_HUB_ADMIN_USERS": ""}
    from_env = load_settings(tmp_path, environ=env)
    assert from_env.channel.port == 0
    assert from_env.images.push is True
    assert from_env.recipes.channels == ["a", "b"]
    assert from_env.hub.admin_users == []
    assert from_env.sources[("channel", "port")] == "$HUBWORKS_CHANNEL_PORT"


@pytest.mark.parametrize("config, environ, expected", [
    ("[channel]\nport = 'eighty'\n", {}, "channel.port from"),
    ("", {"HUBWORKS_CHANNEL_PORT": "eighty"}, "$HUBWORKS_CHANNEL_PORT is 'eighty', not a whole"),
    ("", {"HUBWORKS_IMAGES_PUSH": "perhaps"}, "not a boolean"),
    ("[channel]\nprot = 8000\n", {}, "unknown setting channel.prot"),
    ("[channel\n", {}, "is not valid TOML"),
    ("channel = 3\n", {}, "'channel' must be a [section] table"),
    ("", {"HUBWORKS_CHANNEL_PORT": "-1"}, "$HUBWORKS_CHANNEL_PORT is -1, which is not a port"),
    ("", {"HUBWORKS_HUB_PORT": "0"}, "$HUBWORKS_HUB_PORT is 0, which is not a port"),
    ("", {"HUBWORKS_CHANNEL_TOKEN": "a/b-c/d-e/f-g/h-i"}, "cannot stand in a URL path"),
    ("[channel]\npublic_url = 'builder:8000'\n", {}, "not an http:// or https:// URL"),
])
def test_bad_settings_name_the_setting_and_the_fix(tmp_path, config, environ, expected):
    (tmp_path / "hubworks.toml").write_text(config)
    with pytest.raises(HubworksError) as caught:
        load_settings(tmp_path, environ=environ)
    assert expected in str(caught.value)
    assert "fix:" in str(caught.value)


def test_every_setting_has_an_environment_variable_and_help():
    names = [s.env_var for s in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.env_var == f"HUBWORKS_{setting.section}_{setting.key}".upper()
        assert setting.help.strip()


def test_settings_page_lists_every_setting_as_generated():
    assert settings_table() in SETTINGS_PAGE.read_text(), (
        "docs/settings.md's settings table is out of date; paste the output of "
        "`python -m tasks.core.settings` (tasks.core.settings.settings_table())")


def test_settings_task_shows_values_and_sources(workspace):
    workspace.configure("[channel]\nport = 8123\n")
    workspace.env["HUBWORKS_IMAGES_PREFIX"] = "analytics/team"
    out = workspace.doit("settings").output
    assert "channel.port" in out and "8123" in out and "hubworks.toml" in out
    assert "analytics/team" in out and "$HUBWORKS_IMAGES_PREFIX" in out


# Every doit command reads the settings first (dodo.py's DOIT_CONFIG): a bad one stops each
# of them with the message and the fix, exit status 3, and no traceback.
@pytest.mark.parametrize("config, expected", [
    (b"[channel]\nport = 8000\n[images\nprefix = 'lab'\n",
     ["hubworks.toml is not valid TOML", "(at line 3", "line 3: [images"]),
    (b'[recipes]\nchannels = ["caf\xe9"]\n',
     ["hubworks.toml is not UTF-8 text: byte 0xe9 on line 2", "line 2: channels = ",
      "save the file as UTF-8"]),
    (b"[recipes]\nchannels = [1, 2]\n",
     ["recipes.channels from", "is [1, 2]; every item must be a string",
      'channels = ["conda-forge"]']),
    (b"[channel]\nport = 70000\n",
     ["channel.port from", "is 70000, which is not a port", "0 to 65535"]),
    (b"[hub]\nproxy_api_port = -1\n",
     ["hub.proxy_api_port from", "is -1, which is not a port", "1 to 65535"]),
    (b'[channel]\ntoken = "guessable"\n',
     ["channel.token from", "is 9 characters long", "at least 16"]),
], ids=["toml-syntax", "not-utf8", "list-of-numbers", "port-too-high", "negative-port",
        "short-token"])
def test_a_bad_setting_stops_every_doit_command_with_one_message(workspace, config, expected):
    (workspace.root / "hubworks.toml").write_bytes(config)
    for command in ("list", "settings", "build_images"):
        run = workspace.doit(command, check=False)
        assert run.returncode == 3, run.output
        assert "Traceback" not in run.output and 'File "' not in run.output, run.output
        assert f"ERROR: {workspace.root / 'hubworks.toml'}" in run.output \
            or f"from {workspace.root / 'hubworks.toml'}" in run.output, run.output
        for text in expected:
            assert text in run.output, run.output
        assert "fix: " in run.output
    assert "guessable" not in run.output  # a token is never printed, not even a bad one


def test_a_state_folder_inside_the_channel_is_refused(workspace):
    """The channel is served as it is: state inside it would serve doit's database."""
    workspace.configure('[workspace]\nstate_dir = "channel/.state"\n')
    for command in ("list", "build_images"):
        run = workspace.doit(command, check=False)
        assert run.returncode == 3, run.output
        assert "Traceback" not in run.output
        assert f"workspace.state_dir ({workspace.channel / '.state'}, from " \
               f"{workspace.root / 'hubworks.toml'}) and channel.dir " \
               f"({workspace.channel}, from default) overlap" in run.output, run.output
        assert "serve doit's database and the build logs" in run.output
        assert "fix: keep the two folders apart" in run.output
    assert not (workspace.channel / ".state").exists()  # nothing was written there

    workspace.configure("")
    workspace.env["HUBWORKS_CHANNEL_DIR"] = str(workspace.state / "channel")
    run = workspace.doit("settings", check=False)
    assert run.returncode == 3 and "Traceback" not in run.output
    assert f"channel.dir ({workspace.state / 'channel'}, from $HUBWORKS_CHANNEL_DIR)" \
        in run.output, run.output
    assert "the channel is inside the state folder" in run.output


def test_an_invalid_package_spec_in_an_image_is_named_with_its_file(workspace):
    folder = workspace.root / "images" / "analysis"
    folder.mkdir()
    (folder / "environment.yml").write_text(
        "channels: [internal, conda-forge]\ndependencies:\n  - internal::tool >>=1\n")
    workspace.configure("[channel]\nport = 0\n")
    run = workspace.doit("build_images", check=False)
    assert run.returncode != 0
    assert "Traceback" not in run.output and "InvalidMatchSpecError" not in run.output, \
        run.output
    assert ("image 'analysis': images/analysis/environment.yml lists 'internal::tool >>=1' "
            "under dependencies, which is not a valid conda package spec") in run.output
    assert "fix: write it as a name with an optional version" in run.output


def test_loading_the_graph_installs_no_signal_handler_and_writes_only_doits_database(
        workspace):
    """`doit list` only reads: the stop-signal handling starts with a run, and the one folder
    made is the one doit opens its database in (with the recipes' render cache)."""
    probe = (
        "import os, runpy, signal, sys\n"
        f"os.chdir({str(workspace.root)!r})\n"
        f"runpy.run_path({str(DODO)!r})\n"
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.set_wakeup_fd(-1))\n")
    loaded = subprocess.run([sys.executable, "-c", probe], env=workspace.env, text=True,
                            capture_output=True, check=True)
    assert loaded.stdout.split() == ["True", "-1"], loaded.stdout + loaded.stderr

    workspace.add_recipe("tool")
    workspace.doit("list")
    state = workspace.root / ".hubworks"
    made = sorted(str(p.relative_to(state)) for p in state.rglob("*"))
    assert made == ["doit.sqlite3", "recipes-rendered.json"], made
