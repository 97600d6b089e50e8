"""install_hub: a working JupyterHub on this server, one checked step at a time.

How to use it (as root, on the server)::

    doit install_hub_plan      # which steps are up to date, which would run; changes nothing
    doit install_hub           # run the steps that are not up to date
    doit install_hub:config    # one step (and the steps it needs)
    doit hub_start / hub_stop  # the hub in the background, where systemd does not run
    doit hub_status            # what runs, idle times, the certificate's expiry, the URL
    doit hub_backup            # one archive: database, secrets, config, users' homes
    doit hub_restore --archive PATH   # verify it, then put it all back and start the hub

Each step is a doit subtask ``install_hub:<step>`` whose ``uptodate`` reads the server's
real state (dist-info folders in the venv, the proxy's package.json, the config files
against what the settings make, the database's schema revision, the running hub's pid and
/hub/health), so a step the server already satisfies is skipped and its line says why:
``-- install_hub:python: up to date: Python 3.11.2 at /usr/bin/python3 ...``.

Steps, in order: prefix, python, node, venv, jupyterhub, jupyterlab, dockerspawner, engine,
images, images_page (these four with spawner = docker only), idle_culler (culling on), systemdspawner
(local servers with limits under systemd), certbot (letsencrypt), proxy, secrets, tls (HTTPS
on), config, database, service, tls_renewal (letsencrypt under systemd), health. ``plan.py``
declares them; ``steps.py`` has one ``check_*``/``ensure_*`` pair per step; the settings are the ``[hub]`` section of
``hubworks.toml`` (``doit settings`` lists them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import HubworksError, reports_errors
from ..core.workspace import current_settings
from .checks import Check
from .layout import HubLayout

if TYPE_CHECKING:
    from .plan import Step

# The steps' checks, the service and the status import most of this stage: each task loads
# what it runs when it runs (plan declares the steps lightly), so other commands never pay.

__all__ = ["task_install_hub", "task_install_hub_plan", "task_hub_start", "task_hub_stop",
           "task_hub_status", "task_hub_backup", "task_hub_restore"]


def _wanted_steps(hub: HubLayout) -> list[Step]:
    from .plan import STEPS

    return [step for step in STEPS if _wanted(step, hub)]


def _wanted(step: Step, hub: HubLayout) -> bool:
    try:
        return step.wanted(hub)
    except HubworksError:
        return True  # the step itself reports the broken setting


def _read_check(step: Step, hub: HubLayout) -> Check:
    """The step's check, read-only; a broken setting only means 'run' (the step says why)."""
    try:
        return step.check(hub)
    except (HubworksError, OSError) as exc:
        return Check(False, str(exc).splitlines()[0])


class StepCheck:
    """One install_hub step's doit ``uptodate``, which keeps what it found for the task's
    title: ``install_hub:python: up to date: Python 3.11.2 at /usr/bin/python3 ...``."""

    def __init__(self, step: Step, hub: HubLayout):
        self.step = step
        self.hub = hub
        self.found: Check | None = None

    def holds(self) -> bool:
        self.found = _read_check(self.step, self.hub)
        return self.found.ok

    def title(self, task) -> str:
        if self.found is None:
            return task.name
        return f"{task.name}: {'up to date: ' if self.found.ok else ''}{self.found.says}"


@reports_errors
def _run_step(step: Step, hub: HubLayout) -> None:
    print(f"install_hub:{step.name}: {step.ensure(hub)}")
    # What a step did must be what its check reads, or every re-run would run it again
    # (and the plan would never say "up to date"): a step that cannot establish its own
    # state fails here, naming what is still missing.
    after = _read_check(step, hub)
    if not after.ok:
        raise HubworksError(
            f"install_hub:{step.name} ran, but its check still does not hold: {after.says}.",
            fix=f"read the step's log under {hub.settings.state('logs', 'install_hub')} and "
                f"the hub's {hub.log_file}; fix what they name and run install_hub again "
                f"(install_hub_plan shows each check)")


def task_install_hub():
    """Install JupyterHub on this server; every step checks first and skips what holds."""
    hub = HubLayout(current_settings())
    steps = _wanted_steps(hub)
    names = {step.name for step in steps}
    for step in steps:
        check = StepCheck(step, hub)
        yield {
            "name": step.name,
            "doc": step.doc,
            "actions": [(_run_step, [step, hub])],
            "uptodate": [check.holds],
            "task_dep": [f"install_hub:{dep}" for dep in step.after if dep in names],
            "title": check.title,
            "verbosity": 2,
        }


@reports_errors
def _show_plan(hub: HubLayout) -> None:
    print(f"install_hub plan for {hub.prefix}:")
    for step in _wanted_steps(hub):
        check = _read_check(step, hub)
        mark = "up to date" if check.ok else "would run "
        print(f"  {mark}  {step.name:<13} {check.says}")


def task_install_hub_plan():
    """Show which install_hub steps are up to date and which would run; runs none."""
    return _every_time(_show_plan)


@reports_errors
def _start(hub: HubLayout) -> None:
    from .service import start_hub

    print(start_hub(hub))


@reports_errors
def _stop(hub: HubLayout) -> None:
    from .service import stop_hub

    print(stop_hub(hub, with_engine=True))


def task_hub_start():
    """Start the installed hub (detached, or via its systemd unit); waits for /hub/health."""
    return _every_time(_start)


def task_hub_stop():
    """Stop the hub and its proxy, and the users' servers or podman's API service (SIGTERM)."""
    return _every_time(_stop)


@reports_errors
def _status(hub: HubLayout) -> None:
    from .status import hub_status

    print(hub_status(hub))


def task_hub_status():
    """Show what runs: hub, proxy, services, each user's server (age, idle); the certificate."""
    return _every_time(_status)


@reports_errors
def _backup(hub: HubLayout) -> None:
    from .backup import take_backup  # tarfile and sqlite only when a backup runs

    print(f"wrote {take_backup(hub).says()}")


def task_hub_backup():
    """Write one archive of the hub (database, secrets, config, users' homes) to backup_dir."""
    return _every_time(_backup)


@reports_errors
def _restore(hub: HubLayout, archive: str) -> None:
    from .backup import restore_backup

    if not archive:
        raise HubworksError("hub_restore needs the archive to restore.",
                            fix="doit hub_restore --archive PATH (doit hub_backup prints it)")
    print(restore_backup(hub, archive))


def task_hub_restore():
    """Put back a hub_backup archive (verified first): doit hub_restore --archive PATH."""
    task = _every_time(_restore)
    task["params"] = [{"name": "archive", "long": "archive", "type": str, "default": "",
                       "help": "the archive hub_backup wrote"}]
    return task


def _every_time(action) -> dict:
    """A task that runs ``action`` on this workspace's hub whenever it is asked for."""
    return {"actions": [(action, [HubLayout(current_settings())])], "uptodate": [False],
            "verbosity": 2}
