"""API pages generated from the modules' ``__all__``.

``.. bn-api:: GROUP`` (inside an ``{eval-rst}`` block) writes one section per module of the
group: the module's docstring, a summary table and an autodoc entry per public name, so every
public name gets an anchor with its full dotted name (``id="bayesnoise.gsm.hierarchy"``). The
groups are listed once, in :data:`GROUPS`; a public name or a core module that no group covers
is a build warning, so with ``-W`` a new public name cannot be left out of the reference.
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
import tokenize

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

# The learned noise (variational dropout) spans several modules; its names get their own page
# and are left out of their modules' pages.
LEARNED = {
    "bayesnoise.nn": [
        "learned_noise",
        "add_learned_noise",
        "learned_layers",
        "LearnedNoise",
        "LearnedLayer",
    ],
    "bayesnoise.penalties": ["kl_log_uniform", "learned_noise_kl"],
    "bayesnoise.prune": ["log_alpha", "learned_moments", "log_alpha_threshold"],
    "bayesnoise.train": ["variational_loss"],
    "bayesnoise.inference": ["sampler", "nnx_sampler", "mean_params"],
}

# slug: (title, modules whose public names the page documents, explicit names or None for
# the module's ``__all__`` less the names claimed by LEARNED).
GROUPS: dict[str, tuple[str, list[tuple[str, list[str] | None]]]] = {
    "noise": ("Noise distributions", [("bayesnoise.noise", None)]),
    "gsm": ("GSM hierarchy", [("bayesnoise.gsm", None)]),
    "penalties": ("Penalties", [("bayesnoise.penalties", None)]),
    "moments": ("Moments", [("bayesnoise.moments", None)]),
    "sampling": ("SGLD and sampling", [("bayesnoise.sgld", None), ("bayesnoise.sampling", None)]),
    "laplace": ("Laplace", [("bayesnoise.laplace", None)]),
    "em": ("EM", [("bayesnoise.em", None)]),
    "learned": ("Learned noise", list(LEARNED.items())),
    "prune": ("Pruning", [("bayesnoise.prune", None)]),
    "inference": ("Inference rules", [("bayesnoise.inference", None)]),
    "nn": ("Flax integration", [("bayesnoise.nn", None)]),
    "train": ("Training", [("bayesnoise.train", None), ("bayesnoise.distill", None)]),
    "data": ("Data and files", [("bayesnoise.data", None), ("bayesnoise.io", None)]),
    "pipeline": (
        "Pipeline and config",
        [("bayesnoise.pipeline", None), ("bayesnoise.pipeline.config", None)],
    ),
    "cli": ("Command line", [("bayesnoise.pipeline.cli", None)]),
}


def public_names(module: str) -> list[str]:
    """The module's ``__all__`` (submodules left out), or its public functions without one."""
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [
            n
            for n, o in vars(mod).items()
            if not n.startswith("_") and inspect.isfunction(o) and o.__module__ == module
        ]
    return [n for n in names if not inspect.ismodule(getattr(mod, n))]


def group_names(slug: str) -> list[tuple[str, list[str]]]:
    """(module, names) of a group's page, in the order of ``__all__``."""
    claimed = {(m, n) for m, names in LEARNED.items() for n in names}
    out = []
    for module, names in GROUPS[slug][1]:
        if names is None:
            names = [n for n in public_names(module) if (module, n) not in claimed]
        out.append((module, names))
    return out


def _directive(module: str, name: str) -> str:
    obj = getattr(importlib.import_module(module), name)
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return "autoexception"
    if inspect.isclass(obj):
        return "autoclass"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "autofunction"
    return "autodata"


class ApiGroup(SphinxDirective):
    """``.. bn-api:: GROUP``: the reference of a group, a section per module."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        slug = self.arguments[0]
        if slug not in GROUPS:
            raise self.error(f"unknown API group {slug!r}; known: {', '.join(GROUPS)}")
        _used(self.env)[slug] = self.env.docname
        sections = group_names(slug)
        explicit = GROUPS[slug][1][0][1] is not None
        lines: list[str] = []
        for module, names in sections:
            if explicit:  # names from modules documented on other pages: no module docstring
                title = f"From ``{module}``"
                lines += [title, "-" * len(title), "", f".. currentmodule:: {module}", ""]
            else:
                lines += [f"``{module}``", "-" * (len(module) + 4), ""]
                lines += [f".. automodule:: {module}", ""]
            lines += [".. autosummary::", "   :nosignatures:", ""]
            lines += [f"   {name}" for name in names] + [""]
            for name in names:
                kind = _directive(module, name)
                lines += [f".. {kind}:: {module}.{name}"]
                if kind in ("autoclass", "autoexception"):
                    lines += ["   :members:", "   :show-inheritance:"]
                if kind == "autodata":
                    lines += ["   :no-value:"] if _long_value(module, name) else []
                lines += [""]
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<bn-api {slug}>"), node)
        return node.children


def _long_value(module: str, name: str) -> bool:
    return len(repr(getattr(importlib.import_module(module), name))) > 80


def _field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of a NamedTuple, ``count: jax.Array  # shape ()``."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, last = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4:
            last = (tok.string, tok.start[0])
        elif tok.type == tokenize.COMMENT and last and tok.start[0] == last[1]:
            out[last[0]] = tok.string.lstrip("#").strip()
    return out


_FIELD = re.compile(r"Alias for field number \d+")


def _namedtuple_fields(app, what, name, obj, options, lines):
    """A NamedTuple field reads its source comment instead of "Alias for field number N"."""
    if len(lines) == 1 and _FIELD.fullmatch(lines[0].strip()):
        owner, _, field = name.rpartition(".")
        module, _, cls = owner.rpartition(".")
        try:
            comment = _field_comments(getattr(importlib.import_module(module), cls)).get(field)
        except (ImportError, AttributeError):
            comment = None
        lines[:] = [comment] if comment else []


# |μ| is an absolute value in these docstrings, never a substitution: escape the bars.
_BARS = re.compile(r"(?<![\\\w|])\|(?=[^\s|])([^|`]*?[^\s|\\])\|(?![\w|])")


def escape_bars(text: str) -> str:
    """``|x|`` as text, not an rST substitution; inline literals and line blocks left alone."""
    if text.lstrip().startswith("| "):
        return text
    parts = text.split("``")
    parts[::2] = [_BARS.sub(r"\\|\1\\|", p) for p in parts[::2]]
    return "``".join(parts)


def _absolute_values(app, what, name, obj, options, lines):
    lines[:] = [escape_bars(line) for line in lines]


# jax.typing.ArrayLike where an annotation nests it (optax.Schedule) and autodoc expands it.
_ARRAY_LIKE = re.compile(
    r"~?jax\.jaxlib\._jax\.Array \| ~?numpy\.ndarray \| ~?numpy\.bool \| ~?numpy\.number"
    r" \| bool \| int \| float \| complex"
)
_ARRAY = re.compile(r"~?jax\.jaxlib\._jax\.Array\b")
_ALIAS = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")


def _short_signature(app, what, name, obj, options, signature, return_annotation):
    """Signatures with ``ArrayLike`` instead of its expansion."""
    if signature:
        signature = _ARRAY.sub("~jax.Array", _ARRAY_LIKE.sub("~jax.typing.ArrayLike", signature))
        signature = _ALIAS.sub(r"\1", signature)
    if return_annotation:
        return_annotation = _ARRAY.sub(
            "~jax.Array", _ARRAY_LIKE.sub("~jax.typing.ArrayLike", return_annotation)
        )
        return_annotation = _ALIAS.sub(r"\1", return_annotation)
    return signature, return_annotation


def _check_coverage(app) -> None:
    """Every public name on one page, every core module in a group."""
    import bayesnoise

    covered = {(m, n) for slug in GROUPS for m, names in group_names(slug) for n in names}
    modules = {m for _, sections in GROUPS.values() for m, _ in sections}
    for core in (*bayesnoise._CORE, "pipeline", "pipeline.config"):
        module = f"bayesnoise.{core}"
        if module not in modules:
            logger.warning("API reference: module %s is in no group of docs/_ext/bn_api.py", module)
            continue
        for name in public_names(module):
            if (module, name) not in covered:
                logger.warning("API reference: %s.%s is on no page", module, name)


def _used(env) -> dict[str, str]:
    """The page of each group shown so far: {slug: docname}."""
    if not hasattr(env, "bn_api_used"):
        env.bn_api_used = {}
    return env.bn_api_used


def _check_pages(app, env) -> None:
    for slug in GROUPS:
        if slug not in _used(env):
            logger.warning("API reference: no page shows the group %r (.. bn-api:: %s)", slug, slug)


def _purge(app, env, docname) -> None:
    used = _used(env)
    for slug in [s for s, d in used.items() if d == docname]:
        del used[slug]


def _merge(app, env, docnames, other) -> None:
    _used(env).update(_used(other))


def setup(app):
    app.add_directive("bn-api", ApiGroup)
    app.connect("builder-inited", _check_coverage)
    app.connect("autodoc-process-docstring", _namedtuple_fields)
    app.connect("autodoc-process-docstring", _absolute_values, priority=600)
    app.connect("autodoc-process-signature", _short_signature)
    app.connect("env-check-consistency", _check_pages)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    return {"version": "1", "parallel_read_safe": True, "env_version": 1}
