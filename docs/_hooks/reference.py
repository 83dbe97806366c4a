"""MkDocs hook: the reference pages generated from the code at build time.

- ``reference/config.md``: every section and key of a run's TOML file, from
  the attrs classes of :mod:`kdcore.config` (types, defaults, allowed values,
  each field's ``doc``), then every installed component with its parameters,
  from the default registry (signatures and docstrings).
- ``reference/cli.md``: every ``kdcore`` command and option, from
  :func:`kdcore.cli.build_parser` and the installed plugins' commands.

Nothing generated is written to disk or kept in git: the pages exist only in
the build, so they cannot drift from the code.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing

import attrs
from mkdocs.structure.files import File

GENERATED = {
    "reference/config.md": lambda: config_reference(),
    "reference/cli.md": lambda: cli_reference(),
}


#: a Sphinx cross-reference role before inline code (``:class:`Outputs```), as docstrings write them
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(?=<code>|`)")


def on_files(files, config):
    for uri, build in GENERATED.items():
        files.append(File.generated(config, uri, content=build()))
    return files


def on_page_content(html, page, config, files):
    """Docstrings rendered by mkdocstrings show their Sphinx roles as text: drop them."""
    return _ROLE.sub("", html)


# -- helpers -------------------------------------------------------------------------------------


def _text(text: object) -> str:
    """Plain text on one line for markdown: ``<`` and ``>`` outside code spans escaped
    (``runs/<config name>`` would otherwise be read as an HTML tag), Sphinx roles dropped."""
    parts = re.split(r"(`+[^`]*`+)", _ROLE.sub("", " ".join(str(text).split())))
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts)


def _cell(text: object) -> str:
    """Text fit for one markdown table cell."""
    return _text(text).replace("|", "\\|")


def _code(text: object) -> str:
    return f"`{text}`" if str(text) != "" else ""


def _first_paragraph(obj: object) -> str:
    """The first paragraph of a docstring, on one line (for text outside tables)."""
    doc = inspect.getdoc(obj) or ""
    return _text(doc.split("\n\n", 1)[0])


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _default(field: attrs.Attribute) -> str:
    default = field.default
    if isinstance(default, attrs.Factory):
        default = default.factory()
    return "none" if default is None else _code(_toml(default))


# -- the config reference ------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each attrs field's documentation: its ``doc`` metadata, else the comment on its line
    in the class's source (``epochs: int = ...  # passes over the training split``)."""
    source = textwrap.dedent(inspect.getsource(cls))
    docs: dict[str, str] = {}
    line: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            names = [t for t in line if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
            comments = [t.string.lstrip("#").strip() for t in line if t.type == tokenize.COMMENT]
            if (len(names) > 1 and names[0].type == tokenize.NAME and names[0].start[1] == 4
                    and names[1].string == ":" and comments):
                docs[names[0].string] = " ".join(comments)
            line = []
        else:
            line.append(tok)
    for f in attrs.fields(cls):
        if f.metadata.get("doc"):
            docs[f.name] = f.metadata["doc"]
    return docs


def undocumented_fields() -> list[str]:
    """``Class.field`` for every config field without documentation (the docs test lists them)."""
    from kdcore import config as c

    out = []
    for cls in CONFIG_CLASSES(c):
        docs = field_docs(cls)
        out += [f"{cls.__name__}.{f.name}" for f in attrs.fields(cls)
                if f.name not in ("params", "source") and not docs.get(f.name)]
    return out


def CONFIG_CLASSES(c):
    return tuple(getattr(c, name) for name in ("Config", "RunConfig", "OptimConfig", "ComponentConfig",
                                                 "ModelConfig", "SignalsConfig", "LossTermConfig")
                 if hasattr(c, name))

TYPE_WORDS = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list"}


def _fixed_section(name: str, cls: type) -> list[str]:
    lines = [f"## `{name}`", "", _first_paragraph(cls), "",
             "| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in attrs.fields(cls):
        meta = f.metadata
        allowed = ", ".join(_code(_toml(c)) for c in meta["choices"]) if meta.get("choices") else ""
        if meta.get("check") is not None and not allowed:
            allowed = _cell((meta["check"].__doc__ or "").strip())
        lines.append(f"| `{f.name}` | {TYPE_WORDS[meta['type']]} | {_default(f)} | {allowed} "
                     f"| {_cell(field_docs(cls).get(f.name, ''))} |")
    return lines + [""]


def _component_section(name: str, cls: type, note: str) -> list[str]:
    lines = [f"## `{name}`", "", _first_paragraph(cls) + " " + note, "",
             "| key | meaning |", "| --- | --- |"]
    hints = typing.get_type_hints(cls)
    for f in attrs.fields(cls):
        if f.name == "params" or isinstance(hints[f.name], type) and attrs.has(hints[f.name]):
            continue  # a nested class has a section of its own
        lines.append(f"| `{f.name}` | {_cell(field_docs(cls).get(f.name, ''))} |")
    return lines + [""]


def _signature_rows(factory) -> list[tuple[str, str]]:
    from kdcore.plugins.registry import accepted_parameters

    targets = [c.__init__ for c in inspect.getmro(factory) if "__init__" in vars(c)] \
        if inspect.isclass(factory) else [factory]
    rows: dict[str, str] = {}
    for fn in targets:
        if fn is object.__init__:
            break
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            break
        for p in sig.parameters.values():
            if p.name == "self" or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name in rows:
                continue
            rows[p.name] = "required" if p.default is p.empty else _code(repr(p.default))
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    accepted, _ = accepted_parameters(factory)
    return [(n, d) for n, d in rows.items() if n in accepted]


def _components() -> list[str]:
    from kdcore.plugins.hookspecs import KINDS
    from kdcore.plugins import default_registry

    reg = default_registry()
    lines = ["## Components", "",
             "The components registered by the plugins installed where these docs were built "
             "(`kdcore list` shows yours). A table that names a component passes its other keys "
             "to the component as the parameters below.", ""]
    for kind in KINDS:
        lines += [f"### {kind}", ""]
        for name in reg.available(kind):
            comp = reg.get(kind, name)
            params = ", ".join(f"`{n}` ({d})" for n, d in _signature_rows(comp.factory)) or "none"
            lines += [f"`{name}` ({comp.plugin})", f": {_first_paragraph(comp.factory) or '(no docstring)'}"
                      f"<br>parameters: {params}", ""]
    return lines


def config_reference() -> str:
    from kdcore import config as c

    lines = ["# Config reference", "",
             "Generated from the attrs classes of `kdcore.config` and the installed plugins "
             "when these docs are built. [Configuration files](../config.md) explains the file "
             "with an example; this page lists every key.", "",
             "## Sections", "", "| section | required | holds |", "| --- | --- | --- |"]
    hints = typing.get_type_hints(c.Config)
    for f in attrs.fields(c.Config):
        if f.name == "source":
            continue
        required = "yes" if f.default is attrs.NOTHING else "no"
        table = f"[[{f.name}]]" if hints[f.name] == list[c.LossTermConfig] else f"[{f.name}]"
        lines.append(f"| `{table}` | {required} | {_cell(field_docs(c.Config).get(f.name, ''))} |")
    lines.append("")
    lines += _fixed_section("[run]", c.RunConfig)
    lines += _fixed_section("[optim]", c.OptimConfig)
    def tables_of(cls: type) -> str:
        return ", ".join(f"[{f.name}]" for f in attrs.fields(c.Config) if hints[f.name] in (cls, cls | None))

    lines += _component_section(tables_of(c.ComponentConfig), c.ComponentConfig,
                                "Other keys are the component's parameters (see Components).")
    lines += _component_section(tables_of(c.ModelConfig), c.ModelConfig,
                                "Other keys are the backbone's parameters; `num_classes` (and `in_features` "
                                "where the backbone takes it) come from the dataset.")
    if hasattr(c, "SignalsConfig"):
        lines += _fixed_section("[teacher]: the teacher's source", c.SignalsConfig)
    lines += _component_section("[[loss]]", c.LossTermConfig,
                                "Other keys are the loss's parameters (see Components).")
    lines += _components()
    return "\n".join(lines) + "\n"


# -- the CLI reference ---------------------------------------------------------------------------


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        default = "" if action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0 \
            else _code(action.default)
        meaning = action.help or ""
        if action.choices:
            meaning += (" " if meaning else "") + "one of " + ", ".join(_code(c) for c in action.choices)
        rows.append(f"| `{_cell(name)}` | {default} | {_cell(meaning)} |")
    return rows if len(rows) > 2 else []


def cli_reference() -> str:
    from kdcore.cli.commands import _add_plugin_commands, build_parser

    parser, sub = build_parser()
    _add_plugin_commands(sub)
    lines = ["# CLI reference", "",
             "Generated from `kdcore.cli.build_parser()` and the installed plugins' commands when "
             "these docs are built. [Command line](../cli.md) explains exit status, the run directory "
             "and environment variables.", "",
             "```text", parser.format_usage().strip(), "```", ""]
    lines += _option_rows(parser) + [""]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.prog = f"kdcore {name}"
        lines += [f"## `kdcore {name}`", "", _cell(helps.get(name) or p.description or ""), "",
                  "```text", p.format_usage().strip(), "```", ""]
        lines += _option_rows(p) + [""]
    return "\n".join(lines)
