"""build_recipes: one doit subtask per folder in recipes/, built into channel/<subdir>/.

- ``recipe.yaml`` builds with rattler-build (``tasks.rattler_build_runner``, a subprocess);
  a legacy ``meta.yaml`` builds with conda-build when a conda installation provides it.
- A recipe that requires a package another recipe makes builds after it, and gets it from
  a small private channel of exactly those packages (no network). A cycle is an error
  that names the recipes in it.
- A recipe rebuilds when a file in its folder, an internal package it uses, or a build
  setting changed, or when a package it made is missing from the channel.
- Each recipe builds from a copy of its folder in its scratch space
  ``<state_dir>/recipes/<scratch name>/``, whose name never holds spaces or shell
  characters (build scripts see these paths); the full log of the last build is
  ``<state_dir>/logs/recipes/<name>.log``.
- Published package files never change. A package lands in the channel in one step and
  never over an existing file. A rebuild whose file name is already published: with the
  same contents, the published file is kept and the rebuild dropped; with other contents
  (or when a newer build of it is published), it is built again with the next free build
  number (``recipes.republish = "bump"``) or fails (``"error"``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from doit.tools import config_changed

from .commands import failed_build_log, log_path, run_logged
from .errors import HubworksError, reports_errors
from .fsutil import (PACKAGE_SUFFIXES, atomic_write_json, exclusive_lock, folder_files,
                     is_package, link_or_copy, publish_new_file, read_json, sha256_file)
from .settings import Settings
from .workspace import current_settings

RECIPE_FILES = ("recipe.yaml", "meta.yaml")
RENDERED_FORMAT = 2  # 2: a problem is kept as [message, fix]
REPUBLISH_CHOICES = ("bump", "error")
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9_][A-Za-z0-9_.\-]*)")
_SHELL_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass
class Recipe:
    """One folder of recipes/: what it builds and which packages it requires."""

    name: str
    folder: Path
    spec: Path | None = None
    outputs: set[str] = field(default_factory=set)
    requires: set[str] = field(default_factory=set)
    summary: str = ""
    problem: HubworksError | None = None  # why it cannot be built; raised when its task runs

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
        # Needed: meta.yaml reads attributes of names only conda-build defines
        # ({{ data.get('version') }}), which jinja2.Undefined turns into an error.
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


def _renderer_stamp(backend: str) -> str:
    """Which renderer reads recipes of ``backend``, and which install of it: another
    version may read the same file differently. Found without importing it."""
    spec = importlib.util.find_spec("rattler_build" if backend == "rattler-build" else "jinja2")
    if spec is None or not spec.origin:
        return ""
    return f"{spec.origin}:{os.stat(spec.origin).st_mtime_ns}"


def _render_key(recipe: Recipe) -> str:
    """What reading the recipe depends on: its file's bytes, the renderer, the platform,
    and the form in which what it rendered to is kept (RENDERED_FORMAT)."""
    digest = hashlib.sha256(recipe.spec.read_bytes())
    digest.update(f"|{recipe.backend}|{_renderer_stamp(recipe.backend)}|{sys.platform}|"
                  f"{platform.machine()}|{RENDERED_FORMAT}".encode())
    return digest.hexdigest()


def _kept_problem(problem: HubworksError | None) -> list[str] | None:
    """A recipe's problem as the rendered file keeps it: [message, fix]."""
    return [problem.message, problem.fix] if problem else None


def _problem_from_kept(kept: list[str] | None) -> HubworksError | None:
    return HubworksError(kept[0], fix=kept[1]) if kept else None


def read_recipe(folder: Path, rendered: dict | None = None) -> Recipe:
    """The recipe in ``folder``. ``rendered`` (recipe name -> what an earlier read found,
    with its key) saves rendering a file that did not change; it is updated in place."""
    recipe = Recipe(name=folder.name, folder=folder)
    recipe.spec = next((folder / f for f in RECIPE_FILES if (folder / f).is_file()), None)
    if recipe.spec is None:
        recipe.problem = HubworksError(
            f"recipe '{folder.name}' has no recipe.yaml or meta.yaml in {folder}.",
            fix="add a recipe.yaml, or remove the folder")
        return recipe
    key = _render_key(recipe)
    known = (rendered or {}).get(folder.name)
    if isinstance(known, dict) and known.get("key") == key:
        recipe.outputs, recipe.requires = set(known["outputs"]), set(known["requires"])
        recipe.summary, recipe.problem = known["summary"], _problem_from_kept(known["problem"])
        return recipe
    try:
        if recipe.backend == "rattler-build":
            _read_recipe_yaml(recipe)
        else:
            _read_meta_yaml(recipe)
    except Exception as exc:  # any parse error: report it against this recipe only
        recipe.problem = HubworksError(
            f"recipe '{recipe.name}' cannot be read: {recipe.spec}: {str(exc).strip()}",
            fix="correct the recipe file")
    recipe.requires -= recipe.outputs
    if rendered is not None:
        rendered[folder.name] = {"key": key, "outputs": sorted(recipe.outputs),
                                 "requires": sorted(recipe.requires),
                                 "summary": recipe.summary,
                                 "problem": _kept_problem(recipe.problem)}
    return recipe


def discover_recipes(recipes_dir: Path, rendered_file: Path | None = None) -> dict[str, Recipe]:
    """Every recipe in ``recipes_dir``. Rendering a recipe.yaml costs a few milliseconds
    and every doit run needs all of them: with ``rendered_file``, what each file rendered
    to is kept there and used again while the file (and the renderer) stay the same."""
    if not recipes_dir.is_dir():
        return {}
    folders = sorted(p for p in recipes_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    before = read_json(rendered_file, {}) if rendered_file else None
    rendered = dict(before) if isinstance(before, dict) else ({} if rendered_file else None)
    recipes = {folder.name: read_recipe(folder, rendered) for folder in folders}
    if rendered_file and rendered is not None:
        rendered = {name: rendered[name] for name in recipes if name in rendered}
        if rendered != before:
            atomic_write_json(rendered_file, rendered)
    return recipes


# ---------------------------------------------------------------- the dependency graph

def internal_dependencies(recipes: dict[str, Recipe]) -> dict[str, set[str]]:
    """For each recipe, the recipes that make a package it requires."""
    maker: dict[str, str] = {}
    for recipe in recipes.values():
        for output in sorted(recipe.outputs):
            other = maker.setdefault(output, recipe.name)
            if other != recipe.name:
                recipe.problem = recipe.problem or HubworksError(
                    f"recipes '{other}' and '{recipe.name}' both make package '{output}'.",
                    fix="rename the package in one of them, or remove one recipe")
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
            recipes[name].problem = recipes[name].problem or HubworksError(
                f"recipes depend on each other in a cycle: {text}.",
                fix="remove one of these requirements so the recipes can build in order")
    return graph


# ---------------------------------------------------------------- records and scratch space

def scratch_name(name: str) -> str:
    """The folder name of a recipe's scratch space: the recipe's own name when build scripts
    can use it unquoted, else a slug of it with a short hash (so two names never share one).
    """
    if _SHELL_SAFE_NAME.fullmatch(name):
        return name
    slug = re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-.") or "recipe"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def scratch_dir(settings: Settings, name: str) -> Path:
    """A recipe's scratch space and records: every path its build script sees lies below."""
    return settings.state("recipes", scratch_name(name))


def recipe_record_path(settings: Settings, name: str) -> Path:
    """What the last successful build of a recipe put into the channel (a doit target)."""
    return scratch_dir(settings, name) / "record.json"


def recipe_packages(settings: Settings, name: str) -> list[dict]:
    record = read_json(recipe_record_path(settings, name), {})
    packages = record.get("packages") if isinstance(record, dict) else None
    # An unreadable record reads as "not built": the recipe builds again.
    if not isinstance(packages, list) or not all(
            isinstance(p, dict) and {"file", "size"} <= p.keys() for p in packages):
        return []
    return packages


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
    import asyncio  # here, not at the top: loading the tasks does not need it

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
            link_or_copy(source, target)
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


def _stage_recipe(recipe: Recipe, staged: Path, build_number: int | None) -> Path:
    """A copy of the recipe's folder to build from, below the scratch space, so that
    $RECIPE_DIR is as safe to use unquoted as every other path a build script sees; with
    ``build_number``, the copy's recipe.yaml has that build number in every output."""
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(recipe.folder, staged, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    spec = staged / recipe.spec.name
    if build_number is not None:
        _set_build_number(spec, build_number)
    return spec


def _set_build_number(spec: Path, number: int) -> None:
    """What rattler-build's --build-num does, in the recipe: the number of every output."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, quotes and Jinja expressions stay as written
    yaml.preserve_quotes = True
    yaml.width = 1 << 16
    yaml.indent(mapping=2, sequence=4, offset=2)
    data = yaml.load(spec.read_text())
    data.setdefault("build", {})["number"] = number
    for output in data.get("outputs") or []:
        build = output.get("build") if isinstance(output, dict) else None
        if isinstance(build, dict) and "number" in build:
            build["number"] = number
    with spec.open("w") as handle:
        yaml.dump(data, handle)


def _build_command(settings: Settings, recipe: Recipe, spec: Path, out: Path,
                   channels: list[str], result: Path) -> list[str]:
    if recipe.backend == "rattler-build":
        command = [sys.executable, "-m", "tasks.rattler_build_runner", str(spec),
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
    command = conda_build + [str(spec.parent), "--output-folder", str(out),
                             "--no-anaconda-upload", "--override-channels"]
    for channel in channels:
        command += ["-c", channel]
    return command


def _built_packages(recipe: Recipe, out: Path, result: Path) -> list[Path]:
    if recipe.backend == "rattler-build":
        return [Path(entry["path"]) for entry in read_json(result, [])]
    return sorted(p for p in out.glob("*/*") if is_package(p.name))


# ---------------------------------------------------------------- publishing, never over a file

@dataclass
class Placement:
    """A built package next to what the channel already holds under its name and version."""

    built: Path
    subdir: str
    name: str
    version: str
    build: str
    number: int
    published: Path | None = None  # a channel file of the same name, version and build
    identical: bool = False        # ... with the same contents as the built one
    newest: int = -1               # the highest build number published for this variant

    @property
    def file(self) -> str:
        return f"{self.subdir}/{self.built.name}"

    @property
    def keeps_published(self) -> bool:
        return self.published is not None and self.identical and self.number >= self.newest

    @property
    def clash(self) -> str:
        """Why this build cannot be published as it is; empty when it can."""
        if self.published is not None and not self.identical:
            return f"{self.version} build {self.number} is already published with other contents"
        if self.newest > self.number:
            return (f"{self.version} build {self.newest} is already published, newer than "
                    f"this build ({self.number})")
        return ""


def _variant_prefix(build: str, number: int) -> str | None:
    """The part of a build string before "_<number>" (the variant hash), if it has that form."""
    head, _, tail = build.rpartition("_")
    return head if head and tail == str(number) else None


async def _contents(path: Path) -> tuple[dict, dict]:
    """What makes two builds the same package: index.json without its timestamp, and
    paths.json (every payload file with its sha256). Archives differ from build to build."""
    import orjson
    from rattler.package_streaming import PackageArchive

    archive = await PackageArchive.from_path(path)
    files = await archive.read_files(["info/index.json", "info/paths.json"])
    index = orjson.loads(files["info/index.json"] or b"{}")
    index.pop("timestamp", None)
    return index, orjson.loads(files["info/paths.json"] or b"{}")


async def _place(channel_dir: Path, built: Path) -> Placement:
    from rattler.package_streaming import PackageArchive

    index = await (await PackageArchive.from_path(built)).index_json()
    placement = Placement(built, built.parent.name, str(index.name.normalized),
                          str(index.version), str(index.build), index.build_number)
    folder = channel_dir / placement.subdir
    stem = next(built.name[:-len(s)] for s in PACKAGE_SUFFIXES if built.name.endswith(s))
    placement.published = next((folder / f"{stem}{suffix}" for suffix in PACKAGE_SUFFIXES
                                if (folder / f"{stem}{suffix}").is_file()), None)
    if placement.published is not None:
        try:
            placement.identical = await _contents(built) == await _contents(placement.published)
        except Exception:  # an unreadable published file: not the same package
            placement.identical = False
        placement.newest = placement.number
    prefix = _variant_prefix(placement.build, placement.number)
    if prefix is not None and folder.is_dir():
        same_variant = re.compile(
            re.escape(f"{placement.name}-{placement.version}-{prefix}_") + r"(\d+)"
            + "(?:" + "|".join(re.escape(s) for s in PACKAGE_SUFFIXES) + ")")
        for entry in os.scandir(folder):
            match = same_variant.fullmatch(entry.name)
            if match:
                placement.newest = max(placement.newest, int(match.group(1)))
    return placement


def _placements(settings: Settings, built: list[Path]) -> list[Placement]:
    import asyncio

    async def all_of_them():
        return await asyncio.gather(*(_place(settings.channel_dir, path) for path in built))

    return list(asyncio.run(all_of_them()))


def _publish(settings: Settings, built: Path) -> dict:
    """Move a built package into channel/<subdir>/: in one step, and never over a file."""
    target = settings.channel_dir / built.parent.name / built.name
    record = {"file": f"{built.parent.name}/{built.name}", "size": built.stat().st_size,
              "sha256": sha256_file(built)}
    try:
        publish_new_file(built, target)
    except FileExistsError:
        raise HubworksError(
            f"{target} appeared in the channel while this build ran; published files never "
            f"change, so it was left as it is.",
            fix="run build_recipes again: it compares the build with that file") from None
    return record


def _published_record(path: Path, channel_dir: Path) -> dict:
    return {"file": path.relative_to(channel_dir).as_posix(), "size": path.stat().st_size,
            "sha256": sha256_file(path)}


def _republish_policy(settings: Settings) -> str:
    policy = settings.recipes.republish
    if policy not in REPUBLISH_CHOICES:
        raise HubworksError(
            f"recipes.republish is {policy!r} (from {settings.sources[('recipes', 'republish')]})"
            f", which is neither of {' or '.join(REPUBLISH_CHOICES)}.",
            fix='set it to "bump" (rebuild under the next free build number) or "error"')
    return policy


def _clash_error(recipe: Recipe, settings: Settings, clashes: list[Placement], why: str,
                 or_else: str = "") -> HubworksError:
    lines = "\n".join(f"    {settings.channel_dir / p.file}: {p.name} {p.clash}" for p in clashes)
    return HubworksError(
        f"recipe '{recipe.name}' rebuilt package(s) that are already published, and published "
        f"files never change; {why}:\n{lines}",
        fix=f"bump the version or the build number in {recipe.spec}, then build again{or_else}")


# ---------------------------------------------------------------- the action

@reports_errors
def build_recipe(settings: Settings, recipe: Recipe, dependencies: list[str],
                 needs_upstream: bool) -> None:
    if recipe.problem:
        raise recipe.problem
    scratch = scratch_dir(settings, recipe.name)
    # Another doit process building this recipe would share the scratch folder: take turns.
    with exclusive_lock(scratch / "lock", f"recipe '{recipe.name}'"):
        packages = _build_and_publish(settings, recipe, dependencies, needs_upstream, scratch)
    for package in packages:
        print(f"   {recipe.name}: {package['file']}")
    # The channel's index never lags its packages: what is built is served, even when a
    # later recipe fails. Imported here: the hub's steps read recipes through images, and
    # run where only doit and the standard library are installed (the index needs orjson).
    from .channel_index import index_and_report

    index_and_report(settings)


def _build_and_publish(settings: Settings, recipe: Recipe, dependencies: list[str],
                       needs_upstream: bool, scratch: Path) -> list[dict]:
    """Build the recipe, put what it made into the channel, and record it."""
    policy = _republish_policy(settings)
    channels = _build_channels(settings, recipe, dependencies, needs_upstream, scratch)
    placements = _placements(settings, _build(settings, recipe, scratch, channels))
    if any(placement.clash for placement in placements):
        placements = _rebuild_as_next_number(settings, recipe, scratch, channels, placements,
                                             policy)
    packages = [_land(settings, recipe, placement) for placement in placements]
    _write_record(settings, recipe, packages)
    shutil.rmtree(scratch / "out", ignore_errors=True)
    return packages


def _build_channels(settings: Settings, recipe: Recipe, dependencies: list[str],
                    needs_upstream: bool, scratch: Path) -> list[str]:
    """The channels a build reads: the private one of its internal dependencies, then the
    upstream ones only when it needs something external."""
    channels = []
    if dependencies:
        channels.append(_private_channel(settings, recipe, dependencies, scratch).as_uri())
    if needs_upstream:
        channels += settings.recipes.channels
    return channels


def _build(settings: Settings, recipe: Recipe, scratch: Path, channels: list[str],
           build_number: int | None = None) -> list[Path]:
    """Build the recipe in its scratch space; the package files it made."""
    out, result = _fresh_outputs(scratch)
    spec = _stage_recipe(recipe, scratch / "recipe", build_number)
    command = _build_command(settings, recipe, spec, out, channels, result)
    log = log_path(settings, "recipes", f"{recipe.name}.log")
    title = f"{recipe.backend} build of {recipe.spec}" + (
        f" as build {build_number}" if build_number is not None else "")
    returncode = run_logged(command, log, title=title, cwd=settings.root).returncode
    built = _built_packages(recipe, out, result) if returncode == 0 else []
    if not built:
        raise _build_failure(settings, recipe, returncode, log)
    return built


def _fresh_outputs(scratch: Path) -> tuple[Path, Path]:
    """An empty output folder and no result file: what a build leaves is this build's."""
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = scratch / "result.json"
    result.unlink(missing_ok=True)
    return out, result


def _build_failure(settings: Settings, recipe: Recipe, returncode: int,
                   log: Path) -> HubworksError:
    why = "produced no package" if returncode == 0 else f"exited with status {returncode}"
    return HubworksError(
        f"recipe '{recipe.name}' failed to build ({recipe.spec}): {recipe.backend} {why}.\n"
        + failed_build_log(log, settings.recipes.log_tail),
        fix="correct the recipe (the log says where it stopped), then run build_recipes again")


def _rebuild_as_next_number(settings: Settings, recipe: Recipe, scratch: Path,
                            channels: list[str], placements: list[Placement],
                            policy: str) -> list[Placement]:
    """Build again as the next free build number, which gives every package a new file
    name, or say why that cannot be done."""
    clashes = [p for p in placements if p.clash]
    if policy == "error":
        raise _clash_error(recipe, settings, clashes, 'recipes.republish is "error"',
                           '; or set recipes.republish = "bump" to have hubworks build '
                           'it as the next free build number')
    if recipe.backend != "rattler-build":
        raise _clash_error(recipe, settings, clashes,
                           "hubworks sets build numbers for recipe.yaml recipes only")
    if any(_variant_prefix(p.build, p.number) is None for p in clashes):
        raise _clash_error(recipe, settings, clashes,
                           "its build string does not end in the build number, so a new "
                           "build number would not give it a new file name")
    number = max(max(p.newest, p.number) for p in placements) + 1
    rebuilt = _placements(settings, _build(settings, recipe, scratch, channels, number))
    for clash in clashes:
        print(f"   {clash.name}: {clash.clash}; built as build {number}")
    return rebuilt


def _land(settings: Settings, recipe: Recipe, placement: Placement) -> dict:
    """Publish a built package, or keep the published file it is identical to; its record."""
    if placement.keeps_published:
        print(f"   {placement.name}: {placement.published.name} is already published "
              f"with the same contents; kept it")
        return _published_record(placement.published, settings.channel_dir)
    if placement.clash:  # cannot happen after the bump, unless the channel moved
        raise _clash_error(recipe, settings, [placement], "even after a new build number")
    return _publish(settings, placement.built)


def _write_record(settings: Settings, recipe: Recipe, packages: list[dict]) -> None:
    atomic_write_json(recipe_record_path(settings, recipe.name), {
        "recipe": recipe.name,
        "outputs": sorted(recipe.outputs),
        "packages": packages,
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })


# ---------------------------------------------------------------- the doit task

_discovered: dict[Path, tuple[dict[str, Recipe], dict[str, set[str]]]] = {}


def workspace_recipes(settings: Settings) -> tuple[dict[str, Recipe], dict[str, set[str]]]:
    """The recipes and their dependency graph, read once per process: rendering recipes is
    the costly part of loading the tasks, and build_images needs them too."""
    if settings.recipes_dir not in _discovered:
        recipes = discover_recipes(settings.recipes_dir, settings.state("recipes-rendered.json"))
        _discovered[settings.recipes_dir] = (recipes, analyse(recipes))
    return _discovered[settings.recipes_dir]


def package_makers(settings: Settings) -> dict[str, str]:
    """Which recipe makes each internal package name. A recipe that cannot be read now still
    makes what its last build made, so what needs those packages waits for it to be fixed."""
    recipes, _ = workspace_recipes(settings)
    makers: dict[str, str] = {}
    for name, recipe in recipes.items():
        outputs = recipe.outputs or (read_json(recipe_record_path(settings, name), {}) or {}).get(
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
            "actions": [(build_recipe, [settings, recipe, closure, needs_upstream])],
            "file_dep": [str(p) for p in folder_files(recipe.folder)]
                        + [str(recipe_record_path(settings, dep)) for dep in closure],
            "task_dep": [f"build_recipes:{dep}" for dep in uses],
            "targets": [str(recipe_record_path(settings, name))],
            "uptodate": [
                config_changed({
                    "format": settings.recipes.package_format,
                    "channels": settings.recipes.channels,
                    "backend": recipe.backend,
                    "uses": closure,
                    "problem": str(recipe.problem or ""),  # text: config_changed takes JSON values
                }),
                (_packages_still_in_channel, [settings, name]),
            ],
            "clean": True,
            "meta": {"what": f"recipe '{name}'",
                     "interrupted": "packages reach the channel whole or not at all; the "
                                    "next run builds and indexes what did not finish"},
        }
