"""The config reference and the command line's help, generated from the code.

``.. bn-config::`` walks :class:`bayesnoise.pipeline.config.Config`'s pydantic fields, sections,
nested sections and the unions of kinds (noise, EM hyperprior) included: a table per section of
every key with its type, default, what is allowed and the comment the source gives it, then
the default config as YAML. ``.. bn-cli::`` shows ``build_parser()``'s help and each
subcommand's. Both go inside an ``{eval-rst}`` block.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import os
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from bn_api import escape_bars
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

_OPS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}
_ALLOWED = {bool: "``true`` or ``false``"}


def _is_model(tp: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any, metadata: list) -> tuple[Any, list, bool]:
    """``tp`` without Annotated and None; the metadata found on the way; whether None is allowed."""
    from pydantic.fields import FieldInfo

    meta, nullable = list(metadata), False
    while True:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:
            tp, meta = args[0], meta + list(args[1:])
        elif origin in (Union, types.UnionType) and type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            tp, nullable = (rest[0] if len(rest) == 1 else Union[rest]), True
        else:
            flat = [n for m in meta for n in (m.metadata if isinstance(m, FieldInfo) else [m])]
            return tp, flat, nullable


def _kinds(tp: Any) -> list[type] | None:
    """The models of a union discriminated by ``kind``, or None."""
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        if args and all(_is_model(a) and "kind" in a.model_fields for a in args):
            return list(args)
    return None


def _bounds(meta: list) -> str:
    out = []
    for m in meta:
        for attr, op in _OPS.items():
            value = getattr(m, attr, None)
            if value is not None:
                out.append(f"{op} {value:g}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"matching ``{pattern}``")
    return " and ".join(out)


def _describe(tp: Any, metadata: list = ()) -> tuple[str, str]:
    """(type, what is allowed) of a field's annotation."""
    tp, meta, nullable = _unwrap(tp, list(metadata))
    allowed = _bounds(meta)
    if get_origin(tp) is Literal:
        values = get_args(tp)
        kind = _TYPES.get(type(values[0]), "value")
        allowed = "one of " + ", ".join(f"``{v}``" for v in values)
    elif get_origin(tp) is tuple:
        inner, inner_allowed = _describe(get_args(tp)[0])
        kind = f"list of {inner}"
        allowed = f"each {inner_allowed}" if inner_allowed else allowed
    elif get_origin(tp) is dict or tp is dict:
        kind = "mapping"
    elif _kinds(tp):
        names = [m.model_fields["kind"].default for m in _kinds(tp)]
        kind = "section (by ``kind``)"
        allowed = "``kind`` one of " + ", ".join(f"``{k}``" for k in names)
    elif _is_model(tp):
        kind = "section"
    elif get_origin(tp) in (Union, types.UnionType):
        kind = " or ".join(_describe(a)[0] for a in get_args(tp))
    else:
        kind = _TYPES.get(tp, getattr(tp, "__name__", str(tp)))
        allowed = allowed or _ALLOWED.get(tp, "")
    if nullable:
        kind += " or null"
    return kind, allowed


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _comments(module: types.ModuleType) -> dict[tuple[str, str], str]:
    """{(class, field): comment} from the source: comments on a field's lines and just above."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    comment_at = {}
    for i, line in enumerate(lines, start=1):
        code, hash_, text = _split_comment(line)
        if hash_:
            comment_at[i] = (text.strip(), not code.strip())
    out = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, i = [], stmt.lineno - 1
            while i in comment_at and comment_at[i][1]:  # whole-line comments just above
                above.insert(0, comment_at[i][0])
                i -= 1
            inline = [
                comment_at[j][0]
                for j in range(stmt.lineno, stmt.end_lineno + 1)
                if j in comment_at and not comment_at[j][1]
            ]
            text = " ".join(above + inline)
            if text:
                out[(cls.name, stmt.target.id)] = text
    return out


def _split_comment(line: str) -> tuple[str, str, str]:
    """A line's code and its comment, ``#`` inside strings left alone."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[:i], "#", line[i + 1 :]
    return line, "", ""


def _cell(text: str) -> str:
    return escape_bars(text.replace("\n", " ")) if text else ""


class _Walker:
    def __init__(self) -> None:
        from bayesnoise.pipeline import config

        self.config = config
        self.comments = _comments(config)
        self.lines: list[str] = []

    def comment(self, model: type, name: str) -> str:
        for cls in model.__mro__:
            text = self.comments.get((cls.__name__, name))
            if text:
                return text
        return ""

    def docstring(self, model: type) -> list[str]:
        doc = model.__dict__.get("__doc__")
        return (
            [escape_bars(line) for line in inspect.cleandoc(doc).splitlines()] + [""] if doc else []
        )

    def heading(self, title: str, level: int) -> None:
        self.lines += [title, "=-~^"[level] * len(title), ""]

    def table(self, rows: list[tuple[str, ...]]) -> None:
        self.lines += [".. list-table::", "   :header-rows: 1", "   :widths: 18 14 10 20 38", ""]
        for row in [("key", "type", "default", "allowed", "meaning"), *rows]:
            for j, cell in enumerate(row):
                self.lines.append(f"   {'* -' if j == 0 else '  -'} {_cell(cell)}".rstrip())
        self.lines.append("")

    def row(self, model: type, name: str, info: Any, key: str, meaning: str = "") -> tuple:
        kind, allowed = _describe(info.annotation, info.metadata)
        if info.description:  # the config says what is allowed in words
            allowed = info.description
        if info.default_factory is not None:
            default = (
                "(section)"
                if _is_model(_unwrap(info.annotation, [])[0])
                or _kinds(_unwrap(info.annotation, [])[0])
                else _yaml(info.default_factory())
            )
        else:
            default = _yaml(info.default)
        return (
            f"``{key}``",
            kind,
            f"``{default}``" if default != "(section)" else default,
            allowed,
            meaning or self.comment(model, name),
        )

    def section(self, model: type, prefix: str, level: int, seen: set) -> None:
        """A table of ``model``'s keys, then a subsection per nested section."""
        rows, nested = [], []
        for name, info in model.model_fields.items():
            key = f"{prefix}.{name}".lstrip(".")
            rows.append(self.row(model, name, info, key))
            tp = _unwrap(info.annotation, [])[0]
            if _is_model(tp) or _kinds(tp):
                nested.append((key, tp, info))
        if rows:
            self.table(rows)
        for key, tp, info in nested:
            self.heading(f"``{key}``", level)
            if _kinds(tp):
                self.kinds(key, _kinds(tp), info, level + 1, seen)
            else:
                self.lines += self.docstring(tp)
                self.section(tp, key, level + 1, seen)

    def kinds(self, prefix: str, models: list[type], info: Any, level: int, seen: set) -> None:
        """A union discriminated by ``kind``: its base's docstring, the ``kind`` key, then a table
        of the keys of each kind; a nested union of the same kinds (``noise.input``) once."""
        base = models[0].__base__
        self.lines += self.docstring(base)
        names = [m.model_fields["kind"].default for m in models]
        default = info.default_factory().kind if info.default_factory is not None else None
        self.table(
            [
                (
                    f"``{prefix}.kind``",
                    "str",
                    f"``{_yaml(default)}``",
                    "one of " + ", ".join(f"``{k}``" for k in names),
                    "which distribution; its keys below",
                )
            ]
        )
        if base in seen:
            return
        seen = seen | {base}
        recursive = []
        for model in models:
            kind = model.model_fields["kind"].default
            self.lines += [f"**kind:** ``{kind}``", ""]
            source = self.source_of(model, base)
            rows, nested = [], []
            for name, field in model.model_fields.items():
                tp = _unwrap(field.annotation, [])[0]
                if name == "kind":
                    continue
                if _kinds(tp) and base in {m.__base__ for m in _kinds(tp)}:
                    recursive.append((name, model, field))
                    continue
                key = f"{prefix}.{name}"
                rows.append(
                    self.row(model, name, field, key, self.comment(model, name) or source(name))
                )
                if _is_model(tp) or _kinds(tp):
                    nested.append((key, tp, field))
            if rows:
                self.table(rows)
            else:
                also = [n for n, m, _ in recursive if m is model]
                self.lines += [
                    "No keys besides ``kind``" + "".join(f" and ``{n}``" for n in also) + ".",
                    "",
                ]
            for key, tp, _ in nested:
                self.heading(f"``{key}``", level)
                self.section(tp, key, level + 1, seen)
        if recursive:
            name, model, field = recursive[0]
            takes = [k for k in names if self.accepts(prefix, k, name)]
            kind, _ = _describe(field.annotation, field.metadata)
            self.heading(f"``{prefix}.{name}``", level)
            self.lines += [
                f"Type: {kind}; default: ``{_yaml(field.default)}``; taken by the kinds "
                + ", ".join(f"``{k}``" for k in takes)
                + ". "
                + (self.comment(model, name) or _input_text(prefix, name)),
                "",
            ]

    def accepts(self, prefix: str, kind: str, name: str) -> bool:
        """Whether a config with ``prefix.kind: kind`` takes ``prefix.name`` (a nested kind)."""
        raw: dict = {}
        node = raw
        for part in prefix.split("."):
            node = node.setdefault(part, {})
        node.update({"kind": kind, name: {"kind": "none"}})
        try:
            self.config.load_config(raw)
        except self.config.ConfigError:
            return False
        return True

    def source_of(self, model: type, base: type):
        """Where a kind's parameters come from: the bayesnoise.noise class of the same name, else
        a function the docstring of the noise names."""
        from bayesnoise import noise

        stem = model.__name__[: -len(base.__name__.removesuffix("Config"))]
        cls = getattr(noise, stem, None)
        if inspect.isclass(cls) and issubclass(cls, noise.Noise):
            params = inspect.signature(cls).parameters
            return lambda name: (
                f"parameter ``{name}`` of :class:`bayesnoise.noise.{stem}`"
                if name in params
                else ""
            )
        # else the functions the docstring names, e.g. bayesnoise.nn.learned_noise
        functions = re.findall(r":func:`(bayesnoise\.[\w.]+)`", base.__doc__ or "")

        def source(name: str) -> str:
            for path in functions:
                module, _, attr = path.rpartition(".")
                fn = getattr(importlib.import_module(module), attr, None)
                if fn is not None and name in inspect.signature(fn).parameters:
                    return f"parameter ``{name}`` of :func:`{path}`"
            return ""

        return source


def _input_text(prefix: str, name: str) -> str:
    return (
        f"A noise for the input layer: a mapping with the keys of ``{prefix}`` above, of "
        f"any kind that takes ``{name}``, without an ``{name}`` of its own; null: the same "
        f"noise as the other layers."
    )


class ConfigReference(SphinxDirective):
    """``.. bn-config::``: every config key, a section per config section."""

    def run(self) -> list[nodes.Node]:
        walker = _Walker()
        config = walker.config
        walker.heading("Top level", 0)
        top = {
            n: f
            for n, f in config.Config.model_fields.items()
            if not (_is_model(_unwrap(f.annotation, [])[0]) or _kinds(_unwrap(f.annotation, [])[0]))
        }
        walker.table([walker.row(config.Config, n, f, n) for n, f in top.items()])
        for name, info in config.Config.model_fields.items():
            if name in top:
                continue
            tp = _unwrap(info.annotation, [])[0]
            walker.heading(f"``{name}``", 0)
            if _kinds(tp):
                walker.kinds(name, _kinds(tp), info, 1, set())
            else:
                walker.lines += walker.docstring(tp)
                walker.section(tp, name, 1, set())
        walker.heading("The default config", 0)
        walker.lines += ["``load_config({}).to_yaml()``:", "", ".. code-block:: yaml", ""]
        walker.lines += ["   " + line for line in config.load_config({}).to_yaml().splitlines()]
        walker.lines.append("")
        return _parse(self, walker.lines, "<bn-config>")


class CommandLineHelp(SphinxDirective):
    """``.. bn-cli::``: ``bayesnoise --help`` and each subcommand's ``--help``."""

    def run(self) -> list[nodes.Node]:
        from bayesnoise.pipeline.cli import build_parser

        parser = build_parser()
        lines: list[str] = []
        with _columns(100):
            title = f"``{parser.prog}``"
            lines += [title, "-" * len(title), "", "::", ""]
            lines += ["   " + line for line in parser.format_help().splitlines()] + [""]
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        title = f"``{parser.prog} {name}``"
                        lines += [title, "-" * len(title), "", "::", ""]
                        lines += ["   " + line for line in sub.format_help().splitlines()] + [""]
        return _parse(self, lines, "<bn-cli>")


@contextlib.contextmanager
def _columns(width: int):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _parse(directive: SphinxDirective, lines: list[str], source: str) -> list[nodes.Node]:
    node = nodes.section()
    node.document = directive.state.document
    nested_parse_with_titles(directive.state, StringList(lines, source=source), node)
    return node.children


def setup(app):
    app.add_directive("bn-config", ConfigReference)
    app.add_directive("bn-cli", CommandLineHelp)
    return {"version": "1", "parallel_read_safe": True}
