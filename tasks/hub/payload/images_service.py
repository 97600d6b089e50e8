"""The hub's Images page: each image of the workspace, its state and users; builds, queued.

``doit install_hub`` copies this file under the hub's prefix, where the hub runs it as its
service ``images`` (reached at ``/services/images/``) with the hub venv's Python::

    python hubworks_images_service.py <prefix>/etc/hubworks_images.json

It imports only what the hub's venv has (tornado, jinja2, JupyterHub). What it knows of the
workspace it asks the workspace's own Python: ``python -m tasks.images.status --json`` for each
image's state, ``python -m doit build_images:<name>`` for a build (the command line's graph:
the recipes it needs, the index, the image), ``python -m tasks.hub.offered`` to offer a new
tag to the hub's picker at once. Builds run one at a time; their state and logs are files in
``<state>/images-page/builds/`` so that a restart of the service marks a build it did not see
end as interrupted.

Login is the hub's (OAuth); every user who may reach the service sees the page. A user may
build when the hub gave their token the scope ``custom:images:build`` (a role install_hub
writes for the admins and ``hub.image_builders``), when they are a hub admin, or when they are
in a system group ``hub.image_builders`` names as ``@group`` (PAM hubs). The service's own
token reads users and their servers, and can change nothing in the hub.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import grp
import json
import os
import pwd
import re
import secrets
import signal
import sys
import time
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from jupyterhub._data import DATA_FILES_PATH
from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.ioloop import IOLoop

BUILD_SCOPE = "custom:images:build"
LOG_TAIL = 25  # lines of a failed build's log the page shows
STOP_SECONDS = 8  # a build gets this long to stop at SIGTERM (the hub waits 10 s)
DONE = ("succeeded", "failed", "interrupted")
IMAGE_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def seconds_since(stamp: str) -> float:
    try:
        return max(0.0, time.time() - dt.datetime.fromisoformat(stamp).timestamp())
    except (TypeError, ValueError):
        return 0.0


def write_json(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(temporary, path)


# ---- builds: the queue and each build's state, in files -----------------------------------

class Builds:
    """``<id>.json`` (state, image, who asked, times, exit status, error) and ``<id>.log``."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def all(self) -> list[dict]:
        found = []
        for path in self.folder.glob("*.json"):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda build: build["id"])

    def get(self, build_id: int) -> dict | None:
        try:
            return json.loads((self.folder / f"{build_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def save(self, build: dict) -> None:
        write_json(self.folder / f"{build['id']}.json", build)

    def log(self, build_id: int) -> Path:
        return self.folder / f"{build_id}.log"

    def add(self, image: str, user: str) -> dict:
        build = {"id": max((b["id"] for b in self.all()), default=0) + 1, "image": image,
                 "requested_by": user, "state": "queued", "queued_at": now(),
                 "started_at": "", "ended_at": "", "exit_status": None, "error": ""}
        self.log(build["id"]).write_bytes(b"")
        self.save(build)
        return build

    def queued(self) -> list[dict]:
        return [b for b in self.all() if b["state"] == "queued"]

    def lines(self, build_id: int, offset: int = 0) -> list[str]:
        try:
            text = self.log(build_id).read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[offset:]

    def recover(self) -> None:
        """A build this service did not see end was cut short: stop what is left of it."""
        for build in self.all():
            if build["state"] == "running":
                pid = build.get("pid")
                if pid and _runs_doit(pid):
                    _stop_group(pid)
                self.finish(build, "interrupted", None,
                            "the Images service stopped (hub or service restart) while it "
                            "ran; nothing of it was tagged or offered")

    def finish(self, build: dict, state: str, status: int | None, error: str) -> None:
        build.update(state=state, exit_status=status, error=error, ended_at=now())
        self.save(build)
        with self.log(build["id"]).open("a") as log:
            log.write(f"# {state}" + (f": {error}" if error else "") + "\n")


def _runs_doit(pid: int) -> bool:
    try:
        return b"doit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop_group(pid: int) -> None:
    """SIGTERM the build's session (doit stops repo2docker and tags nothing), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def build_error(lines: list[str]) -> str:
    """What a failed build's output says went wrong: hubworks' error and its fix."""
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].strip().startswith("fix:"):
            start = index
            while start > 0 and lines[start - 1].strip() and not \
                    lines[start - 1].startswith(("FAILED", "#", "ERROR")):
                start -= 1
            return " ".join(line.strip() for line in lines[start:index + 1])[:1000]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return failed[-1][:1000] if failed else "the build failed; its log says why"


# ---- the workspace, through its own Python -------------------------------------------------

class Workspace:
    def __init__(self, conf: dict):
        self.conf = conf
        self.root = conf["workspace"]
        self.env = {"PATH": f"{Path(conf['python']).parent}:{conf['path']}",
                    "PYTHONUNBUFFERED": "1", "HOME": os.environ.get("HOME", "/root"),
                    "LANG": "C.UTF-8", **conf["environment"]}

    def command(self, *args: str) -> list[str]:
        return [self.conf["python"], *args]

    def build_command(self, image: str) -> list[str]:
        return self.command("-m", "doit", "-f", self.conf["dodo"], "-d", self.root,
                            f"build_images:{image}")

    async def run(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *self.command(*args), cwd=self.root, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        return process.returncode, output.decode(errors="replace")

    def image_names(self) -> list[str]:
        folder = Path(self.conf["images_dir"])
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not
                      p.name.startswith("."))


class Status:
    """The workspace's answer to ``tasks.images.status``: asked for each request, and shared
    by the requests that arrived before one asking began (a recipe may change any time)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.rows: list[dict] = []
        self.problem = ""
        self.asked = -1.0
        self.lock = asyncio.Lock()

    async def images(self) -> list[dict]:
        arrived = time.monotonic()
        async with self.lock:
            if self.asked < arrived:
                self.asked = time.monotonic()
                code, output = await self.workspace.run("-m", "tasks.images.status", "--json")
                try:
                    self.rows = json.loads(output.strip().splitlines()[-1])["images"]
                    self.problem = ""
                except (ValueError, IndexError, KeyError):
                    self.problem = (f"the workspace's status could not be read (exit {code}): "
                                    f"{output.strip()[-600:]}")
            return self.rows


class Runner:
    """Runs the queued builds one after the other; output into the build's log as it comes."""

    def __init__(self, workspace: Workspace, builds: Builds, status: Status):
        self.workspace, self.builds, self.status = workspace, builds, status
        self.wake = asyncio.Event()
        self.current: dict | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.stopping = False

    async def loop(self) -> None:
        while not self.stopping:
            queued = self.builds.queued()
            if not queued:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                await self.run(queued[0])
            except Exception as exc:  # one build's trouble never stops the queue
                self.builds.finish(queued[0], "failed", None, f"the service failed: {exc}")
    
    async def run(self, build: dict) -> None:
        self.current = build
        build.update(state="running", started_at=now(), command=self.workspace.build_command(
            build["image"]))
        self.builds.save(build)
        started = time.time()
        with self.builds.log(build["id"]).open("ab") as log:
            log.write(f"# {' '.join(build['command'])}\n".encode())
            self.process = await asyncio.create_subprocess_exec(
                *build["command"], cwd=self.workspace.root, env=self.workspace.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            build["pid"] = self.process.pid
            self.builds.save(build)
            image_log = Path(self.workspace.conf["state_dir"], "logs", "images",
                             f"{build['image']}.log")
            follow = asyncio.ensure_future(self._follow(image_log, started, log))
            async for line in self.process.stdout:
                log.write(line)
                log.flush()
            code = await self.process.wait()
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            self._copy_new(image_log, started, log)
        self.process = None
        if self.stopping:
            return  # stop() marks it interrupted
        if code != 0:
            self.builds.finish(build, "failed", code,
                               build_error(self.builds.lines(build["id"])))
        else:
            await self._offer(build)
        self.current = None

    async def _offer(self, build: dict) -> None:
        """The new tag reaches the hub's picker: install_hub's images step, on its own."""
        code, output = await self.workspace.run("-m", "tasks.hub.offered")
        with self.builds.log(build["id"]).open("a") as log:
            log.write(f"# offered to the hub's picker: {output.strip()}\n")
        if code != 0:
            self.builds.finish(build, "failed", code, "built, but the hub could not offer it: "
                               + build_error(output.splitlines()))
        else:
            self.builds.finish(build, "succeeded", 0, "")

    _read: dict[str, int] = {}

    def _copy_new(self, image_log: Path, started: float, out) -> None:
        """Lines repo2docker wrote to the image's own log since the last look."""
        try:
            stat = image_log.stat()
        except OSError:
            return
        if stat.st_mtime < started - 1:
            return  # the log of an earlier build: this one has not started repo2docker yet
        key = f"{stat.st_ino}"
        done = self._read.get(key, 0)
        if stat.st_size <= done:
            return
        with image_log.open("rb") as handle:
            handle.seek(done)
            data = handle.read()
        whole = data[:data.rfind(b"\n") + 1]
        self._read = {key: done + len(whole)}
        out.write(b"".join(b"  | " + line + b"\n" for line in whole.splitlines()))
        out.flush()

    async def _follow(self, image_log: Path, started: float, out) -> None:
        self._read = {}
        while True:
            self._copy_new(image_log, started, out)
            await asyncio.sleep(0.3)

    def stop(self) -> None:
        """At the service's end: the running build is stopped and marked interrupted."""
        self.stopping = True
        build = self.current
        if build and build.get("pid"):
            _stop_group(build["pid"])
        if build:
            self.builds.finish(build, "interrupted", None,
                               "the Images service stopped (hub or service restart) while it "
                               "ran; nothing of it was tagged or offered")


# ---- who runs what, from the hub's API -----------------------------------------------------

async def users_by_image() -> dict[str, list[dict]]:
    """image name -> [{"user", "tag"}] of every running server, read with the service's
    token (list and read users and servers only)."""
    url = url_path_join(os.environ["JUPYTERHUB_API_URL"], "users") + "?state=active"
    request = HTTPRequest(url, headers={
        "Authorization": f"token {os.environ['JUPYTERHUB_API_TOKEN']}"}, request_timeout=10)
    try:
        response = await AsyncHTTPClient().fetch(request)
        users = json.loads(response.body)
    except Exception:
        return {}
    found: dict[str, list[dict]] = {}
    for user in users:
        for server in (user.get("servers") or {}).values():
            options = server.get("user_options") or {}
            if options.get("image"):
                found.setdefault(options["image"], []).append(
                    {"user": user["name"], "tag": options.get("tag", "")})
    return found


# ---- who may build -----------------------------------------------------------------------

def may_build(conf: dict, user: dict) -> bool:
    if user.get("admin") or BUILD_SCOPE in (user.get("scopes") or []):
        return True
    builders = conf["builders"]
    if user["name"] in builders["users"]:
        return True
    if conf.get("system_groups"):
        try:
            primary = grp.getgrgid(pwd.getpwnam(user["name"]).pw_gid).gr_name
        except KeyError:
            primary = None
        for group in builders["groups"]:
            try:
                if user["name"] in grp.getgrnam(group).gr_mem or group == primary:
                    return True
            except KeyError:
                continue
    return bool(set(builders["groups"]) & set(user.get("groups") or []))


# ---- the page and the API ------------------------------------------------------------------

class Base(HubOAuthenticated, web.RequestHandler):
    @property
    def app(self) -> "ImagesApp":
        return self.settings["images_app"]

    def may_build(self) -> bool:
        return may_build(self.app.conf, self.current_user)

    def check_image(self, name: str) -> None:
        if not IMAGE_NAME.fullmatch(name) or name not in self.app.workspace.image_names():
            raise web.HTTPError(404, f"there is no image {name!r} in images/")

    def write_error(self, status_code: int, **kwargs) -> None:
        reason = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            reason = exc.log_message % exc.args if exc.args else exc.log_message
        if self.request.path.startswith(self.app.prefix + "api/"):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"status": status_code, "message": reason}))
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{status_code}: {reason}\n")


class Api(Base):
    def check_xsrf_cookie(self):
        # A request with a hub API token needs no XSRF token, one with the login cookie does.
        # Tornado checks a POST before anything else: find out who asks first, once. Finding
        # out checks a cookie's XSRF token by calling this again (the user is then being
        # looked up): that call must check, not look the user up again. Looking up again
        # there waits on JupyterHub's lookup thread it runs on: the service hangs, its pages
        # and API time out and a running build's output is no longer read.
        if getattr(self, "_token_authenticated", False):
            return None
        if not hasattr(self, "_cached_hub_user"):
            self.current_user
            if getattr(self, "_token_authenticated", False):
                return None
        return super().check_xsrf_cookie()

    def get_current_user(self):
        user = super().get_current_user()
        if user is None:
            raise web.HTTPError(403, "log in to the hub, or send a hub API token")
        return user

    def write_json(self, value, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))


class ImagesApi(Api):
    async def get(self):
        self.current_user
        self.write_json({"images": await self.app.view(), "queue": self.app.queue_view()})


class BuildApi(Api):
    async def post(self, name: str):
        self.current_user
        self.check_image(name)
        if not self.may_build():
            raise web.HTTPError(403, f"{self.current_user['name']} may not build images")
        build = self.app.request_build(name, self.current_user["name"])
        self.write_json({"id": build["id"], "state": build["state"]}, 202)


class BuildLogApi(Api):
    def get(self, build_id: str):
        self.current_user
        build = self.app.builds.get(int(build_id))
        if build is None:
            raise web.HTTPError(404, f"there is no build {build_id}")
        offset = max(0, int(self.get_argument("offset", "0") or 0))
        lines = self.app.builds.lines(build["id"], offset)
        self.write_json({**{k: v for k, v in build.items() if k != "pid"},
                         "offset": offset, "next_offset": offset + len(lines),
                         "lines": lines, "seconds": self.app.seconds(build)})


class LogDownload(Base):
    @web.authenticated
    def get(self, build_id: str):
        path = self.app.builds.log(int(build_id))
        if not path.is_file():
            raise web.HTTPError(404, f"there is no build {build_id}")
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="build-{build_id}.log"')
        self.finish(path.read_bytes())


def page_templates(folder: Path) -> Environment:
    """This page's templates, over the hub's own (page.html); every value escaped."""
    return Environment(
        loader=ChoiceLoader([FileSystemLoader(str(folder)),
                             FileSystemLoader(os.path.join(DATA_FILES_PATH, "templates"))]),
        autoescape=select_autoescape(default=True, default_for_string=True))


class Page(Base):
    @web.authenticated
    async def get(self):
        user = self.current_user
        images = await self.app.view()
        page = self.app.templates.get_template("images.html").render(page_context(
            os.environ.get("JUPYTERHUB_BASE_URL", "/"), user, _text(self.xsrf_token),
            images=images, queue=self.app.queue_view(), may_build=self.may_build(),
            problem=self.app.status.problem, here=self.app.prefix))
        self.finish(page)


def page_context(hub: str, user: dict, xsrf_token: str, *, images: list[dict], queue: list,
                 may_build: bool, problem: str, here: str) -> dict:
    """What images.html reads: JupyterHub's page.html context, then this page's own."""
    hub_prefix = url_path_join(hub, "hub/")
    return dict(
        static_url=lambda path, include_version=True: url_path_join(hub_prefix, "static", path),
        base_url=hub_prefix, prefix=hub, logo_url="", version_hash="",
        user=PageUser(user), parsed_scopes={"admin-ui"} if user.get("admin") else set(),
        xsrf_token=xsrf_token, login_url=url_path_join(hub_prefix, "login"),
        logout_url=url_path_join(hub_prefix, "logout"), no_spawner_check=True,
        services=[{"name": "images", "href": here}],
        images=images, queue=queue, may_build=may_build, problem=problem, here=here,
        out_of_date=[i["name"] for i in images
                     if i["state"] in ("out of date", "failed", "tests failed")])


class BuildForm(Base):
    """The page's buttons: a form POST, which JupyterHub's XSRF check guards."""

    @web.authenticated
    async def post(self):
        if not self.may_build():
            raise web.HTTPError(403, f"{self.current_user['name']} may not build images")
        names = self.get_body_arguments("image")
        if self.get_body_argument("all", ""):
            names = [i["name"] for i in await self.app.view()
                     if i["state"] in ("out of date", "failed", "tests failed")]
        for name in names:
            self.check_image(name)
        for name in names:
            self.app.request_build(name, self.current_user["name"])
        self.redirect(self.app.prefix)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class PageUser:
    def __init__(self, model: dict):
        self.name = model["name"]
        self.json_escaped_name = json.dumps(model["name"])[1:-1]


class ImagesApp:
    def __init__(self, conf: dict):
        self.conf = conf
        self.prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/images/")
        self.workspace = Workspace(conf)
        self.builds = Builds(Path(conf["state_dir"], "images-page", "builds"))
        self.builds.recover()
        self.status = Status(self.workspace)
        self.runner = Runner(self.workspace, self.builds, self.status)
        self.templates = page_templates(Path(__file__).parent / "hubworks_images_templates")

    def request_build(self, name: str, user: str) -> dict:
        """A build for ``name``, queued; one already queued for it is that build."""
        waiting = next((b for b in self.builds.queued() if b["image"] == name), None)
        build = waiting or self.builds.add(name, user)
        self.runner.wake.set()
        return build

    def seconds(self, build: dict) -> float:
        if build["state"] == "running":
            return seconds_since(build["started_at"])
        if build["started_at"] and build["ended_at"]:
            return seconds_since(build["started_at"]) - seconds_since(build["ended_at"])
        return 0.0

    def queue_view(self) -> list[dict]:
        waiting = [b for b in self.builds.all() if b["state"] in ("queued", "running")]
        return [{"id": b["id"], "image": b["image"], "state": b["state"],
                 "requested_by": b["requested_by"], "place": place,
                 "seconds": round(self.seconds(b))} for place, b in enumerate(waiting)]

    async def view(self) -> list[dict]:
        rows = await self.status.images()
        running = await users_by_image()
        latest: dict[str, dict] = {}
        for build in self.builds.all():
            latest[build["image"]] = build
        queue = {b["image"]: b for b in self.queue_view()}
        shown = []
        for row in rows:
            row = dict(row)
            build = latest.get(row["name"])
            row["build"] = None
            if row["name"] in queue:
                waiting = queue[row["name"]]
                row["state"] = "building" if waiting["state"] == "running" else "queued"
                row["reason"] = (f"building for {waiting['seconds']} s" if waiting["state"] ==
                                 "running" else f"queued, place {waiting['place']} in the queue")
                row["build"] = {"id": waiting["id"], "state": waiting["state"]}
            elif build and build["state"] in ("failed", "interrupted") and \
                    row["state"] != "up to date":
                row["state"] = "failed"
                row["reason"] = f"build {build['id']} {build['state']}: {build['error']}"
                row["build"] = {"id": build["id"], "state": build["state"],
                                "tail": self.builds.lines(build["id"])[-LOG_TAIL:]}
            row["users"] = [{**u, "older": bool(row["tag"]) and u["tag"] != row["tag"]}
                            for u in running.get(row["name"], [])]
            shown.append(row)
        return shown


def make_app(conf: dict) -> tuple[web.Application, ImagesApp]:
    images = ImagesApp(conf)
    prefix = images.prefix
    app = web.Application([
        (prefix, Page),
        (url_path_join(prefix, "build"), BuildForm),
        (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
        (url_path_join(prefix, r"builds/(\d+)\.log"), LogDownload),
        (url_path_join(prefix, "api/images"), ImagesApi),
        (url_path_join(prefix, r"api/images/([^/]+)/build"), BuildApi),
        (url_path_join(prefix, r"api/builds/(\d+)"), BuildLogApi),
    ], images_app=images, cookie_secret=secrets.token_bytes(32), xsrf_cookies=True)
    return app, images


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    conf = json.loads(Path(argv[0]).read_text())
    app, images = make_app(conf)
    app.listen(conf["port"], "127.0.0.1")
    loop = IOLoop.current()

    def stop(signum, frame):
        images.runner.stop()
        loop.add_callback_from_signal(loop.stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    loop.add_callback(images.runner.loop)
    print(f"hubworks-images: serving {images.prefix} on 127.0.0.1:{conf['port']} for the "
          f"workspace {conf['workspace']}", flush=True)
    loop.start()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
