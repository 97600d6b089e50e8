"""install_hub's step runner: a step that ran must leave its own check holding."""

from __future__ import annotations

from doit.exceptions import TaskFailed

from tasks.hub import _run_step
from tasks.hub.checks import Check
from tasks.hub.plan import STEPS, Step
from tests.test_hub import hub_in


def test_a_step_whose_check_still_fails_after_it_ran_fails_naming_what_is_missing(
        tmp_path, capsys):
    hub = hub_in(tmp_path)
    marker = tmp_path / "made"

    def made(hub) -> Check:
        return Check(marker.exists(), f"{marker} exists" if marker.exists() else
                     f"{marker} is missing")

    def forgets_to_make(hub) -> str:
        return "did something else"

    failed = _run_step(Step("example", "An example.", made, forgets_to_make), hub)
    assert isinstance(failed, TaskFailed)
    assert f"install_hub:example ran, but its check still does not hold: {marker} is " \
           f"missing" in str(failed)
    assert "install_hub_plan shows each check" in str(failed)

    def makes(hub) -> str:
        marker.touch()
        return f"made {marker}"

    assert _run_step(Step("example", "An example.", made, makes), hub) is None
    assert f"install_hub:example: made {marker}" in capsys.readouterr().out


def test_every_step_has_a_check_and_an_ensure_and_known_predecessors():
    names = [step.name for step in STEPS]
    assert len(names) == len(set(names))
    for index, step in enumerate(STEPS):
        assert callable(step.check) and callable(step.ensure) and step.doc.strip()
        # a step runs after the steps it names, which come before it in the list
        assert set(step.after) <= set(names[:index]), step.name
