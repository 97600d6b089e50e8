"""A recipe as hubworks reads it: its folder, outputs, requirements, and the order
recipes build in (internal dependencies, cycles).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_json, read_json
from ..core.settings import Settings


RECIPE_FILES = ("recipe.yaml", "meta.yaml")
RENDERED_FORMAT = 2  # 2: a problem is kept as [message, fix]
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
    """Strongly connected groups of more than one recipe (Tarjan), each sorted.

    graphlib's CycleError names one cycle; every recipe of every cycle is named here.
    """
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




_discovered: dict[Path, tuple[dict[str, Recipe], dict[str, set[str]]]] = {}


def workspace_recipes(settings: Settings) -> tuple[dict[str, Recipe], dict[str, set[str]]]:
    """The recipes and their dependency graph, read once per process: rendering recipes is
    the costly part of loading the tasks, and build_images needs them too."""
    if settings.recipes_dir not in _discovered:
        recipes = discover_recipes(settings.recipes_dir, settings.state("recipes-rendered.json"))
        _discovered[settings.recipes_dir] = (recipes, analyse(recipes))
    return _discovered[settings.recipes_dir]
