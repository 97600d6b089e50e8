"""What every install_hub step shares: the answer of a check, and ensure_* that checks first."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from .layout import HubLayout


@dataclass(frozen=True)
class Check:
    ok: bool
    says: str


def checks_first(check: Callable[[HubLayout], Check]):
    """Make an ensure_* function say "up to date" and do nothing when ``check`` holds."""
    def decorate(ensure: Callable[[HubLayout], str]) -> Callable[[HubLayout], str]:
        @functools.wraps(ensure)
        def checked(hub: HubLayout) -> str:
            state = check(hub)
            return f"up to date: {state.says}" if state.ok else ensure(hub)
        return checked
    return decorate
