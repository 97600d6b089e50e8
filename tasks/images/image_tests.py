"""Image tests: the pytest files in ``images/<name>/tests/``, run by build_images against the
content-hash tag it just built, before that tag becomes ``:latest``, is pushed, recorded or
offered to the hub.

The tests folder is part of the image's hash (changing a test runs the tests again) and is
left out of the staged copy repo2docker builds (so that alone rebuilds no layer). They run
from a copy under the state folder (``.hubworks/images/<name>/tests/``), so that nothing pytest
writes lands in images/, with this package's fixtures (``image_fixtures``, loaded with ``-p``)
and pytest-docker's. Their output goes to the end of the image's build log; the outcome (counts,
each failed test with its output) comes back through a JSON report the plugin writes.

Whatever way the tests end (passed, failed, Ctrl-C), the containers they started are removed
afterwards by label, and so are the containers, networks, volumes and pods of their compose
project.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..core.commands import build_environment, run_logged
from ..core.errors import HubworksError
from ..core.reporter import print_line
from ..core.settings import Settings
from .discovery import Image

TESTS_FOLDER = "tests"
PLUGIN = "tasks.images.image_fixtures"
TEST_LABEL = "org.hubworks.image-test"  # value: the run, on every container the tests start
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"  # docker compose and podman-compose set it
COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
OUTPUT_LINES = 40  # lines of each failed test's output shown in the error
RECORDED_CHARACTERS = 20_000  # of each failed test's output kept in the build record


def tests_folder(image: Image) -> Path | None:
    """``images/<name>/tests/`` when the image has one."""
    folder = image.folder / TESTS_FOLDER
    return folder if folder.is_dir() else None


def compose_project_name(run: str) -> str:
    return f"hubworks-test-{run}"


def container_removal_command(cli: str, names: list[str]) -> list[str]:
    """Remove containers now, running or not (podman would give each 10 s to stop)."""
    podman = Path(cli).name == "podman"
    return [cli, "rm", "--force", *(["--time", "0"] if podman else []), *names]


@dataclass
class TestOutcome:
    """What an image's tests did: counts, and each failed test with its output."""
    exit_status: int
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    # {"test": node id, "when": call, setup, teardown, collect or pytest, "output"}
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # 5: no tests collected, which an empty or helpers-only folder is
        return self.exit_status in (0, 5) and not self.failures

    def summary(self) -> str:
        counts = [f"{n} {word}" for n, word in ((self.failed, "failed"), (self.errors, "errors"),
                                               (self.passed, "passed"),
                                               (self.skipped, "skipped")) if n]
        return ", ".join(counts) or "no tests"

    def as_record(self, log: Path) -> dict:
        return {"summary": self.summary(), "passed": self.passed, "failed": self.failed,
                "errors": self.errors, "skipped": self.skipped, "log": str(log)}


def run_image_tests(settings: Settings, image: Image, tag: str, cli: str, log: Path
                    ) -> TestOutcome | None:
    """Run the image's tests against ``tag`` with the container CLI ``cli``; their output is
    appended to ``log``. None when the image has no tests folder."""
    source = tests_folder(image)
    if source is None:
        return None
    scratch = settings.state("images", image.name)
    copy = scratch / TESTS_FOLDER
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    report = scratch / "tests-report.json"
    report.unlink(missing_ok=True)
    run = uuid.uuid4().hex[:12]
    # the folder's own pytest.ini if it has one; never a pytest configuration around it
    ini = copy / "pytest.ini"
    if not ini.is_file():
        ini = scratch / "pytest.ini"
        ini.write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", "-p", PLUGIN, "-p", "no:cacheprovider",
               "-c", ini, "--rootdir", copy, "--confcutdir", copy, "-v", "-rfE",
               "--image", tag, "--image-name", image.name, "--image-engine", cli,
               "--image-network", settings.images.network, "--image-run", run,
               "--image-report", report, copy]
    print_line(f"   image {image.name}: testing {tag} with images/{image.name}/{TESTS_FOLDER}/")
    env = build_environment(PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_plugin_path(settings)),
                                                      env.get("PYTHONPATH")]))
    try:
        status = run_logged(command, log, append=True, cwd=copy, env=env,
                            title=f"tests of images/{image.name} against {tag}").returncode
    finally:
        remove_test_containers(cli, run)
    return read_outcome(report, status)


def _plugin_path(settings: Settings) -> Path:
    """A folder whose only entry is this package (a link), for PYTHONPATH: the tests import
    the plugin from it, and nothing else that sits beside the package."""
    folder = settings.state("images", ".pytest-path")
    folder.mkdir(parents=True, exist_ok=True)
    link, package = folder / "tasks", Path(__file__).resolve().parents[1]
    if not (link.is_symlink() and link.resolve() == package):
        link.unlink(missing_ok=True)
        link.symlink_to(package, target_is_directory=True)
    return folder


def read_outcome(report: Path, status: int) -> TestOutcome:
    """The outcome the plugin wrote; when pytest ended before writing it, its exit status."""
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return TestOutcome(status, failures=[_ended(status, "before reporting (the log says why)")])
    return TestOutcome(
        status, data.get("passed", 0), data.get("failed", 0), data.get("errors", 0),
        data.get("skipped", 0), data.get("failures") or (
            [] if status in (0, 5) else [_ended(status, "(the log says why)")]))


def recorded_failures(outcome: TestOutcome) -> list[dict[str, str]]:
    """The failed tests for the build record, each output cut to its last characters."""
    return [{**f, "output": f["output"][-RECORDED_CHARACTERS:]} for f in outcome.failures]


def _ended(status: int, why: str) -> dict[str, str]:
    return {"test": "", "when": "pytest", "output": f"pytest exited with status {status} {why}"}


def _engine_lines(cli: str, *args: str) -> list[str]:
    proc = subprocess.run([cli, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    return proc.stdout.split() if proc.returncode == 0 else []


def remove_test_containers(cli: str, run: str) -> None:
    """Remove what the run ``run`` left: its containers, and its compose project's
    containers, pods, networks and volumes."""
    project = compose_project_name(run)
    by_project = f"label={COMPOSE_PROJECT_LABEL}={project}"
    containers = (_engine_lines(cli, "ps", "--all", "--quiet", "--filter",
                                f"label={TEST_LABEL}={run}")
                  + _engine_lines(cli, "ps", "--all", "--quiet", "--filter", by_project))
    if containers:
        subprocess.run(container_removal_command(cli, sorted(set(containers))),
                       capture_output=True, stdin=subprocess.DEVNULL)
    if Path(cli).name == "podman":  # podman-compose puts a project's containers in a pod
        subprocess.run([cli, "pod", "rm", "--force", "--ignore", f"pod_{project}"],
                       capture_output=True, stdin=subprocess.DEVNULL)
    for kind in ("network", "volume"):
        if found := _engine_lines(cli, kind, "ls", "--quiet", "--filter", by_project):
            subprocess.run([cli, kind, "rm", *found], capture_output=True,
                           stdin=subprocess.DEVNULL)


def _indented(text: str, lines: int) -> str:
    kept = text.rstrip().splitlines()
    cut = [f"      ... ({len(kept) - lines} lines above: see the log)"] if len(kept) > lines \
        else []
    return "\n".join(cut + ["      " + line for line in kept[-lines:]])


def failure_title(where: str, failure: dict[str, str]) -> str:
    """``images/<name>/tests/test_x.py::test_y``, with the phase unless the test itself failed."""
    when = failure.get("when", "call")
    if when == "pytest":
        return "pytest"
    what = {"call": "", "collect": " (error collecting)"}.get(when, f" (error in its {when})")
    return f"{where}/{failure['test']}{what}"


def tests_failure(image: Image, tag: str, outcome: TestOutcome, log: Path,
                  previous: str, cli: str) -> HubworksError:
    """The error of an image whose tests failed: the failed tests with their output, what
    users keep meanwhile, the log."""
    where = f"images/{image.name}/{TESTS_FOLDER}"
    failed = "\n".join(f"    FAILED {failure_title(where, f)}\n"
                       f"{_indented(f['output'], OUTPUT_LINES)}" for f in outcome.failures)
    keeps = f"users keep {previous}" if previous else "no earlier build is offered"
    return HubworksError(
        f"image '{image.name}': its tests failed against {tag} ({outcome.summary()}); it is "
        f"not tagged latest, pushed or offered ({keeps}).\n{failed}\n  full log: {log}",
        fix=f"fix the image or its tests in {where}/, then run doit build_images again "
            f"(the built image is kept to look into: {cli} run --rm -it {tag} sh)")
