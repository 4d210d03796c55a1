"""The configuration as documented TOML (``aiosd --print-default-config``).

What a key means is written once, in aiosd/config.py, as the ``#:`` comment
above its field (the convention Sphinx reads too)::

    #: Seconds between worker heartbeats.
    heartbeat_interval: float = field(default=0.5, ...)

:func:`field_docs` reads those comments from the source, and
:func:`commented_toml` writes a configuration with each key under its comment,
so a key added later is documented where it is declared.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any

import tomli_w

#: width the comments are wrapped to
WIDTH = 88


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of dataclass ``cls`` (or of the
    base class declaring it), its lines joined into one text."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):   # a subclass's comment replaces its base's
        if dataclasses.is_dataclass(klass):
            docs.update(_declared_docs(klass))
    return docs


@functools.cache
def _declared_docs(klass: type) -> dict[str, str]:
    try:
        lines, _ = inspect.getsourcelines(klass)
    except (OSError, TypeError):
        # no source to read (a frozen or bytecode-only install): the
        # configuration is still written, without its comments
        return {}
    [node] = ast.parse(textwrap.dedent("".join(lines))).body
    docs = {}
    for stmt in node.body:   # type: ignore[attr-defined]
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            comment: list[str] = []
            above = stmt.lineno - 2   # the line above the field, 0-based
            while above >= 0 and lines[above].strip().startswith("#:"):
                comment.insert(0, lines[above].strip()[2:].strip())
                above -= 1
            if comment:
                docs[stmt.target.id] = " ".join(comment)
    return docs


def commented_toml(config: Any) -> str:
    """``config`` (a tree of dataclasses) as TOML, each key and table under
    the comment of its field. A key left unset (None) is shown commented out,
    as is, for a list of tables with no entry, one entry of defaults."""
    lines: list[str] = []
    _table(config, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _comment(doc: str, mark: str = "#") -> list[str]:
    text = doc.replace("``", "`")   # (reStructuredText's literals, as Markdown's)
    return textwrap.wrap(text, WIDTH, initial_indent=f"{mark} ", subsequent_indent=f"{mark} ")


def _table(obj: Any, path: list[str], lines: list[str], mark: str = "") -> None:
    """The keys of dataclass ``obj`` at ``path``, then its sub-tables. With
    ``mark`` ("# "), every line is commented out and docs are marked "##"."""
    docs = field_docs(type(obj))
    hints = typing.get_type_hints(type(obj))
    doc_mark = "##" if mark else "#"
    later: list[tuple[str, str, list[Any], bool]] = []   # (name, doc, tables, array)
    examples: list[tuple[str, Any]] = []                 # (name, an entry of defaults)
    for f in dataclasses.fields(obj):
        value, doc = getattr(obj, f.name), docs.get(f.name, "")
        if dataclasses.is_dataclass(value):
            later.append((f.name, doc, [value], False))
            continue
        item = entry_class(hints[f.name])
        if item is not None and value:
            later.append((f.name, doc, value, True))
            continue
        lines += _comment(doc, doc_mark)
        if value is None:   # TOML has no null: a key left unset is left out
            lines.append(f"{mark or '# '}{f.name} is unset")
        else:
            lines += [mark + line for line in _key_lines(f.name, value)]
        if item is not None:
            examples.append((f.name, item()))
    for name, entry in examples:
        lines += ["", f"# No [[{'.'.join([*path, name])}]] by default; an entry's keys, as their defaults:"]
        _header(entry, [*path, name], True, lines, "# ")
    for name, doc, tables, array in later:
        lines += [""] + _comment(doc, doc_mark)
        for i, entry in enumerate(tables):
            lines += [""] if i else []
            _header(entry, [*path, name], array, lines, mark)


def _header(entry: Any, path: list[str], array: bool, lines: list[str], mark: str) -> None:
    key = ".".join(path)
    lines.append(f"{mark}[[{key}]]" if array else f"{mark}[{key}]")
    _table(entry, path, lines, mark)


def _key_lines(name: str, value: Any) -> list[str]:
    """``name = value`` in TOML (tomli_w quotes and escapes)."""
    if isinstance(value, dict):   # inline, to stay among its table's keys
        pairs = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items())
        return [f"{name} = {{ {pairs} }}" if pairs else f"{name} = {{}}"]
    return tomli_w.dumps({name: value}).splitlines()


def entry_class(hint: Any) -> type | None:
    """The dataclass of a list-of-tables field (``list[GroupConfig]``), else None."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return item
    return None
