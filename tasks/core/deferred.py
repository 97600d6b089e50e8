"""Actions named by where they live, imported when doit calls them.

doit calls every task creator on every command, so a creator that imported the module its
action runs would make `doit list` pay for the indexer, the server or the hub's steps. A
creator names its action with ``deferred("tasks.channel.index", "run_index_channel")``
instead; the module loads the first time the action (or check) runs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def deferred(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported on its first call.

    The stand-in takes ``*args, **kwargs``: doit passes it the task's own options (``params``)
    by keyword, but never ``task``, ``targets`` or ``values``, which it gives only to
    functions that name them.
    """

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = module
    call.__doc__ = f"{module}.{name}, imported when first called."
    return call
