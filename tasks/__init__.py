"""hubworks: the doit graph that builds the internal channel, the images and the hub.

One module per job; ``dodo.py`` imports the task creators.

- The stages: ``recipes`` (build_recipes, with ``rattler_build_runner``), ``channel_index``
  (index_channel, with ``package_files``), ``server`` (serve_channel, with ``connections``),
  ``images/`` (build_images, one module per step), ``hub/`` (install_hub and the running hub),
  ``publish``, ``registry``, ``hub_values`` (beyond one machine).
- Around them: ``engines`` and ``podman_engine`` (container engines), ``singleuser``,
  ``channel_source`` (which channel builds use).
- Shared by all: ``settings``, ``workspace`` (settings read once, DOIT_CONFIG), ``run_scope``
  (what one run shares, how it ends), ``reporter`` (doit's output), ``commands`` (the one
  command runner), ``errors``, ``fsutil``, ``netaddr``.

Values flow one way: a task creator reads the settings once and passes them to its actions.
"""
