"""Sphinx configuration for zeo-ng's documentation (built with -W in the tests and CI)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

project = "zeo-ng"
author = "the zeo-ng authors"
copyright = "the zeo-ng authors"
release = "0.1"

extensions = ["zeoconfig", "sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
highlight_language = "none"
# Every cross-reference must resolve (the tests build with -n -W).  The standard library and
# ZODB have no inventory here (no network): their names are written as literals.
nitpicky = True
autodoc_typehints = "none"  # the docstrings say what each parameter takes
autodoc_member_order = "bysource"
