"""The documentation cannot rot: the site builds strictly, and its code blocks run.

- the MkDocs site builds with ``--strict`` (a broken link, a missing anchor,
  a page missing from the nav or a docstring the API reference cannot render
  is a failure), and every config field the reference generates is documented;
- every ```` ```python ```` block of every page (docs/, README.md, the
  plugins' READMEs) runs: a page's blocks in order in one namespace, in a
  process of its own whose working directory is a fresh temporary folder.
  A block after the line ``<!-- no-run -->`` is only compiled (it needs a GPU,
  torchrun or real weights); those are reported as skipped tests;
- every ```` ```toml ```` block parses, and every config in one loads with
  :mod:`kdcore.config` and names only installed components with parameters
  they accept; a part of a config (no ``[data]``, say) is completed with a
  minimal config first; a block after ``<!-- fragment -->`` is only parsed;
- every ``kdcore COMMAND ...`` line of a shell block parses with the real
  command-line parser (plugin commands included).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("helpers_docs", Path(__file__).with_name("helpers_docs.py"))
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)

ROOT = docs.ROOT
BLOCKS = [b for page in docs.pages() for b in docs.blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py")]
RUN_PAGES = sorted({b.page for b in PYTHON if b.marker != docs.NO_RUN})
NO_RUN = [b for b in PYTHON if b.marker == docs.NO_RUN]
TOML = [b for b in BLOCKS if b.lang == "toml"]
SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console", "")]


def _id(block) -> str:
    return f"{block.page}:{block.line}"


# -- the site ------------------------------------------------------------------------------------


def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert "No module named mkdocs" not in log, "the docs tools are missing: pip install -e '.[docs]'"
    problems = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0 and not problems, "\n".join(problems) or log[-3000:]
    for page in ("index", "reference/config", "reference/cli", "reference/hooks", "reference/api"):
        assert (tmp_path / "site" / f"{page}.html").is_file(), page
    api = (tmp_path / "site" / "reference" / "api.html").read_text()
    assert "kdcore.create" in api and "LogitLoss" in api  # mkdocstrings rendered the docstrings
    hooks = (tmp_path / "site" / "reference" / "hooks.html").read_text()
    from kdcore.plugins import hookspecs

    for name in vars(hookspecs):
        if getattr(getattr(hookspecs, name), "kdcore_spec", None) is not None:
            assert f'id="kdcore.plugins.hookspecs.{name}"' in hooks, f"the hook reference lacks {name}"


def _reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "_hooks" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_documents_every_field():
    ref = _reference()
    assert ref.undocumented_fields() == [], "give these config fields a doc (a comment on their line)"
    text = ref.config_reference()
    import attrs

    from kdcore import config

    for cls in (config.RunConfig, config.OptimConfig):
        for f in attrs.fields(cls):
            assert f"| `{f.name}` |" in text, f.name
    assert "### loss" in text and "`kd` (builtin)" in text


def test_cli_reference_lists_every_command():
    from kdcore.cli import build_parser

    text = _reference().cli_reference()
    _, sub = build_parser()
    for name, parser in sub.choices.items():
        assert f"## `kdcore {name}`" in text
        for action in parser._actions[1:]:  # after -h
            for option in action.option_strings:
                assert f"`{option}" in text, (name, option)


# -- python blocks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_results(tmp_path_factory):
    """Every page's python blocks, run by helpers_docs.py (one forked process per page)."""
    work = tmp_path_factory.mktemp("docs_run")
    spec = {page: [docs.source_of(b) for b in PYTHON if b.page == page and b.marker != docs.NO_RUN]
            for page in RUN_PAGES}
    (work / "pages.json").write_text(json.dumps(spec))
    env = {**os.environ, "KDCORE_STRICT_PLUGINS": "", "PYTHONHASHSEED": "0"}
    env.pop("KDCORE_PLUGINS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers_docs.py"), str(work / "pages.json"),
                           str(work / "results.json"), str(work / "pages")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("page", RUN_PAGES)
def test_python_blocks_run(page, python_results):
    result = python_results[page]
    assert result["ok"], f"{page}: a python block failed\n{result['error']}"


@pytest.mark.parametrize("block", NO_RUN, ids=_id)
def test_no_run_block(block):
    compile(docs.source_of(block), str(ROOT / block.page), "exec")  # its syntax, at least
    pytest.skip(f"{_id(block)}: marked no-run")


def test_python_blocks_found():
    assert len(PYTHON) >= 20 and "docs/outputs.md" in RUN_PAGES


# -- toml blocks ---------------------------------------------------------------------------------


#: what a config fragment (a block that lacks a required section) is completed with
BASE = {"data": {"name": "gaussian_mixture"}, "student": {"backbone": "mlp"}, "loss": [{"name": "ce"}]}


@pytest.mark.parametrize("block", TOML, ids=_id)
def test_toml_block(block):
    """A config, or a part of one completed with BASE, loads and names installed components."""
    from kdcore.config import check_components, from_dict
    from kdcore.config.parse import _SECTIONS
    from kdcore.plugins import default_registry

    raw = tomllib.loads(block.code)
    if block.marker == docs.FRAGMENT or not raw or not set(raw) <= set(_SECTIONS):
        return  # not a config (a pyproject.toml, say): parsing is the check
    config = from_dict({**BASE, **raw})
    check_components(config, default_registry())


# -- shell blocks --------------------------------------------------------------------------------

_COMMAND = re.compile(r"^(?:\$\s+)?(?:[A-Z_]+=\S*\s+)*(?:\S*/)?(?:kdcore|python -m kdcore|"
                      r"torchrun\s.*?-m kdcore)\s+(?P<args>[a-z].*)$")


def _commands():
    out = []
    for block in SHELL:
        for k, line in enumerate(block.code.splitlines()):
            for part in re.split(r"\s*(?:&&|\|\||;)\s*", line.strip()):
                m = _COMMAND.match(part)
                if m:
                    out.append(pytest.param(m["args"], id=f"{block.page}:{block.line + k}"))
    return out


@pytest.fixture(scope="module")
def parser():
    from kdcore.cli.commands import _add_plugin_commands, build_parser

    parser, sub = build_parser()
    _add_plugin_commands(sub)
    return parser


@pytest.mark.parametrize("args", _commands())
def test_shell_command_parses(args, parser, capsys):
    argv = shlex.split(args, comments=True)
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            pytest.fail(f"kdcore {args}: {capsys.readouterr().err.strip()}")
