"""Sphinx configuration: MyST markdown and notebooks (myst-nb), autodoc, the furo theme."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Notebooks run at build time, small and on the CPU; set before anything imports jax.
os.environ["BAYESNOISE_SMALL"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

import bayesnoise  # noqa: E402

project = "bayesnoise"
author = "the bayesnoise authors"
copyright = "the bayesnoise authors"
release = version = bayesnoise.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "bn_api",
    "bn_app",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]

# MyST and notebooks: every notebook runs on every build, and a failing cell fails the build.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# autodoc: Google-style docstrings (Args, Returns, Raises, Example), members in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Signatures keep the names the code writes instead of their expansions.
autodoc_type_aliases = {
    "ArrayLike": "jax.typing.ArrayLike",
    "PyTree": "PyTree",
    "Where": "bayesnoise.Where",
    "NoiseSpec": "bayesnoise.noise.NoiseSpec",
}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False
python_maximum_signature_line_length = 90
add_module_names = False

html_theme = "furo"
html_title = f"bayesnoise {release}"
html_static_path: list[str] = []
