"""Building one recipe into the channel: scratch space, records, the build, publishing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.commands import failed_build_log, log_path, run_logged
from ..core.errors import HubworksError, reports_errors
from ..core.fsutil import (PACKAGE_SUFFIXES, atomic_write_json, exclusive_lock, is_package,
                           link_or_copy, publish_new_file, read_json, sha256_file)
from ..core.settings import Settings
from .recipe import Recipe, workspace_recipes
_SHELL_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


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


def packages_still_in_channel(settings: Settings, name: str) -> bool:
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
        command = [sys.executable, "-m", "tasks.recipes.rattler_build_runner", str(spec),
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
    from ..channel.index import index_and_report

    index_and_report(settings)


def _build_and_publish(settings: Settings, recipe: Recipe, dependencies: list[str],
                       needs_upstream: bool, scratch: Path) -> list[dict]:
    """Build the recipe, put what it made into the channel, and record it."""
    policy = settings.recipes.republish  # bump or error, checked when the settings loaded
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
