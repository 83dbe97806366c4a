"""Meta-tests (datasette style): every hook is documented and exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from kdcore.plugins import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if inspect.isfunction(fn) and getattr(fn, "kdcore_spec", None) is not None)


def test_hooks_found():
    assert set(hookspecs.KIND_OF_HOOK) < set(HOOKS) and "register_commands" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{hook}(" in doc, f"docs/plugins.md has no section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_meta.py"]
    assert any(f"def {hook}(" in p.read_text() for p in tests), f"no test implements {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip()
