#!/usr/bin/env bash
# Install the bundle and its test tools into .venv, then run style checks, the Model Zoo checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements-dev.txt
# a real headless browser for the report test (Debian's package; elsewhere install Chromium yourself)
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null && command -v apt-get >/dev/null \
  && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) >/dev/null
fi
.venv/bin/python -m black --check --line-length 120 bundle scripts tests monailabel_app
.venv/bin/python -m isort --check-only --profile black --line-length 120 bundle scripts tests monailabel_app
.venv/bin/python -m flake8 bundle scripts tests monailabel_app
PYTHON=.venv/bin/python bash scripts/zoo_checks.sh
.venv/bin/python -m pytest -q tests "$@"
# MONAI Label app tests, in their own environment (monailabel 0.8.5 needs pins the main one must not have)
bash scripts/test_label.sh
