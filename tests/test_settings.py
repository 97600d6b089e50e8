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


def refusal(root: Path, config: str = "", environ: dict[str, str] | None = None) -> str:
    (root / "hubworks.toml").write_text(config)
    with pytest.raises(HubworksError) as caught:
        load_settings(root, environ=environ or {})
    return str(caught.value)


@pytest.mark.parametrize("section, key, choices", [
    ("hub", "https", "off, files, letsencrypt"),
    ("hub", "spawner", "local, docker"),
    ("hub", "authenticator", "pam, dummy"),
    ("hub", "service", "auto, systemd, background"),
    ("images", "engine", "auto, docker, podman"),
    ("images", "isolation", '"", chroot, oci, rootless'),
    ("recipes", "republish", "bump, error"),
    ("recipes", "package_format", "conda, tar.bz2"),
])
def test_a_value_outside_the_choices_is_refused_with_where_it_came_from(
        tmp_path, section, key, choices):
    variable = f"HUBWORKS_{section}_{key}".upper()
    said = refusal(tmp_path, environ={variable: "maybe"})
    assert f"{section}.{key} is 'maybe' (from ${variable}); it must be one of: {choices}." \
        in said, said
    assert f"fix: set {variable} to one of those, or unset it for the default" in said

    said = refusal(tmp_path, f'[{section}]\n{key} = "maybe"\n')
    assert f"{section}.{key} is 'maybe' (from {tmp_path / 'hubworks.toml'}); it must be one " \
           f"of: {choices}." in said, said
    assert f"fix: write one of those in {tmp_path / 'hubworks.toml'}, e.g. [{section}] {key} = " \
        in said


def test_every_declared_choice_loads_and_the_defaults_are_among_them(tmp_path):
    with_choices = [s for s in SETTINGS if s.choices]
    assert len(with_choices) >= 8
    for setting in with_choices:
        assert setting.default in setting.choices, setting.name
        for choice in setting.choices:
            loaded = load_settings(tmp_path, environ={setting.env_var: choice})
            assert getattr(getattr(loaded, setting.section), setting.key) == choice


@pytest.mark.parametrize("config, environ, expected, fix", [
    ("[hub]\ncpu_limit = nan\n", {}, "hub.cpu_limit from", "use 0 or more; 0 sets no limit"),
    ("", {"HUBWORKS_HUB_CPU_LIMIT": "nan"}, "is nan, not a finite number", "0 sets no limit"),
    ("[hub]\ncpu_limit = inf\n", {}, "is inf, not a finite number", "use 0 or more"),
    ("", {"HUBWORKS_HUB_CPU_LIMIT": "-0.5"}, "is -0.5, below 0", "use 0 or more"),
    ("", {"HUBWORKS_HUB_MEM_LIMIT": "100M"},
     "$HUBWORKS_HUB_MEM_LIMIT is '100M', below 256M", "256M or more; empty sets no limit"),
    ("[hub]\nmem_limit = '0.1G'\n", {}, "is '0.1G', below 256M", "use 256M or more"),
    # JupyterHub reads a string of bare digits as a unit it does not know
    ("[hub]\nmem_limit = '4000000000'\n", {}, "is '4000000000', not an amount of memory",
     'e.g. mem_limit = "2G"'),
    ("", {"HUBWORKS_HUB_CULL_IDLE_MINUTES": "525601"},
     "hub.cull_idle_minutes from $HUBWORKS_HUB_CULL_IDLE_MINUTES is 525601, above 525600",
     "use a number from 0 to 525600; 0 turns idle culling off"),
    ("[hub]\ncull_max_age_hours = 8761\n", {}, "hub.cull_max_age_hours from", "0 to 8760"),
    ("[hub]\ncull_max_age_hours = -1\n", {}, "is -1, below 0", "0 sets no maximum age"),
    ("", {"HUBWORKS_HUB_SPAWN_TIMEOUT": "0"}, "hub.spawn_timeout from", "use 1 or more"),
    ("", {"HUBWORKS_HUB_SPAWN_TIMEOUT": "-60"}, "is -60, below 1", "use 1 or more"),
    ("[images]\nuser_id = 0\n", {}, "images.user_id from", "use 1 or more"),
    ("[recipes]\nlog_tail = -3\n", {}, "recipes.log_tail from", "use 1 or more"),
], ids=["cpu-nan-file", "cpu-nan-env", "cpu-inf", "cpu-negative", "mem-below-floor",
        "mem-fraction-below-floor", "mem-bare-digits", "cull-idle-over-a-year",
        "cull-age-over-a-year", "cull-age-negative", "spawn-timeout-0", "spawn-timeout-negative",
        "root-uid", "log-tail-negative"])
def test_absurd_numbers_are_refused_with_the_bounds(tmp_path, config, environ, expected, fix):
    said = refusal(tmp_path, config, environ)
    assert expected in said, said
    assert fix in said.split("fix: ")[1], said


@pytest.mark.parametrize("variable, zero", [
    ("HUBWORKS_CHANNEL_PORT", "0 picks a free port"),
    ("HUBWORKS_HUB_HTTP_PORT", "0 turns the plain-HTTP listener off"),
    ("HUBWORKS_HUB_PORT", "0 is not allowed"),
    ("HUBWORKS_HUB_HUB_PORT", "0 is not allowed"),
    ("HUBWORKS_HUB_PROXY_API_PORT", "0 is not allowed"),
])
def test_each_port_says_what_0_means_for_it(tmp_path, variable, zero):
    said = refusal(tmp_path, environ={variable: "65536"})
    assert f"${variable} is 65536, which is not a port" in said
    assert zero in said.split("fix: ")[1], said
    if "not allowed" in zero:
        assert f"${variable} is 0, which is not a port" in refusal(tmp_path,
                                                                  environ={variable: "0"})


def test_values_at_the_bounds_load(tmp_path):
    (tmp_path / "hubworks.toml").write_text(
        '[hub]\nmem_limit = "256M"\ncpu_limit = 0.5\ncull_idle_minutes = 525600\n'
        'cull_max_age_hours = 8760\nspawn_timeout = 1\nhttp_port = 0\nport = 65535\n'
        '[channel]\nport = 0\n')
    hub = load_settings(tmp_path, environ={}).hub
    assert (hub.mem_limit, hub.cpu_limit, hub.cull_idle_minutes, hub.cull_max_age_hours,
            hub.spawn_timeout, hub.http_port, hub.port) == ("256M", 0.5, 525600, 8760, 1, 0,
                                                            65535)
    assert load_settings(tmp_path, environ={"HUBWORKS_HUB_MEM_LIMIT": "1.5G"}).hub.mem_limit \
        == "1.5G"


def test_every_default_is_within_its_bounds_and_zero_is_declared_with_it():
    for setting in SETTINGS:
        low, high = setting.bounds
        if high is not None:
            assert low is not None and low <= setting.default <= high, setting.name
        if setting.zero and setting.kind != "bytes":
            assert low == 0, f"{setting.name} says what 0 does but does not allow it"


def test_the_table_shows_choices_and_bounds():
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")
            for line in settings_table().splitlines()[2:]}
    assert rows["hub.https"][3] == "`off`, `files`, `letsencrypt`"
    assert rows["images.isolation"][3] == "(empty), `chroot`, `oci`, `rootless`"
    assert rows["channel.port"][3] == "0 to 65535; 0 picks a free port"
    assert rows["hub.port"][3] == "1 to 65535"
    assert rows["hub.cull_idle_minutes"][3] == "0 to 525600; 0 turns idle culling off"
    assert rows["hub.mem_limit"][3] == "256M or more; empty sets no limit"
    assert rows["hub.cpu_limit"][3] == "0 or more; 0 sets no limit"
    assert rows["hub.spawn_timeout"][3] == "1 or more"
    assert rows["images.push"][3] == "`true`, `false`"
    assert rows["images.prefix"][3] == ""


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


def test_a_choice_from_the_environment_stops_doit_list_before_anything_runs(workspace):
    """hub.https = maybe used to pass `doit list` and fail only after install_hub had
    installed certbot."""
    workspace.env["HUBWORKS_HUB_HTTPS"] = "maybe"
    run = workspace.doit("list", check=False)
    assert run.returncode == 3, run.output
    assert "Traceback" not in run.output and 'File "' not in run.output, run.output
    assert run.output.count("ERROR: ") == 1, run.output
    assert "ERROR: hub.https is 'maybe' (from $HUBWORKS_HUB_HTTPS); it must be one of: off, " \
           "files, letsencrypt." in run.output, run.output
    assert 'fix: set HUBWORKS_HUB_HTTPS to one of those, or unset it for the default ("off")' \
        in run.output
    assert "install_hub" not in run.output  # no task was listed


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
