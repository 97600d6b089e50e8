"""The Images page's files: the service the hub runs (``payload/images_service.py``), its
template, and ``etc/hubworks_images.json``, what it needs to know of the workspace.

The workspace is the one install_hub runs from, or ``hub.workspace``; the service runs its
builds and status with the Python install_hub runs with (hubworks' own venv) and hubworks'
``dodo.py``, as ``doit -d <workspace>`` does. The environment it gives them: podman's
configuration variables install_hub saw, and ``HUBWORKS_HUB_PREFIX``, so that offering a new
tag writes this hub's ``images.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.settings import load_settings
from .containers import podman_environment
from .layout import HubLayout
from .render import SAFE_PATH

PAYLOAD = Path(__file__).parent / "payload"
SERVICE_SOURCE = PAYLOAD / "images_service.py"
TEMPLATES = PAYLOAD / "images_templates"
DODO = Path(__file__).resolve().parents[2] / "dodo.py"


def workspace_root(hub: HubLayout) -> Path:
    return Path(hub.hub_settings.workspace or hub.settings.root).resolve()


def service_conf(hub: HubLayout) -> dict:
    root = workspace_root(hub)
    settings = hub.settings if root == Path(hub.settings.root).resolve() else \
        load_settings(root)
    builders = hub.hub_settings.image_builders
    return {
        "workspace": str(root), "python": sys.executable, "dodo": str(DODO),
        "state_dir": str(settings.state_dir), "images_dir": str(settings.images_dir),
        "port": hub.hub_settings.images_port, "path": SAFE_PATH,
        "environment": {**podman_environment(), "HUBWORKS_HUB_PREFIX": str(hub.prefix)},
        "builders": {"users": sorted({b for b in builders if not b.startswith("@")}),
                     "groups": sorted({b[1:] for b in builders if b.startswith("@")})},
        "system_groups": hub.choice("authenticator") == "pam",
    }


def images_page_files(hub: HubLayout) -> dict[Path, str]:
    files = {hub.images_service_script: SERVICE_SOURCE.read_text(),
             hub.images_service_conf: json.dumps(service_conf(hub), indent=1) + "\n"}
    for template in sorted(TEMPLATES.glob("*.html")):
        files[hub.images_service_templates / template.name] = template.read_text()
    return files


def check_images_page(hub: HubLayout) -> tuple[bool, str]:
    for path, text in images_page_files(hub).items():
        try:
            if path.read_text() != text:
                return False, f"{path} differs from the settings"
        except OSError:
            return False, f"{path} does not exist yet"
    return True, (f"the Images page (/services/images/) builds the images of "
                  f"{workspace_root(hub)}")


def write_images_page(hub: HubLayout) -> str:
    from ..core.fsutil import atomic_write_bytes

    for path, text in images_page_files(hub).items():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode(), 0o644)
    return (f"wrote {hub.images_service_script.name} and {hub.images_service_conf}: the Images "
            f"page builds the images of {workspace_root(hub)}")
