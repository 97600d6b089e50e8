"""The README is the front door: every relative link in it leads to a file of the repository.

Links between the pages of docs/ are checked by the docs build (warnings are errors in CI).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_relative_link_in_the_readme_resolves():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)
                and not t.startswith("#")]
    assert relative, "the README links into docs/"
    missing = [t for t in relative if not (REPO / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
