"""The channel stage's task creators: index_channel, serve_channel, publish_channel.

They read the settings and name their actions; the indexer, the server and the publisher
load when an action or check of theirs runs (``tasks.core.deferred``).
"""

from __future__ import annotations

from ..core.deferred import deferred
from ..core.workspace import current_settings

_INDEX = "tasks.channel.index"


def task_index_channel():
    """Index channel/ as it is (repodata.json, .zst, shards) and write its index.html."""
    settings = current_settings()
    # No task_dep on build_recipes: each recipe build indexes what it publishes, so the
    # index never lags the packages, and a failed recipe never keeps the rest unindexed.
    return {
        "actions": [(deferred(_INDEX, "run_index_channel"), [settings])],
        "uptodate": [(deferred(_INDEX, "channel_is_indexed"), [settings])],
        "verbosity": 2,
        "meta": {"what": "the channel index",
                 "interrupted": "index files are replaced whole: clients see the previous "
                                "index or the new one; the next run indexes again"},
    }


def task_serve_channel():
    """Serve the channel over HTTP until Ctrl-C (prints its URL; access log on stderr)."""
    settings = current_settings()
    return {
        "actions": [(deferred("tasks.channel.server", "serve_until_interrupted"), [settings])],
        "task_dep": ["index_channel"],
        "uptodate": [False],
        "verbosity": 2,
        "meta": {"interrupted": "serving stops this way; the channel is left as it was"},
    }


def task_publish_channel():
    """Copy the packages publish.url lacks there (S3 or a folder) and index it there."""
    settings = current_settings()
    publish = "tasks.channel.publish"
    return {
        "actions": [(deferred(publish, "run_publish_channel"), [settings])],
        "task_dep": ["build_recipes", "index_channel"],  # publishes what the recipes make
        "uptodate": [(deferred(publish, "publish_is_current"), [settings])],
        "verbosity": 2,
    }
