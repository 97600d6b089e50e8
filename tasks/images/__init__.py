"""build_images: repo2docker images from images/* against the served internal channel.

Each folder of images/ is a repo2docker repository; ``build_images:<name>`` builds one.
For every image that is out of date:

1. the channel server starts (once per doit run, shared by all image builds, stopped when
   the run ends: see ``run_scope.RUN``);
2. preflight: the image's internal packages are resolved against the served channel with
   rattler's solver, so a missing package or version fails in seconds, by name;
3. a staged copy of the folder is made in which the channel alias (``internal``) in every
   environment.yml is replaced by the channel URL for builds; ``images/`` itself is never
   modified;
4. repo2docker builds it (Docker with buildx, or podman), with ``CHANNEL_URL`` as a build
   argument for Dockerfile images and the host network so a loopback channel is reachable;
5. the image is tagged ``<prefix>/<name>:<hash>``, and its tests (``images/<name>/tests/``,
   when it has them) run against that tag;
6. only when they pass is it tagged ``:latest``, pushed if asked, and recorded (which is what
   the hub offers); when they fail the record says so and users keep the previous build.

Tokens: on the host network (the default) builds reach the server on loopback and carry no
token (the build server lets this machine in without one). A token reaches a build only
for a remote engine or another network (``channel.public_url``): then it is the server's
per-run token, dead when the run ends; the fixed ``channel.token`` never does. Build logs
have every token replaced by ``<token>``.

The hash covers the image folder and the exact internal packages it resolves to, so a
rebuilt internal package rebuilds exactly the images that use it, and repo2docker's reuse
of an existing tag can never serve a stale image. An image is up to date when its hash is
unchanged and the engine still has it.

One module per job; callers import from them (this package itself imports nothing, so the
hub can read build records without loading YAML, rattler or repo2docker):

- ``discovery``: what an image folder holds (``Image``), the folders of images/;
- ``specs``: the internal package specs an image names (environment.yml, Dockerfile);
- ``solve``: resolving those specs against the channel (preflight), with a kept solve;
- ``hashing``: the content hash of an image and the tags named by it;
- ``records``: what a build records under the state folder;
- ``current``: the up-to-date rule (same hash, and the engine or registry has the tag);
- ``staging``: the staged copy of an image folder, with the channel URL in place of the alias;
- ``repo2docker_cli``: the repo2docker command line, its config file and environment;
- ``diagnosis``: what a failed build's log says a user can act on;
- ``build``: one image build, as its steps;
- ``image_tests``: running an image's tests after its build, and removing what they started;
  ``image_fixtures`` and ``compose_fixtures``, the pytest plugin that gives them fixtures;
- ``task``: the doit task creator ``task_build_images``;
- ``engines``: the container engines (Docker, podman) behind one interface, and
  ``podman_engine``, the repo2docker engine registered for podman 4.x;
- ``singleuser``: whether the hub can start a user's server in an image;
- ``registry``: the registry as the judge of up to date on a fresh runner (image_matrix).
"""
