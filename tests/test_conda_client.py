"""A real conda client (py-rattler) installs internal packages from the served channel.

The whole chain as a user meets it: build the shipped recipes, index, serve over HTTP,
solve and install with rattler into a prefix, run what was installed; then rebuild while
the server keeps running and show that the client sees the new packages at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import rattler

from tasks.channel.server import served_channel

PLATFORMS = [str(rattler.Subdir.current()), "noarch"]


def install(url: str, specs: list[str], prefix, cache) -> dict[str, rattler.RepoDataRecord]:
    async def solve_and_install():
        gateway = rattler.Gateway(cache_dir=cache / "repodata")
        records = await rattler.solve([rattler.Channel(url)], specs, gateway=gateway,
                                      platforms=PLATFORMS)
        await rattler.install(records, prefix, cache_dir=cache / "pkgs", show_progress=False)
        return {r.name.normalized: r for r in records}

    return asyncio.run(solve_and_install())


def new_notebook(prefix, *args: str, cwd=None) -> str:
    return subprocess.run([str(prefix / "bin" / "new-notebook"), *args], check=True,
                          capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, CONDA_PREFIX=str(prefix))).stdout


def test_client_installs_and_sees_rebuilds(example_workspace, tmp_path):
    ws = example_workspace
    ws.doit("build_recipes")
    cache = tmp_path / "client-cache"
    with served_channel(ws.channel, port=0) as served:
        prefix = tmp_path / "env1"
        records = install(served.url, ["new-notebook"], prefix, cache)
        # The internal dependency came along from the same channel.
        assert {"new-notebook", "lab-templates"} <= set(records)
        assert str(records["lab-templates"].version) == "1.2.0"
        assert new_notebook(prefix, "list").split() == ["analysis", "report"]
        made = new_notebook(prefix, "report", "q3.ipynb", cwd=tmp_path)
        assert "created q3.ipynb" in made and (tmp_path / "q3.ipynb").is_file()

        # A new template and version of the dependency, built while the server runs.
        recipe = ws.root / "recipes" / "lab-templates"
        (recipe / "templates" / "memo.ipynb").write_text(
            (recipe / "templates" / "report.ipynb").read_text())
        spec = recipe / "recipe.yaml"
        spec.write_text(spec.read_text().replace('version: "1.2.0"', 'version: "1.3.0"'))
        # Each build indexes what it published: nothing is left for index_channel.
        run = ws.doit("build_recipes", "index_channel")
        assert run.executed == ["build_recipes:lab-templates", "build_recipes:new-notebook"]

        prefix2 = tmp_path / "env2"
        records = install(served.url, ["new-notebook"], prefix2, cache)  # same client cache
        assert str(records["lab-templates"].version) == "1.3.0"
        assert new_notebook(prefix2, "list").split() == ["analysis", "memo", "report"]

        # Rebuilt without a new version: published as the next build number (the file the
        # client cached never changes), and the client gets it at once.
        tool = ws.root / "recipes" / "new-notebook" / "new-notebook.sh"
        tool.write_text(tool.read_text().replace('echo "created', 'echo "new notebook'))
        ws.doit("build_recipes")
        prefix3 = tmp_path / "env3"
        again = install(served.url, ["new-notebook"], prefix3, cache)
        assert again["new-notebook"].version == records["new-notebook"].version
        assert again["new-notebook"].build_number == records["new-notebook"].build_number + 1
        assert "new notebook q4.ipynb" in new_notebook(prefix3, "memo", "q4.ipynb",
                                                       cwd=tmp_path)
    assert served.requests_served > 0


def test_client_uses_token_urls(example_workspace, tmp_path):
    ws = example_workspace
    ws.doit("build_recipes")
    with served_channel(ws.channel, port=0, token="s3cret-token") as served:
        assert served.url.endswith("/t/s3cret-token/")
        records = install(served.url, ["lab-settings"], tmp_path / "env", tmp_path / "cache")
        assert "lab-settings" in records
        settings = tmp_path / "env" / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
        assert "JupyterLab Light" in settings.read_text()
