"""build_recipes: one doit subtask per folder in recipes/, built into channel/<subdir>/.

- ``recipe.yaml`` builds with rattler-build (``tasks.rattler_build_runner``, a subprocess);
  a legacy ``meta.yaml`` builds with conda-build when a conda installation provides it.
- A recipe that requires a package another recipe makes builds after it, and gets it from
  a small private channel of exactly those packages (no network). A cycle is an error
  that names the recipes in it.
- A recipe rebuilds when a file in its folder, an internal package it uses, or a build
  setting changed, or when a package it made is missing from the channel.
- Build scratch space is ``<state_dir>/recipes/<name>/``; the full log of the last build
  is ``<state_dir>/logs/recipes/<name>.log``. Packages land in the channel atomically.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from doit.tools import config_changed

from .channel_index import index_and_report
from .errors import HubworksError, reports_errors
from .fsutil import (atomic_copy, atomic_write_json, exclusive_lock, folder_files, is_package,
                     read_json, sha256_file)
from .settings import Settings
from .workspace import current_settings, log_path, log_tail, run_logged

RECIPE_FILES = ("recipe.yaml", "meta.yaml")
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9_][A-Za-z0-9_.\-]*)")


@dataclass
class Recipe:
    """One folder of recipes/: what it builds and which packages it requires."""

    name: str
    folder: Path
    spec: Path | None = None
    outputs: set[str] = field(default_factory=set)
    requires: set[str] = field(default_factory=set)
    summary: str = ""
    problem: str = ""  # why it cannot be built; reported when its task runs

    @property
    def backend(self) -> str:
        return "conda-build" if self.spec and self.spec.name == "meta.yaml" else "rattler-build"


# ---------------------------------------------------------------- reading recipes

def spec_name(spec: str) -> str | None:
    """The package name a conda spec string starts with ("pandas >=2" -> "pandas")."""
    match = _NAME_RE.match(spec)
    return match.group(1).lower() if match else None


def _requirement_name(entry) -> str | None:
    if isinstance(entry, str):
        return spec_name(entry)
    if isinstance(entry, dict):  # pin_subpackage / pin_compatible
        for value in entry.values():
            if isinstance(value, dict) and "name" in value:
                return str(value["name"]).lower()
    return None


def _read_recipe_yaml(recipe: Recipe) -> None:
    from rattler_build import Stage0Recipe

    variants = Stage0Recipe.from_file(recipe.spec).render()
    for variant in variants:
        rendered = variant.recipe
        recipe.outputs.add(str(rendered.package.name).lower())
        requirements = rendered.requirements.to_dict()
        for section in ("build", "host", "run"):
            for entry in requirements.get(section) or []:
                name = _requirement_name(entry)
                if name:
                    recipe.requires.add(name)
        about = rendered.to_dict().get("about") or {}
        recipe.summary = recipe.summary or about.get("summary") or ""


def _read_meta_yaml(recipe: Recipe) -> None:
    """Best-effort reading of a conda-build recipe: Jinja rendered permissively, then YAML."""
    import jinja2
    from ruamel.yaml import YAML

    class Anything(jinja2.Undefined):
        def __getattr__(self, _):
            return Anything()

        def __call__(self, *args, **kwargs):
            return ""

        __str__ = lambda self: ""  # noqa: E731

    env = jinja2.Environment(undefined=Anything)
    text = env.from_string(recipe.spec.read_text()).render(
        environ=os.environ, os=os, load_setup_py_data=dict, load_file_regex=lambda **k: None)
    data = YAML(typ="safe").load(text) or {}
    outputs = list(data.get("outputs") or [])
    names = [o.get("name") for o in outputs if o.get("name")]
    recipe.outputs.update(str(n).lower() for n in names or [(data.get("package") or {}).get("name")]
                          if n)
    for block in [data] + outputs:
        for section in ("build", "host", "run"):
            for entry in (block.get("requirements") or {}).get(section) or []:
                parsed = _requirement_name(entry) if entry else None
                if parsed:
                    recipe.requires.add(parsed)
    recipe.summary = str((data.get("about") or {}).get("summary") or "")


def read_recipe(folder: Path) -> Recipe:
    recipe = Recipe(name=folder.name, folder=folder)
    recipe.spec = next((folder / f for f in RECIPE_FILES if (folder / f).is_file()), None)
    if recipe.spec is None:
        recipe.problem = (f"recipe '{folder.name}' has no recipe.yaml or meta.yaml "
                          f"in {folder}.\n  fix: add a recipe.yaml, or remove the folder")
        return recipe
    try:
        if recipe.backend == "rattler-build":
            _read_recipe_yaml(recipe)
        else:
            _read_meta_yaml(recipe)
    except Exception as exc:  # any parse error: report it against this recipe only
        recipe.problem = (f"recipe '{recipe.name}' cannot be read: {recipe.spec}: "
                          f"{str(exc).strip()}\n  fix: correct the recipe file")
    recipe.requires -= recipe.outputs
    return recipe


def discover_recipes(recipes_dir: Path) -> dict[str, Recipe]:
    if not recipes_dir.is_dir():
        return {}
    folders = sorted(p for p in recipes_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {folder.name: read_recipe(folder) for folder in folders}


# ---------------------------------------------------------------- the dependency graph

def internal_dependencies(recipes: dict[str, Recipe]) -> dict[str, set[str]]:
    """For each recipe, the recipes that make a package it requires."""
    maker: dict[str, str] = {}
    for recipe in recipes.values():
        for output in sorted(recipe.outputs):
            other = maker.setdefault(output, recipe.name)
            if other != recipe.name:
                recipe.problem = recipe.problem or (
                    f"recipes '{other}' and '{recipe.name}' both make package '{output}'.\n"
                    f"  fix: rename the package in one of them, or remove one recipe")
    return {name: {maker[req] for req in recipe.requires if req in maker} - {name}
            for name, recipe in recipes.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one recipe (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def dependency_closure(name: str, graph: dict[str, set[str]]) -> list[str]:
    seen: set[str] = set()
    todo = list(graph.get(name, ()))
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(graph.get(current, ()))
    return sorted(seen)


def analyse(recipes: dict[str, Recipe]) -> dict[str, set[str]]:
    """The dependency graph; recipes in a cycle are marked with a problem naming it."""
    graph = internal_dependencies(recipes)
    for cycle in find_cycles(graph):
        text = " -> ".join(cycle + [cycle[0]])
        for name in cycle:
            recipes[name].problem = recipes[name].problem or (
                f"recipes depend on each other in a cycle: {text}.\n"
                f"  fix: remove one of these requirements so the recipes can build in order")
    return graph


# ---------------------------------------------------------------- records and scratch space

def record_path(settings: Settings, name: str) -> Path:
    """What the last successful build of a recipe put into the channel (a doit target)."""
    return settings.state("recipes", name, "record.json")


def recipe_packages(settings: Settings, name: str) -> list[dict]:
    return (read_json(record_path(settings, name), {}) or {}).get("packages", [])


def _packages_still_in_channel(settings: Settings, name: str) -> bool:
    packages = recipe_packages(settings, name)
    for package in packages:
        try:
            if (settings.channel_dir / package["file"]).stat().st_size != package["size"]:
                return False
        except OSError:
            return False
    return bool(packages)


def _private_channel(settings: Settings, recipe: Recipe, dependencies: list[str],
                     scratch: Path) -> Path:
    """A channel holding exactly the internal packages this recipe may use, indexed."""
    from rattler.index import index_fs

    channel = scratch / "deps"
    shutil.rmtree(channel, ignore_errors=True)
    (channel / "noarch").mkdir(parents=True)
    for dependency in dependencies:
        packages = recipe_packages(settings, dependency)
        if not packages:
            raise HubworksError(
                f"recipe '{recipe.name}' needs recipe '{dependency}', which has not been built.",
                fix=f"run `doit build_recipes` (it builds '{dependency}' first)")
        for package in packages:
            source, target = settings.channel_dir / package["file"], channel / package["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    asyncio.run(index_fs(channel, write_shards=False, write_zst=False))
    return channel


def conda_build_command(settings: Settings) -> list[str] | None:
    if settings.recipes.conda_build:
        return shlex.split(settings.recipes.conda_build)
    if shutil.which("conda-build"):
        return [shutil.which("conda-build")]
    conda = shutil.which("conda")
    if conda and subprocess.run([conda, "build", "--help"], capture_output=True).returncode == 0:
        return [conda, "build"]
    return None


def _build_command(settings: Settings, recipe: Recipe, out: Path, channels: list[str],
                   result: Path) -> list[str]:
    if recipe.backend == "rattler-build":
        command = [sys.executable, "-m", "tasks.rattler_build_runner", str(recipe.spec),
                   "--output-dir", str(out), "--result", str(result),
                   "--package-format", settings.recipes.package_format]
        for channel in channels:
            command += ["--channel", channel]
        return command
    conda_build = conda_build_command(settings)
    if conda_build is None:
        raise HubworksError(
            f"recipe '{recipe.name}' is a legacy meta.yaml recipe and conda-build is not "
            f"installed (looked for conda-build and 'conda build' on PATH).",
            fix="install conda-build in a conda installation on PATH (conda install "
                "conda-build) or name its command in recipes.conda_build "
                "(HUBWORKS_RECIPES_CONDA_BUILD); or convert the recipe to recipe.yaml, "
                "which rattler-build builds without conda")
    command = conda_build + [str(recipe.folder), "--output-folder", str(out),
                             "--no-anaconda-upload", "--override-channels"]
    for channel in channels:
        command += ["-c", channel]
    return command


def _built_packages(recipe: Recipe, out: Path, result: Path) -> list[Path]:
    if recipe.backend == "rattler-build":
        return [Path(entry["path"]) for entry in read_json(result, [])]
    return sorted(p for p in out.glob("*/*") if is_package(p.name))


def _publish(settings: Settings, built: Path) -> dict:
    """Move a built package into channel/<subdir>/ without readers seeing a partial file."""
    subdir = built.parent.name
    target = settings.channel_dir / subdir / built.name
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"file": f"{subdir}/{built.name}", "size": built.stat().st_size,
              "sha256": sha256_file(built)}
    os.chmod(built, 0o644)
    try:
        os.replace(built, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        atomic_copy(built, target)
    return record


# ---------------------------------------------------------------- the action

@reports_errors
def build_recipe(recipe: Recipe, dependencies: list[str], needs_upstream: bool) -> None:
    settings = current_settings()
    if recipe.problem:
        raise HubworksError(recipe.problem)
    scratch = settings.state("recipes", recipe.name)
    # Another doit process building this recipe would share the scratch folder: take turns.
    with exclusive_lock(scratch / "lock", f"recipe '{recipe.name}'"):
        packages = _build_and_publish(settings, recipe, dependencies, needs_upstream, scratch)
    for package in packages:
        print(f"   {recipe.name}: {package['file']}")
    # The channel's index never lags its packages: what is built is served, even when a
    # later recipe fails.
    index_and_report(settings)


def _build_and_publish(settings: Settings, recipe: Recipe, dependencies: list[str],
                       needs_upstream: bool, scratch: Path) -> list[dict]:
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = scratch / "result.json"
    result.unlink(missing_ok=True)

    channels = []
    if dependencies:
        channels.append(_private_channel(settings, recipe, dependencies, scratch).as_uri())
    if needs_upstream:
        channels += settings.recipes.channels
    command = _build_command(settings, recipe, out, channels, result)

    log = log_path(settings, "recipes", f"{recipe.name}.log")
    returncode = run_logged(command, log, title=f"{recipe.backend} build of {recipe.spec}",
                            cwd=settings.root)
    built = _built_packages(recipe, out, result) if returncode == 0 else []
    if not built:
        why = "produced no package" if returncode == 0 else f"exited with status {returncode}"
        raise HubworksError(
            f"recipe '{recipe.name}' failed to build ({recipe.spec}): {recipe.backend} {why}.\n"
            f"  last lines of its log:\n{log_tail(log, settings.recipes.log_tail)}\n"
            f"  full log: {log}",
            fix="correct the recipe (the log says where it stopped), then run build_recipes again")
    packages = [_publish(settings, path) for path in built]
    atomic_write_json(record_path(settings, recipe.name), {
        "recipe": recipe.name,
        "outputs": sorted(recipe.outputs),
        "packages": packages,
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    shutil.rmtree(out, ignore_errors=True)
    return packages


# ---------------------------------------------------------------- the doit task

_discovered: dict[Path, tuple[dict[str, Recipe], dict[str, set[str]]]] = {}


def workspace_recipes(settings: Settings) -> tuple[dict[str, Recipe], dict[str, set[str]]]:
    """The recipes and their dependency graph, read once per process: rendering recipes is
    the costly part of loading the tasks, and build_images needs them too."""
    if settings.recipes_dir not in _discovered:
        recipes = discover_recipes(settings.recipes_dir)
        _discovered[settings.recipes_dir] = (recipes, analyse(recipes))
    return _discovered[settings.recipes_dir]


def package_makers(settings: Settings) -> dict[str, str]:
    """Which recipe makes each internal package name. A recipe that cannot be read now still
    makes what its last build made, so what needs those packages waits for it to be fixed."""
    recipes, _ = workspace_recipes(settings)
    makers: dict[str, str] = {}
    for name, recipe in recipes.items():
        outputs = recipe.outputs or (read_json(record_path(settings, name), {}) or {}).get(
            "outputs", [])
        for output in outputs:
            makers.setdefault(output, name)
    return makers


def task_build_recipes():
    """Build the conda packages in recipes/ into channel/ (rattler-build; conda-build for meta.yaml)."""
    settings = current_settings()
    recipes, graph = workspace_recipes(settings)
    internal = {output for recipe in recipes.values() for output in recipe.outputs}
    # index_channel first: it indexes what an earlier, interrupted run published and left
    # unindexed; each build then indexes its own packages.
    yield {"name": None, "doc": task_build_recipes.__doc__, "task_dep": ["index_channel"]}
    for name, recipe in recipes.items():
        # A recipe with a problem fails on its own; its edges could form a cycle for doit.
        uses = sorted(graph[name]) if not recipe.problem else []
        closure = dependency_closure(name, graph) if not recipe.problem else []
        # Upstream channels only when something external is required: all-internal builds
        # need no network.
        needs_upstream = bool(recipe.requires - internal)
        yield {
            "name": name,
            "doc": recipe.summary or f"build recipes/{name}",
            "actions": [(build_recipe, [recipe, closure, needs_upstream])],
            "file_dep": [str(p) for p in folder_files(recipe.folder)]
                        + [str(record_path(settings, dep)) for dep in closure],
            "task_dep": [f"build_recipes:{dep}" for dep in uses],
            "targets": [str(record_path(settings, name))],
            "uptodate": [
                config_changed({
                    "format": settings.recipes.package_format,
                    "channels": settings.recipes.channels,
                    "backend": recipe.backend,
                    "uses": closure,
                    "problem": recipe.problem,
                }),
                lambda task, values, name=name: _packages_still_in_channel(settings, name),
            ],
            "clean": True,
            "meta": {"what": f"recipe '{name}'",
                     "interrupted": "packages reach the channel whole or not at all; the "
                                    "next run builds and indexes what did not finish"},
        }
