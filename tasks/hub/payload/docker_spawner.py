"""hubworks' DockerSpawner: users pick an image build_images made, by its folder name.

This module runs inside the hub's venv (JupyterHub and DockerSpawner), not in hubworks:
``doit install_hub`` copies it to ``<prefix>/etc/hubworks_spawner.py`` and the rendered
``jupyterhub_config.py`` imports it from there.

- The picker lists what ``etc/images.json`` offers (written by install_hub's images step, read
  again whenever it changes), labelled with each image's internal packages. The REST API takes
  the same names: ``POST /hub/api/users/<name>/server`` with ``{"image": "<folder name>"}``.
- A server runs as the image's user (never root), with its home folder in the named volume
  ``hubworks-home-<user>``, on the engine's default bridge; it reaches the hub at the bridge's
  gateway address (``hub_address``), and its port is published on the host's loopback only.
- A spawn that fails (no engine, engine refusing, image tag gone, image not offered, server
  exiting or not answering in ``spawn_timeout`` seconds) shows the user what happened, logs one
  ``hubworks:`` line naming the image and the fix for the admin, and leaves no container.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import socket

import docker
from dockerspawner import DockerSpawner
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from traitlets import Int, Unicode, default

ADMIN_FIX_ENGINE = ("start the engine (podman's API service: doit hub_start; Docker: "
                    "systemctl start docker), or correct hub.docker_url, then doit install_hub")
ADMIN_FIX_REBUILD = "run doit build_images, then doit install_hub"
_read_cache: dict[str, tuple[float, dict]] = {}


def read_images(path: str) -> dict:
    """images.json, read again only when the file changed."""
    try:
        stamp = os.stat(path).st_mtime
    except OSError:
        return {"default": "", "offered": [], "left_out": []}
    cached = _read_cache.get(path)
    if cached is None or cached[0] != stamp:
        with open(path) as handle:
            cached = (stamp, json.load(handle))
        _read_cache[path] = cached
    return cached[1]


class SpawnProblem(Exception):
    """A failed spawn: ``jupyterhub_message`` is what the user's page shows."""

    def __init__(self, user_text: str, admin_text: str):
        super().__init__(admin_text)
        self.jupyterhub_message = user_text


def _user_error(status: int, text: str) -> web.HTTPError:
    error = web.HTTPError(status, text)
    error.jupyterhub_message = text
    return error


class HubworksSpawner(DockerSpawner):
    images_file = Unicode(config=True, help="images.json written by install_hub")
    spawn_timeout = Int(60, config=True,
                        help="Seconds a server may take to answer after its container starts")
    home_volume = Unicode("hubworks-home-{username}", config=True,
                          help="Named volume holding a user's home folder")
    hub_label = Unicode("", config=True, help="Value of the org.hubworks.hub container label")

    _events: list

    @default("allowed_images")
    def _offered_tags(self):
        return lambda spawner: {i["name"]: i["tag"] for i in spawner._images()["offered"]}

    @default("options_form")
    def _picker(self):
        return lambda spawner: spawner._render_picker()

    def _images(self) -> dict:
        return read_images(self.images_file)

    def _offered(self, name: str) -> dict | None:
        return next((i for i in self._images()["offered"] if i["name"] == name), None)

    def _render_picker(self) -> str:
        images = self._images()
        if not images["offered"]:
            return ("<p>No image is available yet; your administrator builds them with "
                    "<code>doit build_images</code>.</p>")
        options = "".join(
            f'<option value="{html.escape(i["name"])}"'
            f'{" selected" if i["name"] == images["default"] else ""}>'
            f'{html.escape(i["label"])}</option>' for i in images["offered"])
        return ('<label for="hubworks-image">Image</label>\n'
                '<select class="form-control" name="image" id="hubworks-image" required '
                f'autofocus>{options}</select>\n'
                '<p class="help-block">Each image is an environment your administrator built; '
                'your home folder is the same in all of them.</p>')

    def _admin(self, image: str, tag: str, what: str, fix: str) -> None:
        self.log.error("hubworks: %s's server, image %r (%s): %s; fix: %s",
                       self.user.name, image, tag or "-", what, fix)

    async def check_allowed(self, image):
        offered = self._offered(image)
        if offered:
            return offered["tag"]
        images = self._images()
        left = next((i for i in images["left_out"] if i["name"] == image), None)
        if left:
            self._admin(image, left["tag"], f"asked for an image that is not offered: "
                                            f"{left['reason']}", left["fix"])
            raise _user_error(400, f"The image '{image}' is not offered: {left['reason']}.")
        names = ", ".join(i["name"] for i in images["offered"]) or "none"
        raise _user_error(400, f"There is no image '{image}'. Images offered: {names}.")

    async def progress(self):
        shown = 0
        while True:
            events = getattr(self, "_events", [])
            while shown < len(events):
                yield events[shown]
                shown += 1
            await asyncio.sleep(0.25)

    # The image a server runs, in the spawner's state: the hub keeps state in its database,
    # so after a hub restart hub_status and the Images page still name the image of a
    # server started with the default one (the user's options held no image then).
    STATE_OPTIONS = ("image", "tag")

    def get_state(self):
        state = super().get_state()
        if self.object_id:
            state.update({key: self.user_options[key] for key in self.STATE_OPTIONS
                          if self.user_options.get(key)})
        return state

    def load_state(self, state):
        super().load_state(state)
        kept = {key: state[key] for key in self.STATE_OPTIONS if state.get(key)}
        if kept:
            self.user_options = {**(self.user_options or {}), **kept}

    def _say(self, progress: int, message: str) -> None:
        self._events.append({"progress": progress, "message": message})

    async def start(self):
        self._events = []
        images = self._images()
        name = self.user_options.get("image") or images["default"]
        if not name:
            self._admin("-", "", "no image is offered", ADMIN_FIX_REBUILD)
            raise SpawnProblem("No image is available yet; please ask your administrator.",
                               "no image is offered")
        self.user_options = {**self.user_options, "image": name}
        tag = await self.check_allowed(name)
        # the server model shows it (read:servers): the Images page marks users on older tags
        self.user_options = {**self.user_options, "tag": tag}
        image = self._offered(name)
        self.volumes = {self.home_volume: image["home"]}
        self.notebook_dir = image["home"]
        self.extra_create_kwargs = {
            "user": f"{image['uid']}:{image['gid']}",  # the image's user, never root
            "working_dir": image["home"],
            "labels": {"org.hubworks.hub": self.hub_label, "org.hubworks.image": name},
        }
        # keep an exited container until stop() has read its log (stop() removes it)
        self.extra_host_config = {"auto_remove": False}
        self._say(10, f"Starting your server from image {name} ({tag})")
        try:
            if self.pull_policy == "never":
                await self.docker("inspect_image", tag)
        except docker.errors.NotFound:
            what = f"the image tag {tag} is not in the container engine any more"
            self._admin(name, tag, what, ADMIN_FIX_REBUILD)
            raise SpawnProblem(f"The image '{name}' is missing on this server; your "
                               "administrator has been told.", what) from None
        except Exception as exc:
            raise self._engine_failed(name, tag, exc) from None
        try:
            ip, port = await super().start()
        except Exception as exc:
            raise self._engine_failed(name, tag, exc) from None
        self._say(50, "Waiting for your server to answer")
        await self._wait_until_answering(name, tag, ip, port)
        return ip, port

    def _engine_failed(self, name: str, tag: str, exc: Exception) -> SpawnProblem:
        what = f"the container engine failed: {_describe(exc)}"
        self._admin(name, tag, what, ADMIN_FIX_ENGINE)
        return SpawnProblem("The container engine that runs users' servers is not available; "
                            "your administrator has been told.", what)

    async def _wait_until_answering(self, name: str, tag: str, ip: str, port: int) -> None:
        url = f"http://{ip}:{port}{self.server.base_url}api"
        client = AsyncHTTPClient()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spawn_timeout
        while loop.time() < deadline:
            state = await super().poll()
            if state is not None:
                what = f"the server exited at start ({state}); its last lines: {await self._tail()}"
                await self._remove_exited()
                self._admin(name, tag, what, "make jupyterhub-singleuser start in that image "
                                             "(the lines above say why it did not)")
                raise SpawnProblem(f"Your server (image '{name}') stopped while starting; "
                                   "your administrator has been told.", what)
            try:
                await client.fetch(url, request_timeout=2, raise_error=False)
                return
            except Exception:  # not listening yet
                await asyncio.sleep(0.2)
        what = (f"the server did not answer at {url} within {self.spawn_timeout} s; its last "
                f"lines: {await self._tail()}")
        self._admin(name, tag, what, "look at those lines; if the image is only slow to start, "
                                     "raise hub.spawn_timeout and run doit install_hub")
        raise SpawnProblem(f"Your server (image '{name}') did not start within "
                           f"{self.spawn_timeout} seconds and was stopped; your administrator "
                           "has been told.", what)

    async def _tail(self, lines: int = 8) -> str:
        try:
            raw = await self.docker("logs", self.container_id, tail=lines)
        except Exception as exc:
            return f"(no log: {_describe(exc)})"
        return " | ".join(raw.decode(errors="replace").strip().splitlines()) or "(none)"

    async def poll(self):
        """As DockerSpawner's, and an exited container is removed: JupyterHub stops only
        servers that still run, and the container is kept after exit only for its log."""
        status = await super().poll()
        if status is not None:
            await self._remove_exited()
        return status

    async def _remove_exited(self) -> None:
        if self.object_id and self.remove:
            await self.remove_object()
            self.object_id = ""

    async def stop(self, now=False):
        if not self.object_id:
            # a spawn that failed before its container existed, or one created under our name
            try:
                if await self.get_object() is None:
                    self.clear_state()
                    return
            except Exception as exc:
                self.log.error("hubworks: %s's server: cannot reach the container engine to "
                               "stop it: %s; fix: %s", self.user.name, _describe(exc),
                               ADMIN_FIX_ENGINE)
                raise
        await super().stop(now=now)


def _describe(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    for needle, says in (("No such file", "its socket does not exist"),
                         ("Connection refused", "it refused the connection"),
                         ("Permission denied", "permission denied on its socket")):
        if needle in text:
            return says
    return text[:300] or type(exc).__name__


def _is_local(address: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def hub_address(docker_url: str, images_file: str, network: str = "bridge") -> str:
    """The gateway of the engine's bridge: containers reach the hub there, the LAN does not.

    The hub binds it at start. podman creates its bridge with the first container on it, so
    after a reboot one short container of the default image brings it up.
    """
    client = docker.APIClient(base_url=docker_url, version="auto", timeout=60)
    try:
        gateway = client.inspect_network(network)["IPAM"]["Config"][0]["Gateway"]
    except Exception as exc:
        raise SystemExit(f"hubworks: the container engine at {docker_url} does not tell the "
                         f"{network} network's gateway: {_describe(exc)}; fix: "
                         f"{ADMIN_FIX_ENGINE}") from None
    if _is_local(gateway):
        return gateway
    images = read_images(images_file)
    offered = {i["name"]: i["tag"] for i in images["offered"]}
    tag = offered.get(images["default"]) or next(iter(offered.values()), "")
    try:
        container = client.create_container(
            tag, command=["sh", "-c", "exit 0"],
            host_config=client.create_host_config(network_mode=network))
        client.start(container["Id"])
        client.wait(container["Id"], timeout=60)
        client.remove_container(container["Id"], force=True)
    except Exception as exc:
        raise SystemExit(f"hubworks: could not bring up the {network} network ({gateway}) with "
                         f"a container of {tag or 'an offered image'}: {_describe(exc)}; fix: "
                         f"{ADMIN_FIX_REBUILD}") from None
    if not _is_local(gateway):
        raise SystemExit(f"hubworks: {gateway}, the {network} network's gateway, is not an "
                         f"address of this machine although a container ran on it; fix: "
                         f"check the engine's network set-up (`ip addr`)")
    return gateway
