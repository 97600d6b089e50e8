"""Each image's state as the Images page shows it: up to date, or out of date and why.

Run in the workspace (its own venv), read-only but for a small cache of its own::

    python -m tasks.images.status --json     # one JSON line: {"images": [...]}

Each image: ``name``, ``tag`` and ``built_at`` of the build users get, its internal
``packages`` (name, version), ``state`` (``up to date``, ``out of date``, ``tests failed``) and
the ``reason``. The reasons follow build_images' own rules, asked in the order a build would
meet them: the image cannot be built; it was never built; its last build failed its tests; a
recipe of an internal package it uses changed (doit's own up-to-date check of
``build_recipes:<recipe>``, read from the workspace's doit database); a package it uses was
rebuilt; its folder (or a setting that shapes the build) changed; its tag is missing from the
engine (or from the registry with ``images.push``).

The Images page's service runs this with the workspace's Python, so the hub's venv never
imports hubworks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from doit.cmd_base import DoitCmdBase
from doit.doit_cmd import DoitMain

from ..core.fsutil import atomic_write_json, read_json, tree_digest
from ..core.settings import Settings
from .discovery import Image, discover_images
from .records import read_image_record

DODO = Path(__file__).resolve().parents[2] / "dodo.py"
UP_TO_DATE, OUT_OF_DATE, TESTS_FAILED = "up to date", "out of date", "tests failed"


def _folders_file(settings: Settings) -> Path:
    """The folder digest of each recorded build hash, kept while the folder matched it."""
    return settings.state("images-page", "folders.json")


def _package_changes(old: list[dict], new: list[dict]) -> list[str]:
    before = {p["name"]: p for p in old}
    said = []
    for package in new:
        was = before.get(package["name"])
        if was is None:
            said.append(f"it now uses {package['name']} {package['version']}")
        elif (was.get("version"), was.get("build"), was.get("sha256")) != \
                (package.get("version"), package.get("build"), package.get("sha256")):
            said.append(f"its package {package['name']} was rebuilt "
                        f"({_show(was)} -> {_show(package)})")
    gone = sorted(set(before) - {p["name"] for p in new})
    said += [f"it no longer uses {name}" for name in gone]
    return said


def _show(package: dict) -> str:
    build = f" {package['build']}" if package.get("build") else ""
    return f"{package.get('version', '?')}{build}"


def recipe_reason(name: str, reasons: dict) -> str:
    """Why doit would build ``build_recipes:<name>`` again, in a line."""
    changed = reasons.get("changed_file_dep") or []
    files = [Path(f) for f in changed + (reasons.get("added_file_dep") or [])
             + (reasons.get("removed_file_dep") or [])]
    files = [f.name for f in files if "recipes" in f.parts] or [f.name for f in files]
    if files:
        return f"its recipe {name} changed ({', '.join(sorted(set(files)))})"
    if reasons.get("missing_target"):
        return f"its recipe {name} was never built"
    if reasons.get("uptodate_false"):
        return f"its recipe {name} must be built again (its settings, or its package left " \
               f"the channel)"
    return f"its recipe {name} must be built again"


def image_state(settings: Settings, image: Image, stale_recipes: dict[str, str]) -> dict:
    """One image's row: the build users get and whether build_images would build it again."""
    from .current import image_is_current

    record = read_image_record(settings, image.name)
    row = {"name": image.name, "kind": image.kind, "tag": record.get("tag", ""),
           "built_at": record.get("built", ""),
           "packages": [{"name": p["name"], "version": p["version"]}
                        for p in record.get("internal_packages") or []],
           "state": OUT_OF_DATE, "reason": "", "tests": record.get("tests") or {}}
    if image.problem:
        row["reason"] = f"it cannot be built: {image.problem}"
    elif not record.get("tag") and record.get("state") != TESTS_FAILED:
        row["reason"] = "never built"
    elif record.get("state") == TESTS_FAILED:
        failed = record.get("tests_failed") or {}
        row.update(state=TESTS_FAILED, reason=f"its last build ({failed.get('tag', '?')}) "
                                              f"failed its tests: {failed.get('summary', '')}",
                   tests_failed=failed)
    else:
        row["reason"] = _why_out_of_date(settings, image, record, stale_recipes) or ""
        if not row["reason"] and not image_is_current(settings, image):
            where = "registry" if settings.images.push else "engine"
            row["reason"] = f"its tag {record['tag']} is missing from the {where}"
        if not row["reason"]:
            row["state"] = UP_TO_DATE
            _remember_folder(settings, image, record)
    return row


def _why_out_of_date(settings: Settings, image: Image, record: dict,
                     stale_recipes: dict[str, str]) -> str | None:
    from ..channel.source import preflight_channel_url
    from ..recipes.build import package_makers
    from .hashing import image_hash
    from .solve import resolve_internal
    from .task import recipes_needed

    if not settings.channel.url:
        needed = recipes_needed(settings, image, package_makers(settings))
        stale = [stale_recipes[r] for r in needed if r in stale_recipes]
        if stale:
            return "; ".join(stale)
    try:
        resolution = resolve_internal(settings, image, preflight_channel_url(settings),
                                      reuse=True)
    except Exception as exc:  # the build says the same, with its fix
        return f"its internal packages do not resolve: {exc}"
    changes = _package_changes(record.get("internal_packages") or [], resolution.packages)
    if changes:
        return "; ".join(changes)
    if image_hash(settings, image, resolution) == record.get("hash"):
        return None
    known = (read_json(_folders_file(settings), {}) or {}).get(record.get("hash", ""))
    if known and known == tree_digest(image.folder):
        return "a setting that shapes the build changed (images.*, hub.jupyterhub_version)"
    if known:
        return f"its folder images/{image.name} changed"
    return f"its folder images/{image.name} or a setting that shapes the build changed"


def _remember_folder(settings: Settings, image: Image, record: dict) -> None:
    path = _folders_file(settings)
    known = read_json(path, {}) or {}
    if record.get("hash") and record["hash"] not in known:
        known[record["hash"]] = tree_digest(image.folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, known)


class ImagesStatus(DoitCmdBase):
    """A doit command: its graph and database say which recipes would build again."""

    name = "images_status"
    doc_purpose = "print each image's state as JSON (the Images page reads it)"
    doc_usage = ""
    doc_description = None
    cmd_options = ()

    def _execute(self):
        from ..core.workspace import current_settings

        tasks = {task.name: task for task in self.task_list}
        stale = {}
        for name, task in tasks.items():
            if name.startswith("build_recipes:"):
                status = self.dep_manager.get_status(task, tasks, get_log=True)
                if status.status != "up-to-date":
                    recipe = name.split(":", 1)[1]
                    stale[recipe] = recipe_reason(recipe, status.reasons)
        settings = current_settings()
        rows = [image_state(settings, image, stale)
                for image in discover_images(settings.images_dir).values()]
        sys.stdout.flush()
        # the last line: whatever loading the graph printed comes before it
        self.outstream.write("\n" + json.dumps({"images": rows}) + "\n")
        return 0


class _StatusMain(DoitMain):
    DOIT_CMDS = DoitMain.DOIT_CMDS + (ImagesStatus,)


def main(argv: list[str]) -> int:
    if argv != ["--json"]:
        print(__doc__, file=sys.stderr)
        return 2
    # hubworks' own graph, on the workspace this runs in (as `doit -d <workspace>`)
    return _StatusMain().run(["images_status", "-f", str(DODO), "-d", os.getcwd()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
