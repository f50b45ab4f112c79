"""The options as text, generated from the dataclasses in config.py: `pcmoe train --help`'s list of every option
(its value in a run and its one-line documentation) and `pcmoe config show`'s TOML.

An option's documentation is the comment on its line in config.py, or the comment lines right above it when its
line has none; a section's is its dataclass's docstring. They are read from the source with ``tokenize`` and
``ast``, so the comments stay where a reader of config.py sees them, and nothing restates them.
"""

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize

from .config import SECTIONS, Config

__all__ = ["field_docs", "options_help", "to_toml"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its documentation} of a config dataclass ("" where a field has none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}  # line -> (text, whether the comment is the whole line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), token.line.lstrip().startswith("#"))
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        text = comments.get(node.end_lineno, ("", True))[0]
        if not text:  # the block of whole-line comments right above the field
            block, line = [], node.lineno - 1
            while comments.get(line, ("", False))[1]:
                block.insert(0, comments[line][0])
                line -= 1
            text = " ".join(block)
        docs[node.target.id] = text
    return docs


def toml_value(value) -> str:
    """An option's value in TOML (and in --set): JSON's strings, numbers, booleans and arrays are TOML's too, but
    for the non-finite floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan
    return json.dumps(value, ensure_ascii=False)


def _sections(cfg: Config):
    """(section name or "", its docstring, [(name, value, doc)]) for the top level and each section."""
    yield "", "", [("parties", cfg.parties, field_docs(Config)["parties"])]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        options = [(f.name, getattr(getattr(cfg, section), f.name), docs[f.name]) for f in dataclasses.fields(cls)]
        yield section, " ".join((cls.__doc__ or "").split()), options


def options_help(cfg: Config, width: int = 100) -> str:
    """Every option, one per line: ``section.name = value`` (``cfg``'s value) and, indented below, its doc."""
    lines = []
    for section, doc, options in _sections(cfg):
        if section:
            lines += ["", *textwrap.wrap(f"[{section}] {doc}", width)]
        for name, value, option_doc in options:
            shown = "unset" if value is None else toml_value(value)
            lines.append(f"  {section + '.' if section else ''}{name} = {shown}")
            lines += textwrap.wrap(option_doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def to_toml(cfg: Config, header: str = "") -> str:
    """``cfg`` as a TOML file that load_config reads back to the same Config, each option under its doc as a
    comment; an unset option (None) is a comment."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section, doc, options in _sections(cfg):
        if section:
            lines += ["", f"[{section}]", *textwrap.wrap(doc, 116, initial_indent="# ", subsequent_indent="# ")]
        for name, value, option_doc in options:
            lines += textwrap.wrap(option_doc, 116, initial_indent="# ", subsequent_indent="# ")
            lines.append(f"# {name}: unset" if value is None else f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
