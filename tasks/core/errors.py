"""One error type that carries its fix, and the glue that shows it the doit way."""

from __future__ import annotations

import functools
from typing import Callable

from doit.exceptions import TaskFailed


class HubworksError(Exception):
    """A problem the user can fix: says what is wrong, with what, and how to fix it."""

    def __init__(self, message: str, *, fix: str = ""):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message


def reports_errors(action: Callable) -> Callable:
    """Turn a HubworksError raised by a doit action into a failure without a traceback."""

    @functools.wraps(action)
    def wrapper(*args, **kwargs):
        try:
            return action(*args, **kwargs)
        except HubworksError as exc:
            return TaskFailed(str(exc))

    return wrapper
