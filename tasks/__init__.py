"""hubworks: the doit graph that builds the internal channel, the images and the hub.

One package per stage, in the order the graph runs them; ``dodo.py`` imports the task
creators, which stay light: each names its actions with ``core.deferred``, so a stage's
heavy modules load when its action runs. A module imports from its own stage and the stages
before it, never after:

- ``core``: what every stage shares: ``settings`` (every setting, declared once),
  ``workspace`` (settings read once, DOIT_CONFIG), ``deferred`` (actions imported when they
  run), ``run_scope`` (what one run shares, how it ends), ``reporter`` (doit's output),
  ``commands`` (the one command runner), ``errors``,
  ``fsutil`` (atomic writes, locks, digests), ``netaddr`` (host and address rules).
- ``channel``: the conda channel: ``task`` (its task creators), ``index`` (index_channel),
  ``package_files``, ``repodata`` (reading repodata records), ``server`` and ``connections``
  (serve_channel), ``publish`` (publish_channel), ``source`` (which channel image builds use).
- ``recipes``: recipes into packages: ``recipe`` (reading, dependency order), ``build``,
  ``rattler_build_runner`` (a build's subprocess), ``task`` (build_recipes).
- ``images``: images from ``images/``: discovery, specs, solving, hashing, the build, the
  container ``engines`` (and the repo2docker ``podman_engine``), ``singleuser`` (can the hub
  start it), ``registry`` (image_matrix).
- ``hub``: install_hub and the running hub: ``plan`` (the steps as doit lists them),
  ``steps`` (one check/ensure pair per state),
  ``render`` (the hub's configuration), ``values`` (hub_values for Kubernetes), ``backup``
  (hub_backup, hub_restore), ``upgrade`` (venvs and proxies beside the ones in use, the way
  back), and ``payload/``, the files copied into the installed hub and run by its own Python.

Values flow one way: a task creator reads the settings once and passes them to its actions.
"""
