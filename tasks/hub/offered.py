"""The images the hub offers: what build_images recorded, checked once per tag.

The ``images`` step of install_hub reads the build records (``<state>/images/<name>.json``),
runs the singleuser check (``tasks.singleuser``) once for each tag it has not checked yet
(facts cached in ``<state>/hub/image-checks.json``, by tag and build time), and writes
``<prefix>/etc/images.json``: the offered images (folder name, tag, label, packages, the user
and home the server runs with), the default, and the images left out with the reason. The
hub's spawner reads that file at every spawn, so a re-run after a new build changes what users
can pick without restarting the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import HubworksError
from ..core.fsutil import atomic_write_bytes, atomic_write_json, read_json
from ..images.records import image_records_dir
from ..images.singleuser import probe_image, verdict
from .containers import docker_api, docker_client
from .layout import HubLayout


def checks_file(hub: HubLayout) -> Path:
    return hub.settings.state("hub", "image-checks.json")


def built_records(hub: HubLayout) -> list[dict]:
    """Build records with a tag, by image name."""
    folder = image_records_dir(hub.settings)
    if not folder.is_dir():
        return []
    records = (read_json(path, {}) or {} for path in sorted(folder.glob("*.json")))
    return [r for r in records if r.get("tag") and r.get("name")]


def cached_facts(hub: HubLayout, record: dict, cache: dict | None = None) -> dict | None:
    cache = read_json(checks_file(hub), {}) if cache is None else cache
    entry = (cache or {}).get(record["tag"])
    if entry and entry.get("built") == record.get("built"):
        return entry["facts"]
    return None


def unchecked(hub: HubLayout, records: list[dict]) -> list[dict]:
    cache = read_json(checks_file(hub), {}) or {}
    return [r for r in records if cached_facts(hub, r, cache) is None]


def package_list(record: dict) -> list[str]:
    return [f"{p['name']} {p['version']}" for p in record.get("internal_packages") or []]


def label(record: dict) -> str:
    packages = package_list(record)
    held = f"internal packages: {', '.join(packages)}" if packages else "no internal packages"
    return f"{record['name']} ({held})"


def offer(hub: HubLayout, records: list[dict]) -> dict:
    """The content of images.json from records whose facts are all cached."""
    cache = read_json(checks_file(hub), {}) or {}
    hub_version = hub.hub_settings.jupyterhub_version
    offered, left_out = [], []
    for record in records:
        if not (hub.settings.images_dir / record["name"]).is_dir():
            left_out.append({"name": record["name"], "tag": record["tag"],
                             "reason": f"its folder images/{record['name']} was removed",
                             "fix": "bring the folder back and run doit build_images"})
            continue
        facts = cached_facts(hub, record, cache) or {}
        judged = verdict(facts, hub_version)
        if not judged.offered:
            left_out.append({"name": record["name"], "tag": record["tag"],
                             "reason": judged.reason, "fix": judged.fix})
            continue
        offered.append({
            "name": record["name"], "tag": record["tag"], "label": label(record),
            "packages": package_list(record), "jupyterhub": facts["jupyterhub"],
            "uid": int(facts["uid"]), "gid": int(facts.get("gid") or facts["uid"]),
            "home": facts.get("home") or "/home/" + (facts.get("user") or "jovyan"),
        })
    names = [image["name"] for image in offered]
    wanted = hub.hub_settings.default_image
    default = wanted if wanted in names else (names[0] if names else "")
    return {"default": default, "offered": offered, "left_out": left_out}


def render_images_file(content: dict) -> str:
    return json.dumps(content, indent=1, sort_keys=True) + "\n"


def describe(content: dict, wanted_default: str = "") -> str:
    lines = [f"offers {len(content['offered'])} image(s): "
             + (", ".join(image["label"] for image in content["offered"]) or "none")
             + (f"; preselected: {content['default']}" if content["default"] else "")]
    if wanted_default and wanted_default != content["default"]:
        lines.append(f"  hub.default_image is {wanted_default!r}, which is not offered; "
                     f"{content['default']!r} is preselected instead")
    for image in content["left_out"]:
        lines.append(f"  left out: {image['name']} ({image['tag']}): {image['reason']}; "
                     f"fix: {image['fix']}")
    return "\n".join(lines)


def check_images_file(hub: HubLayout):
    """(holds, says) for the images step; reads files only."""
    records = built_records(hub)
    if not records:
        return False, "build_images has recorded no image yet"
    waiting = unchecked(hub, records)
    if waiting:
        return False, (f"not checked yet: {', '.join(r['name'] + ' ' + r['tag'] for r in waiting)}")
    content = offer(hub, records)
    try:
        current = hub.images_file.read_text() == render_images_file(content)
    except OSError:
        current = False
    if not current:
        return False, f"{hub.images_file} differs from the built images"
    left = ", ".join(image["name"] for image in content["left_out"])
    return True, describe(content).splitlines()[0] + (f"; left out: {left}" if left else "")


def write_images_file(hub: HubLayout) -> str:
    """Check the tags not checked yet, write images.json, say what is offered and left out."""
    records = built_records(hub)
    if not records:
        raise HubworksError(
            "hub.spawner is docker, and build_images has built no image to offer yet.",
            fix="run doit build_images in this workspace first, then doit install_hub")
    checked = _check_new_tags(hub, unchecked(hub, records))
    content = offer(hub, records)
    wanted = hub.hub_settings.default_image
    _require_offerable(content, records, wanted)
    atomic_write_bytes(hub.images_file, render_images_file(content).encode(), 0o644)
    said = f"checked {', '.join(checked)}; " if checked else ""
    return said + describe(content, wanted)


def _check_new_tags(hub: HubLayout, waiting: list[dict]) -> list[str]:
    """Run the singleuser check on each image not checked yet; their names."""
    if not waiting:
        return []
    client = docker_client(docker_api(hub).url, timeout=180)
    cache = read_json(checks_file(hub), {}) or {}
    checked = []
    for record in waiting:
        cache[record["tag"]] = {"built": record.get("built"),
                                "facts": probe_image(client, record["tag"])}
        checked.append(record["name"])
        checks_file(hub).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(checks_file(hub), cache)
    return checked


def _require_offerable(content: dict, records: list[dict], wanted: str) -> None:
    """hub.default_image names a built image, and at least one image can serve users."""
    if wanted and wanted not in {r["name"] for r in records}:
        raise HubworksError(
            f"hub.default_image is {wanted!r}, and build_images has built no image of that "
            f"name (built: {', '.join(r['name'] for r in records)}).",
            fix="set hub.default_image (HUBWORKS_HUB_DEFAULT_IMAGE) to a folder name in "
                "images/, or leave it empty")
    if not content["offered"]:
        reasons = "; ".join(f"{i['name']}: {i['reason']}" for i in content["left_out"])
        raise HubworksError(f"no built image can serve users ({reasons}).",
                            fix="; ".join(dict.fromkeys(i["fix"] for i in content["left_out"])))


def main() -> int:
    """``python -m tasks.hub.offered``: the images step of install_hub on its own, for the
    workspace in the current folder (the Images page runs it after each build)."""
    import sys

    from ..core.workspace import current_settings

    try:
        print(write_images_file(HubLayout(current_settings())))
    except HubworksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
