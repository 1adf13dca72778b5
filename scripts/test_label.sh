#!/usr/bin/env bash
# MONAI Label tests in their own environment (.venv-label): monailabel 0.8.5 needs pins the main one must not have.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-label
.venv-label/bin/python -m pip install -q -r requirements-label.txt
.venv-label/bin/python -m pip install -q --no-deps monailabel==0.8.5
ONESHOT_REQUIRE_LABEL=1 .venv-label/bin/python -m pytest -q tests/label "$@"
