"""pytest-docker's settings for image tests: the compose file of the image's tests folder, one
project per run, podman-compose under podman and ``docker compose`` under Docker.

``image_fixtures`` registers this module in its pytest_configure, after pytest-docker itself (an
entry-point plugin, loaded after ``-p`` ones), so these fixtures replace pytest-docker's; a
conftest.py in the tests folder can still override any of them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from .image_tests import COMPOSE_FILES


@pytest.fixture(scope="session")
def docker_compose_command(image_under_test) -> str:
    """podman-compose under podman (the one installed next to this Python first), else
    ``docker compose``."""
    if not image_under_test.podman:
        return f"{shlex.quote(image_under_test.engine)} compose"
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("podman-compose", path=path)
    if not found:
        pytest.fail("compose services under podman need podman-compose; install it "
                    "(pip install podman-compose, or apt-get install podman-compose)",
                    pytrace=False)
    return shlex.quote(found)


@pytest.fixture(scope="session")
def docker_compose_file(pytestconfig) -> str:
    """The compose file in the tests folder."""
    folder = Path(str(pytestconfig.rootpath))
    for name in COMPOSE_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    pytest.fail(f"docker_services needs a compose file in the image's tests folder: one "
                f"of {', '.join(COMPOSE_FILES)}", pytrace=False)


@pytest.fixture(scope="session")
def docker_compose_project_name(image_under_test) -> str:
    """One project per run, so that what it leaves is found by its label and removed."""
    return image_under_test.compose_project


@pytest.fixture(scope="session")
def docker_setup(image_under_test) -> list[str]:
    # podman-compose hangs on `up --wait`; docker_services' wait_until_responsive waits
    return ["up --build -d"] if image_under_test.podman else ["up --build --wait"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    # thrown away at once: a service whose PID 1 ignores SIGTERM would hold `down` 10 s
    return ["down -v -t 0"]
