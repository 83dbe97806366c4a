"""Fixtures of the kdcore-lm tests (the helpers are in helpers_lm.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_helpers():
    spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = load_helpers()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    H.build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
