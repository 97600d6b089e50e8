"""The analysis image as its users meet it: JupyterLab reads the office's settings, new-notebook
offers the templates, and the analysis template runs in the image's kernel.

build_images runs these against each new build before users get it; the fixtures are
hubworks' (docs/image-tests.md).
"""

import json


def test_jupyterlab_reads_the_office_settings(run_in_image):
    # where JupyterLab looks, asked of JupyterLab itself: a package that installs its file
    # anywhere else changes nothing for users
    run = run_in_image('app=$(jupyter lab path | sed -n "s/^Application directory: *//p") && '
                       'cat "$app/settings/overrides.json"')
    assert run.returncode == 0, run
    settings = json.loads(run.stdout)
    assert "@jupyterlab/apputils-extension:themes" in settings


def test_new_notebook_offers_the_templates(run_in_image):
    run = run_in_image(["new-notebook", "list"])
    assert run.returncode == 0, run
    assert {"analysis", "report"} <= set(run.stdout.split())


def test_the_analysis_template_runs_in_the_kernel(run_in_image, image_server):
    # made the way users make one, then run cell by cell in the kernel users get
    made = run_in_image("cd /tmp && new-notebook analysis a.ipynb >/dev/null && cat a.ipynb")
    assert made.returncode == 0, made
    with image_server.kernel() as kernel:
        kernel.run_notebook(json.loads(made.stdout))
        # the template imports pandas as pd; the next cell a user writes relies on it
        assert kernel.execute("print(pd.DataFrame({'x': [1, 2, 3]}).x.sum())").strip() == "6"
