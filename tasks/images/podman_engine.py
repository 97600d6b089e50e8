"""The repo2docker engine ``hubworks-podman``: builds with ``podman build`` (podman 4.x on).

repo2docker's own engine checks ``<cli> buildx version``, which podman 4.x does not have
although it builds fine. This one runs ``podman build`` with the flags podman 4.x accepts,
plus the same ``DockerEngine.extra_buildx_build_args`` option, so ``--network=host``
configured once serves both engines. The entry point names it
``tasks.images.podman_engine:PodmanEngine``.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from contextlib import ExitStack, contextmanager

from repo2docker.docker import DockerEngine
from repo2docker.engine import BuildError, ContainerEngineException, Image, ImageLoadError
from repo2docker.utils import execute_cmd

from .engines import PODMAN_FIX, output_line, podman_problem

# podman's words when the runtime (crun, runc) could not start a RUN step's container
RUNTIME_FAILED = "while running runtime"
# runc 1.1 copies itself into a sealed memfd before it starts a container; on a busy host the
# kernel may refuse the seal with EBUSY while the copy's pages are still pinned. The build's
# step never ran, so building once more is safe (the layers before it are cached).
RUNC_SEAL_RACE = "sealing memfd copy"
CHROOT_HINT = ("podman could not start a container for a RUN step on this host: "
               "build with chroot isolation (hubworks: images.isolation = \"chroot\"; "
               "plain repo2docker: BUILDAH_ISOLATION=chroot)")


class PodmanEngine(DockerEngine):
    """repo2docker engine ``hubworks-podman``: ``podman build`` (podman 4.x and later).

    Builds land in podman's local store, so repo2docker's ``load`` needs no flag; with
    ``push`` the image is pushed after the build. ``cache_from`` is ignored (podman reads
    it as a repository, not an image). Running needs the Docker API, see ``run``.
    """

    def __init__(self, *, parent):
        super().__init__(parent=parent)
        # Fail here: repo2docker reports engine errors raised while it creates the engine.
        self.container_cli  # noqa: B018

    @property
    def container_cli(self):
        # repo2docker's public seam: the property its build, inspect and login call. Its own
        # checks `<cli> buildx version` and caches in a private attribute; podman_problem()
        # is asked once per process, so this needs no cache of its own.
        if problem := podman_problem():
            raise ContainerEngineException(
                f"podman cannot build images here: {problem}. Fix: {PODMAN_FIX}.")
        return "podman"

    def build(self, *, push=False, load=False, buildargs=None, cache_from=None,
              container_limits=None, tag="", custom_context=False, dockerfile="",
              fileobj=None, path="", labels=None, platform=None, **kwargs):
        args = [self.container_cli, "build", "--layers"]
        for key, value in (buildargs or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        if dockerfile:
            args += ["--file", dockerfile]
        if tag:
            args += ["--tag", tag]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        if platform:
            args += ["--platform", platform]
        args += self.extra_buildx_build_args
        if cache_from:
            self.log.warning("hubworks-podman ignores cache_from: podman has no equivalent.\n")
        with ExitStack() as stack:
            if self.registry_credentials:
                stack.enter_context(self.docker_login(**self.registry_credentials))
            command = [*args, stack.enter_context(self._context(fileobj, path))]
            what = f"podman build of {tag}"
            if not (yield from self._stream(command, BuildError, what, may_retry=True)):
                yield from self._stream(command, BuildError, what)
            if push:
                yield from self._stream([self.container_cli, "push", tag], ImageLoadError,
                                        f"podman push of {tag}")

    @contextmanager
    def _context(self, fileobj, path):
        """The build context as a folder: repo2docker hands over a folder or a tar."""
        if not fileobj:
            yield path
            return
        with tempfile.TemporaryDirectory() as folder:
            tarfile.open(fileobj=fileobj).extractall(folder)
            yield folder

    def _stream(self, args, error, what, *, may_retry=False):
        """Output lines of ``args``; a failure is logged (repo2docker shows only the log).

        Returns True when ``args`` succeeded, False when it failed on runc's seal race and
        ``may_retry`` lets the caller run it again; any other failure raises ``error``.
        """
        runtime_failed = seal_race = False
        try:
            for line in execute_cmd(args, capture=True):
                runtime_failed = runtime_failed or RUNTIME_FAILED in line
                seal_race = seal_race or RUNC_SEAL_RACE in line
                yield line
        except subprocess.CalledProcessError as exc:
            message = f"{what} failed with exit code {exc.returncode} (output above)"
            if seal_race and may_retry:
                self.log.warning(f"{message}: runc could not seal its own copy while starting "
                                 "a RUN step (a race on a busy host, not a fault of the "
                                 "build); building once more\n")
                return False
            if runtime_failed:
                message += f"; {CHROOT_HINT}"
            self.log.error(message + "\n")
            raise error(message) from None
        return True

    @contextmanager
    def docker_login(self, username, password, registry):
        """Log in for this build only: a private auth file that podman reads."""
        old = os.environ.get("REGISTRY_AUTH_FILE")
        with tempfile.TemporaryDirectory() as folder:
            os.environ["REGISTRY_AUTH_FILE"] = os.path.join(folder, "auth.json")
            try:
                proc = subprocess.run([self.container_cli, "login", "--username", username,
                                       "--password-stdin", registry],
                                      input=password, capture_output=True, text=True)
                if proc.returncode != 0:
                    message = (f"podman login to {registry} as {username} failed: "
                               f"{output_line(proc.stderr, -1)}")
                    self.log.error(message + "\n")
                    raise ImageLoadError(message)
                self.log.info(proc.stdout)
                yield
            finally:
                if old is None:
                    del os.environ["REGISTRY_AUTH_FILE"]
                else:
                    os.environ["REGISTRY_AUTH_FILE"] = old

    def inspect_image(self, image):
        found = super().inspect_image(image)
        if found is None:
            return None
        # repo2docker expects tags without podman's localhost/ prefix
        return Image(tags=[t.removeprefix("localhost/") for t in found.tags], config=found.config)

    def run(self, image_spec, **kwargs):
        """Run through the Docker API: podman serves it with `podman system service`."""
        if not os.environ.get("DOCKER_HOST"):
            raise NotImplementedError(
                "hubworks-podman runs containers through the Docker API, and DOCKER_HOST is "
                "not set. Build with --no-run, or start `podman system service` and set "
                "DOCKER_HOST to its socket.")
        return super().run(image_spec, **kwargs)
