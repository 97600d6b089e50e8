"""Settings: defaults, hubworks.toml, HUBWORKS_* variables, clear errors, the README table."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.errors import HubworksError
from tasks.settings import SETTINGS, load_settings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


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


def test_readme_lists_every_setting_as_generated():
    assert settings_table() in README.read_text(), (
        "README's settings table is out of date; paste tasks.settings.settings_table()")


def test_settings_task_shows_values_and_sources(workspace):
    workspace.configure("[channel]\nport = 8123\n")
    workspace.env["HUBWORKS_IMAGES_PREFIX"] = "analytics/team"
    out = workspace.doit("settings").output
    assert "channel.port" in out and "8123" in out and "hubworks.toml" in out
    assert "analytics/team" in out and "$HUBWORKS_IMAGES_PREFIX" in out
