"""build_recipes: one doit subtask per folder in recipes/, built into channel/<subdir>/.

- ``recipe.yaml`` builds with rattler-build (``tasks.recipes.rattler_build_runner``, a subprocess);
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


from doit.tools import config_changed

from ..core.deferred import deferred
from ..core.fsutil import folder_files
from ..core.workspace import current_settings
from .build import recipe_record_path
from .recipe import dependency_closure, workspace_recipes

_BUILD = "tasks.recipes.build"  # loads when a recipe is checked or built


def task_build_recipes():
    """Build the conda packages in recipes/ into channel/ (rattler-build or conda-build)."""
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
            "actions": [(deferred(_BUILD, "build_recipe"),
                         [settings, recipe, closure, needs_upstream])],
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
                (deferred(_BUILD, "packages_still_in_channel"), [settings, name]),
            ],
            "clean": True,
            "meta": {"what": f"recipe '{name}'",
                     "interrupted": "packages reach the channel whole or not at all; the "
                                    "next run builds and indexes what did not finish"},
        }
