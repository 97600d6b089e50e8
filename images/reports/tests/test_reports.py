"""The reports image as its users meet it: the templates are where REPORT_TEMPLATES says, a
report made from the template renders with nbconvert, and the kernel sees the templates.

build_images runs these against each new build before users get it; the fixtures are
hubworks' (docs/image-tests.md).
"""


def test_the_templates_are_where_report_templates_points(run_in_image):
    run = run_in_image('ls "$REPORT_TEMPLATES"')
    assert run.returncode == 0, run
    assert {"analysis.ipynb", "report.ipynb", "report.css"} <= set(run.stdout.split())


def test_a_report_made_from_the_template_renders(run_in_image):
    run = run_in_image("cd /tmp && new-notebook report r.ipynb >/dev/null && "
                       "jupyter nbconvert --to html --execute r.ipynb && "
                       "cat r.html")
    assert run.returncode == 0, run
    assert "Report title" in run.stdout


def test_the_kernel_sees_the_templates(image_server):
    printed = image_server.execute(
        "import os; print(sorted(os.listdir(os.environ['REPORT_TEMPLATES'])))")
    assert "report.ipynb" in printed
