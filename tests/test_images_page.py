"""The hub's Images page: each image's state and users, builds from the page and its API.

The story: an office's hub (docker spawner, on podman) runs images build_images made. An admin
opens /services/images/ in a real browser, sees each image with its internal packages, changes
a recipe, sees the image out of date because of that recipe, rebuilds it from the page and
watches its log arrive line by line; a user who spawns next gets the new tag. A user who may
not build sees no buttons and gets 403; a build that fails says why and leaves the previous tag
offered; two requests run one after the other; a hub restart during a build marks it
interrupted and tags nothing.

Needs root (useradd, PAM, podman's root-only socket), podman with runc, mmdebstrap, Debian's
chromium and chromium-driver. One hub install for the module; the base image is the session's.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import Workspace
from tests.docker_hubs import (NOTES_TEXT, Browser, DockerSite, add_image, build_and_install,
                               docker_hub, lab_dockerfile)
from tests.test_hub import missing

SCREENSHOT = Path(os.environ.get("HUBWORKS_SCREENSHOTS", tempfile.gettempdir()),
                  "hubworks-images-page.png")


def notes_recipe(ws: Workspace, version: str) -> None:
    ws.add_recipe("site-notes", version=version,
                  script=[f"echo {NOTES_TEXT} > $PREFIX/share/site-notes/notes.txt"])


@pytest.fixture(scope="module")
def images_site(podman_runtime, hub_base_image):
    # the first user is an admin; the second ("view") may see the page, and may build only
    # while in the system group hub.image_builders names
    builders = f"hwbuild{os.getpid() % 100000}"
    subprocess.run(["groupadd", builders], check=True, capture_output=True)
    try:
        with docker_hub(podman_runtime, tag="hwimg", image_prefix="hubworks-pagetest",
                        users=("", "view"), hub=f"""
                            default_image = "lab"
                            cull_idle_minutes = 0
                            image_builders = ["@{builders}"]
                        """) as site:
            site.builders, site.base_image = builders, hub_base_image
            site.viewer = next(name for name in site.passwords if name != site.user)
            notes_recipe(site.ws, "1.0.0")
            add_image(site.ws, "lab", lab_dockerfile(hub_base_image))
            add_image(site.ws, "extra", f"FROM {hub_base_image}\nLABEL edition=one\n")
            build_and_install(site)
            yield site
    finally:
        subprocess.run(["groupdel", builders], capture_output=True)


def logged_in(site: DockerSite, user: str) -> requests.Session:
    """A session of ``user`` on the hub, which the page's OAuth login then lets in."""
    session = requests.Session()
    session.get(f"{site.url}/hub/login", timeout=30).raise_for_status()
    xsrf = next(c.value for c in session.cookies if c.name == "_xsrf")
    response = session.post(f"{site.url}/hub/login?next=", timeout=60, data={
        "username": user, "password": site.passwords[user], "_xsrf": xsrf})
    assert response.ok and "/hub/login" not in response.url, f"login of {user} failed"
    return session


def token_of(site: DockerSite, session: requests.Session, user: str) -> str:
    xsrf = {c.path: c.value for c in session.cookies if c.name == "_xsrf"}.get("/hub/")
    made = session.post(f"{site.url}/hub/api/users/{user}/tokens", json={"note": "page test"},
                        headers={"X-XSRFToken": xsrf}, timeout=30)
    assert made.status_code == 201, made.text
    return made.json()["token"]


class Api:
    """The page's JSON API with a hub API token."""

    def __init__(self, site: DockerSite, token: str):
        self.base = f"{site.url}/services/images/api"
        self.headers = {"Authorization": f"token {token}"}

    def get(self, path: str, **params) -> requests.Response:
        deadline = time.monotonic() + 30
        while True:  # 503 while the hub starts the service again
            response = requests.get(self.base + path, headers=self.headers, params=params,
                                    timeout=60)
            if response.status_code not in (502, 503) or time.monotonic() > deadline:
                return response
            time.sleep(0.5)

    def post(self, path: str) -> requests.Response:
        return requests.post(self.base + path, headers=self.headers, timeout=60)

    def images(self) -> dict[str, dict]:
        response = self.get("/images")
        assert response.status_code == 200, response.text
        return {image["name"]: image for image in response.json()["images"]}

    def build(self, name: str) -> int:
        response = self.post(f"/images/{name}/build")
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait(self, build_id: int, states=("succeeded", "failed", "interrupted"),
             seconds: float = 900) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            build = self.get(f"/builds/{build_id}").json()
            if build["state"] in states:
                return build
            time.sleep(0.5)
        pytest.fail(f"build {build_id} never reached {states}: {build}")


@pytest.fixture(scope="module")
def admin_api(images_site) -> Api:
    site = images_site
    return Api(site, token_of(site, logged_in(site, site.user), site.user))


@pytest.fixture
def chrome():
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        missing("Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def browser_login(driver, site: DockerSite, user: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{site.url}/hub/login")
    driver.find_element(By.ID, "username_input").send_keys(user)
    driver.find_element(By.ID, "password_input").send_keys(site.passwords[user])
    driver.find_element(By.ID, "login_submit").click()
    wait_for(lambda: "/hub/login" not in driver.current_url, "the login")


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = condition()
        except Exception:  # the page is being replaced
            found = None
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(f"{what} did not happen within {seconds} s")


def row(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'tr[data-image="{name}"]')


# ---- the page in a browser ----------------------------------------------------------------

@pytest.mark.slow
def test_an_admin_rebuilds_an_image_whose_recipe_changed_and_users_get_the_new_tag(
        images_site, admin_api, chrome):
    from selenium.webdriver.common.by import By

    site = images_site
    old_tag = next(i["tag"] for i in site.offered()["offered"] if i["name"] == "lab")
    browser_login(chrome, site, site.user)
    chrome.get(f"{site.url}/services/images/")
    lab = wait_for(lambda: row(chrome, "lab"), "the Images page")
    assert chrome.find_element(By.CSS_SELECTOR, "nav.navbar")  # the hub's own page template
    assert lab.get_attribute("data-state") == "up to date", lab.text
    assert "site-notes 1.0.0" in lab.find_element(By.CLASS_NAME, "packages").text
    assert old_tag in lab.text

    notes_recipe(site.ws, "1.1.0")
    chrome.refresh()
    lab = wait_for(lambda: row(chrome, "lab"), "the page again")
    assert lab.get_attribute("data-state") == "out of date"
    assert "its recipe site-notes changed (recipe.yaml)" in \
        lab.find_element(By.CLASS_NAME, "reason").text

    lab.find_element(By.CLASS_NAME, "build-button").click()
    log = wait_for(lambda: chrome.find_element(
        By.CSS_SELECTOR, 'tr[data-image="lab"] pre.build-log'), "the build's log panel")
    wait_for(lambda: "build_recipes:site-notes" in log.text, "the log's first lines", 120)
    build_id = int(log.get_attribute("data-build"))
    assert admin_api.get(f"/builds/{build_id}").json()["state"] == "running", \
        "log lines reach the page while the build runs"

    done = admin_api.wait(build_id)
    assert done["state"] == "succeeded", "\n".join(done["lines"])
    lab = wait_for(lambda: row(chrome, "lab").get_attribute("data-state") == "up to date"
                   and row(chrome, "lab"), "the up-to-date state", 60)
    assert "site-notes 1.1.0" in lab.find_element(By.CLASS_NAME, "packages").text
    chrome.save_screenshot(str(SCREENSHOT))

    new_tag = next(i["tag"] for i in site.offered()["offered"] if i["name"] == "lab")
    assert new_tag != old_tag and new_tag in lab.text
    user = Browser(site)  # no hub restart: the picker offers the new tag at once
    user.pick("lab")
    try:
        assert user.server()["user_options"]["tag"] == new_tag
        users = admin_api.images()["lab"]["users"]
        assert users == [{"user": site.user, "tag": new_tag, "older": False}]
    finally:
        user.stop_server()


# ---- who may do what ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_user_who_may_not_build_sees_the_page_without_buttons_and_gets_403(
        images_site, admin_api):
    site = images_site
    again = site.doit("install_hub")
    assert again.returncode == 0, again.output
    assert re.search(r"^-- install_hub:images_page: up to date", again.output, re.M), \
        again.output
    viewer = logged_in(site, site.viewer)
    home = viewer.get(f"{site.url}/hub/home", timeout=60)
    assert re.search(r'<a class="dropdown-item" href="/services/images/">images</a>',
                     home.text), "the page is in the hub's Services menu"
    page = viewer.get(f"{site.url}/services/images/", timeout=60)
    assert page.status_code == 200 and 'data-image="lab"' in page.text, page.text[-2000:]
    assert "build-button" not in page.text and "build-out-of-date" not in page.text
    refused = Api(site, token_of(site, viewer, site.viewer)).post("/images/lab/build")
    assert refused.status_code == 403, refused.text

    before = len(admin_api.get("/images").json()["queue"])
    admin = logged_in(site, site.user)
    admin.get(f"{site.url}/services/images/", timeout=60).raise_for_status()
    unguarded = admin.post(f"{site.url}/services/images/build", data={"image": "lab"},
                           timeout=60, allow_redirects=False)
    assert unguarded.status_code == 403, "a form POST without the page's XSRF token"
    unknown = admin_api.post("/images/no-such-image/build")
    assert unknown.status_code == 404 and "no-such-image" in unknown.json()["message"]
    assert admin_api.post("/images/..%2Fetc/build").status_code == 404
    assert len(admin_api.get("/images").json()["queue"]) == before == 0


@pytest.mark.slow
def test_a_member_of_the_builders_system_group_gets_the_buttons_while_a_member(images_site):
    """hub.image_builders = ["@group"] on a PAM hub: the system group's members may build,
    read when each request comes, so adding or removing a member needs no restart."""
    site = images_site
    viewer = logged_in(site, site.viewer)

    def buttons() -> bool:
        page = viewer.get(f"{site.url}/services/images/", timeout=60)
        assert page.status_code == 200 and 'data-image="lab"' in page.text, page.text[-2000:]
        return "build-button" in page.text

    assert not buttons()
    subprocess.run(["gpasswd", "--add", site.viewer, site.builders], check=True,
                   capture_output=True)
    try:
        assert buttons(), f"{site.viewer} is in {site.builders} but gets no build buttons"
    finally:
        subprocess.run(["gpasswd", "--delete", site.viewer, site.builders], check=True,
                       capture_output=True)
    assert not buttons()


# ---- the API: a failing build, and a queue ------------------------------------------------

@pytest.mark.slow
def test_a_failing_build_says_why_keeps_the_old_tag_and_builds_queue(images_site, admin_api):
    site = images_site
    offered = {i["name"]: i["tag"] for i in site.offered()["offered"]}
    listed = admin_api.images()
    assert set(listed) == {"lab", "extra"}
    assert {"name", "tag", "built_at", "packages", "state", "reason", "users"} <= \
        set(listed["extra"])

    dockerfile = site.ws.root / "images" / "extra" / "Dockerfile"
    dockerfile.write_text(f"FROM {site.base_image}\nRUN echo 'no licence here' && exit 3\n")
    assert admin_api.images()["extra"]["reason"] == "its folder images/extra changed"
    first, second = admin_api.build("extra"), admin_api.build("lab")
    assert admin_api.get(f"/builds/{second}").json()["state"] == "queued"
    failed, after = admin_api.wait(first), admin_api.wait(second)
    assert failed["state"] == "failed" and failed["exit_status"] != 0
    assert "extra" in failed["error"] and "no licence here" in "\n".join(failed["lines"])
    assert after["state"] == "succeeded" and after["started_at"] >= failed["ended_at"]
    assert {i["name"]: i["tag"] for i in site.offered()["offered"]}["extra"] == offered["extra"]
    extra = admin_api.images()["extra"]
    assert extra["state"] == "failed" and extra["tag"] == offered["extra"]
    tail = admin_api.get(f"/builds/{first}", offset=2).json()
    assert tail["offset"] == 2 and tail["lines"] == failed["lines"][2:]
    download = requests.get(f"{site.url}/services/images/builds/{first}.log",
                            cookies=logged_in(site, site.user).cookies, timeout=60)
    assert download.status_code == 200 and "no licence here" in download.text


@pytest.mark.slow
def test_a_hub_restart_during_a_build_marks_it_interrupted_and_tags_nothing(
        images_site, admin_api):
    site = images_site
    offered = {i["name"]: i["tag"] for i in site.offered()["offered"]}
    dockerfile = site.ws.root / "images" / "extra" / "Dockerfile"
    dockerfile.write_text(f"FROM {site.base_image}\nRUN echo slow-build-begins && sleep 300\n")
    build_id = admin_api.build("extra")
    admin_api.wait(build_id, ("running",))
    deadline = time.monotonic() + 300
    while "slow-build-begins" not in "\n".join(admin_api.get(f"/builds/{build_id}").json()
                                               ["lines"]):
        assert time.monotonic() < deadline, "repo2docker's build never began"
        time.sleep(0.5)
    images_before = site.runtime.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout

    assert site.doit("hub_stop").returncode == 0
    assert site.doit("hub_start").returncode == 0
    build = admin_api.get(f"/builds/{build_id}").json()
    assert build["state"] == "interrupted", build
    assert "restart" in build["error"]
    assert {i["name"]: i["tag"] for i in site.offered()["offered"]} == offered
    tags = site.runtime.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    assert set(tags.split()) <= set(images_before.split()), "nothing new was tagged"
    assert not re.search(r"doit .*build_images:extra", subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True).stdout)

    dockerfile.write_text(f"FROM {site.base_image}\nLABEL edition=three\n")
    again = admin_api.wait(admin_api.build("extra"))
    assert again["state"] == "succeeded", "\n".join(again["lines"])
    assert {i["name"]: i["tag"] for i in site.offered()["offered"]}["extra"] != offered["extra"]


def test_the_page_shows_failing_image_tests_with_their_output_escaped():
    """What the page renders for an image whose tests failed (no hub needed: the template
    with JupyterHub's own page.html, as the service renders it)."""
    import sys

    payload = Path(__file__).resolve().parents[1] / "tasks" / "hub" / "payload"
    sys.path.insert(0, str(payload))
    try:
        import images_service
    finally:
        sys.path.remove(str(payload))
    failure = {"test": "images/reports/tests/test_office.py::test_templates",
               "when": "call", "output": "AssertionError: <script>alert(1)</script> missing"}
    row = {"name": "reports", "kind": "Dockerfile", "tag": "hubworks/reports:abc",
           "built_at": "2026-01-01", "packages": [], "state": "tests failed",
           "reason": "its last build (hubworks/reports:def) failed its tests: 1 failed",
           "users": [], "tests_failed": {"failures": [failure]}}
    html = images_service.page_templates(payload / "images_templates").get_template(
        "images.html").render(images_service.page_context(
            "/", {"name": "alice", "admin": True}, "token", images=[row], queue=[],
            may_build=True, problem="", here="/services/images/"))
    assert "tests failed" in html and "images/reports/tests/test_office.py::test_templates" in html
    assert "AssertionError: &lt;script&gt;alert(1)&lt;/script&gt; missing" in html
    assert "<script>alert(1)</script>" not in html
