"""Repodata read one way: both record sections, the channel's package names, stage order."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from tasks.channel.publish import local_packages
from tasks.channel.source import channel_package_names
from tasks.core.settings import load_settings

STAGES = ("core", "channel", "recipes", "images", "hub")  # the order the graph runs them in
TASKS = Path(__file__).resolve().parents[1] / "tasks"


def test_names_and_local_packages_come_from_both_sections_and_follow_each_index(workspace):
    ws = workspace
    ws.add_recipe("modern")  # .conda: "packages.conda"
    ws.doit("build_recipes")
    ws.configure('[recipes]\npackage_format = "tar.bz2"\n')
    ws.add_recipe("classic")  # .tar.bz2: "packages"
    ws.doit("build_recipes")
    settings = load_settings(ws.root)
    assert channel_package_names(settings) == {"modern", "classic"}

    noarch = ws.channel / "noarch"
    files = sorted(p.name for p in noarch.iterdir() if p.name.endswith((".conda", ".tar.bz2")))
    local = local_packages(ws.channel)
    assert sorted(local) == [f"noarch/{name}" for name in files]
    for package in local.values():
        assert package.sha256 == hashlib.sha256(package.path.read_bytes()).hexdigest()
        assert package.size == package.path.stat().st_size

    # A new index replaces the repodata: the names read again, not the ones remembered.
    ws.add_recipe("later")
    ws.doit("build_recipes")
    assert channel_package_names(settings) == {"modern", "classic", "later"}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (at the top or inside a function), absolute."""
    package = ["tasks", *path.relative_to(TASKS).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join(base + (node.module or "").split("."))))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def test_a_stage_imports_only_from_itself_and_the_stages_before_it():
    upward = []
    for path in sorted(TASKS.rglob("*.py")):
        stage = path.relative_to(TASKS).parts[0]
        if stage not in STAGES:
            continue
        for line, module in _imported_modules(path):
            parts = module.strip(".").split(".")
            if parts[0] == "tasks" and len(parts) > 1 and parts[1] in STAGES \
                    and STAGES.index(parts[1]) > STAGES.index(stage):
                upward.append(f"{path.relative_to(TASKS.parent)}:{line} imports {module}")
    assert upward == []
