"""The reference of every config key (docs/config.md), generated from the config dataclasses.

A key's meaning is its field's comment in the dataclass: the comment lines directly above the field plus the
comment at the end of its line (the `#:` convention of Sphinx, without the colon). A field with neither is an
error naming the key, so a new key cannot land undocumented. Types and defaults come from the annotations;
allowed values from `Literal` choices and from the `need(...)` checks that validate each key.

    mixtail config --reference --out docs/config.md      # regenerate the page

    from mixtail.trainer.config_reference import config_reference
    text = config_reference()
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from typing import Literal

from mixtail.trainer.config import RunConfig

__all__ = ["config_reference", "field_docs", "key_rows", "UndocumentedKeys"]

DOC_PATH = "docs/config.md"
COMMAND = f"mixtail config --reference --out {DOC_PATH}"


class UndocumentedKeys(ValueError):
    """Config fields without a comment: a bug in mixtail (every key a user can set is documented)."""


def field_docs(cls) -> dict[str, str]:
    """{field name: its comment text} for the fields of dataclass `cls` that have a comment."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line (1-based) -> comment text without '#'
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    text_lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line >= 1 and text_lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        text = " ".join(part for part in above + trailing if part)
        if text:
            docs[node.target.id] = text
    return docs


def _message_head(node: ast.expr) -> str:
    """The fixed start of a need() message, up to its first interpolated value, without a trailing 'got'."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        head = node.value
    elif isinstance(node, ast.JoinedStr):
        head = ""
        for part in node.values:
            if not isinstance(part, ast.Constant):
                break
            head += part.value
    else:
        return ""
    head = head.strip()
    for tail in (", got", " got"):
        if head.endswith(tail):
            head = head[: -len(tail)]
    return head.rstrip(" ,:;")


def _checks(modules) -> dict[str, list[str]]:
    """{dotted key: the rules `need(ok, key, message)` states for it} in the given modules' source. A key
    written f"section.{name}" inside `for name in (...)` counts for each name. Only messages that state a rule
    ("must ...", "needs ...") are kept; the rest describe one bad combination."""
    rules: dict[str, list[str]] = {}

    def visit(node, loop_names: dict[str, tuple]):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            values = tuple(e.value for e in node.iter.elts if isinstance(e, ast.Constant))
            loop_names = {**loop_names, node.target.id: values}
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "need" \
                and len(node.args) >= 3:
            keys = _keys(node.args[1], loop_names)
            head = _message_head(node.args[2])
            if head.startswith(("must", "needs")):
                for key in keys:
                    rules.setdefault(key, []).append(head)
        for child in ast.iter_child_nodes(node):
            visit(child, loop_names)

    for module in modules:
        visit(ast.parse(inspect.getsource(module)), {})
    return rules


def _keys(node: ast.expr, loop_names: dict[str, tuple]) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr) and len(node.values) == 2 and isinstance(node.values[0], ast.Constant) \
            and isinstance(node.values[1], ast.FormattedValue) and isinstance(node.values[1].value, ast.Name):
        return [node.values[0].value + str(v) for v in loop_names.get(node.values[1].value.id, ())]
    return []


def _type_text(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(sorted({type(a).__name__ for a in args}))
    if origin in (typing.Union, types.UnionType):
        inner = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_text(args[0])}"
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


def _value_text(value) -> str:
    """A value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return repr(value)


def _allowed(tp, rules: list[str]) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:  # the choices say it all; a check of the same choices would repeat them
        return ", ".join(f"`{_value_text(a).strip(chr(34))}`" for a in args)
    if tp is bool:
        return "; ".join(["`true`, `false`"] + rules)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        rules = [r.removesuffix(" or null") for r in rules]
        rest = _allowed(inner[0], rules) if len(inner) == 1 else "; ".join(rules)
        if inner == [bool] or typing.get_origin(inner[0]) is Literal:
            return "`null`, " + rest
        return "`null`, or: " + rest if rest else "`null` or any"
    return "; ".join(rules)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _sections(root=RunConfig):
    """(section name, its dataclass) for every dataclass field of the root, in declaration order."""
    hints = typing.get_type_hints(root)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(root) if dataclasses.is_dataclass(hints[f.name])]


def _class_summary(cls) -> str:
    """The first paragraph of the class docstring (dataclass writes a signature there when there is none)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _fields(cls, prefix: str):
    """(dotted key, field, annotation, doc or None, owning class) for every value field below `cls`, a nested
    dataclass field contributing its own fields under its name."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{key}.")
        else:
            yield key, f, tp, f.metadata.get("doc") or docs.get(f.name), cls


def key_rows(root=RunConfig) -> list[dict]:
    """One dict per key (key, type, default, allowed, meaning, section), in declaration order.

    A key's meaning is its field's comment (or a `doc` entry in the field's metadata). Raises UndocumentedKeys
    naming every key that has neither."""
    sections = _sections(root)
    found = [(section, *row) for section, cls in sections for row in _fields(cls, f"{section}.")]
    modules = {sys.modules[owner.__module__] for *_, owner in found} | {sys.modules[root.__module__]}
    rules = _checks(sorted(modules, key=lambda m: m.__name__))
    rows, missing = [], []
    for section, key, f, tp, doc, _ in found:
        if not doc:
            missing.append(key)
            continue
        rows.append({"section": section, "key": key, "type": _type_text(tp), "default": _value_text(_default(f)),
                     "allowed": _allowed(tp, rules.get(key, [])), "meaning": doc})
    if missing:
        raise UndocumentedKeys(f"config keys without documentation: {', '.join(missing)}; write what each means in "
                               f"a comment above its field or at the end of its line, then run `{COMMAND}`")
    return rows


def _markdown(text: str) -> str:
    """Comment text as Markdown that shows it as written: outside `code` spans, <name> would be an HTML tag and
    a * could start emphasis. A | would end a table cell anywhere."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i]).replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def config_reference(root=RunConfig) -> str:
    """docs/config.md: every key of the run config with its type, default, allowed values and meaning."""
    rows = key_rows(root)
    out = [
        "# Config reference",
        "",
        f"<!-- Generated from the config dataclasses by `{COMMAND}`; edit the field comments there, not this "
        "page. tests/test_config_reference.py fails when this page is out of date. -->",
        "",
        "A run is one YAML file of deltas on these defaults (the paper's CIFAR-LT recipe), plus command-line "
        "overrides of the same keys: `mixtail train configs/cifar100_lt_r100.yaml --optim.lr=0.05 "
        "--mix.ratio_range=[0,1]`. Values are YAML; an unknown key, a duplicate key or a wrongly typed value is "
        "an error naming the key. `mixtail config CONFIG [--section.key=value ...]` prints the resolved config. "
        "The method behind the keys is in [method.md](method.md).",
        "",
    ]
    summaries = dict((name, _class_summary(cls)) for name, cls in _sections(root))
    for section in summaries:
        out += [f"## {section}", ""]
        if summaries[section]:
            out += [_markdown(summaries[section]), ""]
        out += ["| Key | Type | Default | Allowed | Meaning |", "|---|---|---|---|---|"]
        for row in rows:
            if row["section"] == section:
                default = row["default"].replace("|", "\\|")  # a | ends a table cell even inside a code span
                out.append(f"| `{row['key']}` | {_markdown(row['type'])} | `{default}` | "
                           f"{_markdown(row['allowed'])} | {_markdown(row['meaning'])} |")
        out.append("")
    return "\n".join(out)
