#!/usr/bin/env bash
# Sets up .venv with kdcore, every plugin under plugins/, the test and documentation tools.
# torch/torchvision are pinned to the releases these machines carry on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" "setuptools>=68" wheel
plugins=()
for d in plugins/*/ examples/*/; do [ -f "$d/pyproject.toml" ] && plugins+=(-e "$d"); done
"${PIP[@]}" --no-build-isolation -e ".[test,docs]" "${plugins[@]}"
