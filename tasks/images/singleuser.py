"""Whether a built image can serve a hub user, and how environment.yml images get what it takes.

A JupyterHub starts a user's server in an image by running ``jupyterhub-singleuser`` in it, as
the image's user, and that server then talks to the hub's API: the JupyterHub in the image must
have the hub's major version. ``probe_image`` runs one short container of the image (its own
entrypoint and user, the engine's default network) and reads what it has; ``verdict`` decides
from those facts alone, so the facts can be cached per built tag (a tag carries the content
hash, its image never changes).

``singleuser_appendix``: repo2docker installs its own pinned ``jupyterhub-singleuser`` in the
images it builds from an ``environment.yml``, whatever the hub runs. Its ``appendix`` (Dockerfile
lines run at the end of the build, as the image's user) installs the hub's release instead, so
users list nothing. Dockerfile images are built as written and must install it themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import HubworksError

PROBE_SECONDS = 120

# Runs in the image under its entrypoint; prints key=value lines. The interpreter that runs
# jupyterhub-singleuser is read from its first line (#!/path/python or #!/usr/bin/env python3).
PROBE_SCRIPT = r"""
echo "uid=$(id -u)"; echo "gid=$(id -g)"; echo "user=$(id -un 2>/dev/null)"; echo "home=$HOME"
singleuser=$(command -v jupyterhub-singleuser) || exit 0
echo "singleuser=$singleuser"
python=""
first=$(head -n 1 "$singleuser")
case "$first" in
  "#!"*) set -- ${first#??}; python=$1; [ "${python##*/}" = env ] && python=$2 ;;
esac
case "${python##*/}" in python*) ;; *) python=$(command -v python3 || command -v python) ;; esac
"$python" -c 'import jupyterhub; print("jupyterhub=" + jupyterhub.__version__)'
"""


@dataclass(frozen=True)
class Verdict:
    offered: bool
    reason: str = ""  # why it is left out
    fix: str = ""


def parse_probe(output: str) -> dict[str, str]:
    facts = {}
    for line in output.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key in ("uid", "gid", "user", "home", "singleuser", "jupyterhub"):
            facts[key] = value.strip()
    return facts


def _major(version: str) -> int | None:
    match = re.match(r"(\d+)\.", version)
    return int(match.group(1)) if match else None


def verdict(facts: dict[str, str], hub_version: str) -> Verdict:
    """Can an image with these facts serve users of a hub running JupyterHub ``hub_version``?"""
    if facts.get("error"):
        return Verdict(False, f"its check container failed: {facts['error']}",
                       "make the image's entrypoint run the command it is given, and give it "
                       "/bin/sh (jupyterhub-singleuser is started the same way)")
    if not facts.get("singleuser"):
        return Verdict(False, "it has no jupyterhub-singleuser",
                       f"install jupyterhub-singleuser {hub_version} in the image (conda: "
                       f"jupyterhub-singleuser={hub_version}; pip: jupyterhub=={hub_version}); "
                       f"build_images adds it to environment.yml images itself")
    have = facts.get("jupyterhub", "")
    if _major(have) is None:
        return Verdict(False, "its jupyterhub-singleuser does not run (the jupyterhub package "
                              "it needs cannot be imported)",
                       f"install jupyterhub {hub_version} next to jupyterhub-singleuser")
    if _major(have) != _major(hub_version):
        return Verdict(False, f"it has JupyterHub {have} and the hub runs {hub_version}; their "
                              f"major versions must match",
                       f"install jupyterhub-singleuser {_major(hub_version)}.* in the image")
    if facts.get("uid") in ("", "0", None):
        return Verdict(False, "it runs as root, and users' servers never do",
                       "end the Dockerfile with USER <a non-root user> (repo2docker images "
                       "already do)")
    return Verdict(True)


def probe_image(client, tag: str, network: str = "bridge") -> dict[str, str]:
    """Run ``PROBE_SCRIPT`` in ``tag`` through a docker-py client; the facts it printed.

    A failure that comes from the image (no shell, an entrypoint that exits) is a fact about
    the image (``error``); one from the engine (no such image, a runtime that cannot start
    containers) raises, since it says nothing about the image.
    """
    import docker

    try:
        container = client.containers.create(tag, ["sh", "-c", PROBE_SCRIPT],
                                             network_mode=network,
                                             labels={"org.hubworks.check": tag})
    except docker.errors.ImageNotFound:
        raise HubworksError(f"the image {tag} is not in the container engine any more.",
                            fix="run doit build_images, then doit install_hub") from None
    try:
        try:
            container.start()
        except docker.errors.APIError as exc:
            text = " ".join(str(exc.explanation or exc).split())
            if re.search(r"executable file not found|no such file or directory", text, re.I):
                return {"error": text[:300]}
            raise HubworksError(
                f"the container engine could not start a container of {tag}: {text[:500]}",
                fix="make the engine run containers (with podman: `podman run --rm <image> "
                    "true` must work; see docs/install-hub.md, where the containers run, on runc "
                    "and default_ulimits), then run doit install_hub again") from None
        try:
            status = container.wait(timeout=PROBE_SECONDS)
        except Exception:
            return {"error": f"the check did not finish within {PROBE_SECONDS} s"}
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass
    facts = parse_probe(output)
    if "uid" not in facts:
        last = " ".join(output.strip().splitlines()[-3:])[:300] or "no output"
        facts["error"] = f"exit {status.get('StatusCode')}: {last}"
    return facts


# ---- environment.yml images --------------------------------------------------------------

def singleuser_spec(hub_version: str) -> str:
    """The conda spec of the singleuser matching the hub: same major and minor release."""
    parts = hub_version.split(".")
    return f"jupyterhub-singleuser={'.'.join(parts[:2])}.*"


def singleuser_appendix(image, hub_version: str) -> str:
    """repo2docker appendix for ``image``: installs the hub's singleuser (environment.yml only)."""
    if image.dockerfile or not image.env_file:
        return ""
    # the same tool and flags repo2docker's own environment steps use, as the image's user
    return (f'RUN ${{MAMBA_EXE}} install -p ${{NB_PYTHON_PREFIX}} -y '
            f'"{singleuser_spec(hub_version)}" && ${{MAMBA_EXE}} clean --all -f -y')
