#!/usr/bin/env bash
# Install the bundle into .venv and run it on the embedded synthetic demo (results in eval/).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m monai.bundle run --config_file configs/inference.yaml "$@"
