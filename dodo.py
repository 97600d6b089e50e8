"""hubworks: the doit graph. `doit list` shows the tasks; README.md explains them.

    recipes/ --build_recipes--> channel/ --index_channel--> repodata, shards, index.html
    images/  --build_images--> repo2docker images, the channel served while they build
    install_hub:* / hub_start / hub_stop / hub_status / hub_backup / hub_restore: the hub
    publish_channel, image_matrix, hub_values: beyond one machine (S3, CI runners, Kubernetes)
"""

# ruff: noqa: F401, E402  (doit finds the task creators by name in this module)
from tasks.core.workspace import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading()  # first: Ctrl-C while the rest loads is one line, no traceback
from tasks.channel.task import task_index_channel, task_publish_channel, task_serve_channel
from tasks.core.workspace import doit_config, task_settings
from tasks.hub import (task_hub_backup, task_hub_restore, task_hub_start, task_hub_status,
                       task_hub_stop, task_install_hub, task_install_hub_plan)
from tasks.hub.values import task_hub_values
from tasks.images.registry import task_image_matrix
from tasks.images.task import task_build_images
from tasks.recipes.task import task_build_recipes

DOIT_CONFIG = doit_config()
