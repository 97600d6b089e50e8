"""Sphinx configuration for hubworks' documentation (MyST Markdown pages).

Build it as CI does, warnings as errors:
``python3 bootstrap.py sphinx-build -W --keep-going -n -b html docs <output folder>``.
"""

project = "hubworks"
author = "hubworks contributors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Links such as [tokens](images.md#tokens-in-image-builds) point at headings by their slug.
myst_heading_anchors = 3
# Text like <prefix>/<image>:<hash> is text, not HTML tags to hide (the settings table has it).
myst_disable_syntax = ["html_inline"]

html_theme = "alabaster"
html_title = "hubworks"
html_show_sourcelink = False
