#!/usr/bin/env bash
# Model Zoo checks, offline, on the CPU (run from anywhere; CI runs it from scripts/test.sh):
#   1. configs/metadata.json against the schema kept in configs/schema/ (monai.bundle verify_metadata);
#   2. the network's input and output shapes and dtypes from the metadata (monai.bundle verify_net_in_out);
#   3. a TorchScript export by tracing (monai.bundle ckpt_export --use_trace) of a seeded network (random weights,
#      so that its displacements are far from zero) saved as {"network": state_dict, ...}, the way models/model.pt
#      stores it; the exported module must give the eager network's output;
#   4. MONAI's inference-workflow properties (ids such as dataset, evaluator, inferer, and the optional ids'
#      references) on configs/inference.yaml and configs/infer.yaml (ConfigWorkflow.check_properties).
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
META=configs/metadata.json
CONFIG=configs/inference.yaml
SCHEMA=configs/schema/metadata_schema.json
[[ -f "$SCHEMA" ]] || { echo "missing $SCHEMA: verify_metadata would try to download the schema" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== verify_metadata (local schema $SCHEMA)"
"$PYTHON" -m monai.bundle verify_metadata --meta_file "$META" --filepath "$SCHEMA"

echo "== verify_net_in_out network_def"
"$PYTHON" -m monai.bundle verify_net_in_out network_def --meta_file "$META" --config_file "$CONFIG" --device cpu

echo "== ckpt_export --use_trace"
"$PYTHON" - "$CONFIG" "$TMP/model.pt" <<'EOF'
import sys

import torch
from monai.bundle import ConfigParser

config, ckpt = sys.argv[1:]
parser = ConfigParser()
parser.read_config(config)
torch.manual_seed(0)
net = parser.get_parsed_content("network_def")
with torch.no_grad():  # an untrained WarpNet outputs about zero: perturb it so the comparison means something
    for p in net.parameters():
        p.add_(0.05 * torch.randn_like(p))
torch.save({"network": net.state_dict(), "epoch": 0}, ckpt)
EOF
"$PYTHON" -m monai.bundle ckpt_export network_def --filepath "$TMP/model.ts" --ckpt_file "$TMP/model.pt" \
    --meta_file "$META" --config_file "$CONFIG" --key_in_ckpt network --use_trace True --input_shape "[1, 2, 128, 128]"

"$PYTHON" - "$CONFIG" "$META" "$TMP/model.pt" "$TMP/model.ts" <<'EOF'
import json
import sys

import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata

config, meta, ckpt, ts = sys.argv[1:]
parser = ConfigParser()
parser.read_config(config)
net = parser.get_parsed_content("network_def")
net.load_state_dict(torch.load(ckpt, weights_only=True)["network"])
net.eval()
traced, meta_values, _ = load_net_with_metadata(ts)
with open(meta) as f:
    version = json.load(f)["version"]
assert meta_values.get("version") == version, f"exported metadata version {meta_values.get('version')} != {version}"
torch.manual_seed(1)
x = torch.rand(2, 2, 128, 128)
with torch.no_grad():
    expected, got = net(x), traced(x)
assert got.shape == (2, 2, 128, 128), got.shape
assert expected.abs().max() > 1.0, "the test network's displacements are too small to compare"
torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
print(f"traced TorchScript matches the eager network (max |diff| {(got - expected).abs().max().item():.2e})")
EOF
echo "== InferProperties of configs/inference.yaml and configs/infer.yaml"
"$PYTHON" - <<'EOF'
import os
import sys

from monai.bundle import ConfigWorkflow

sys.path.insert(0, os.getcwd())  # as `python -m monai.bundle run` from the bundle root has it
for config in ("configs/inference.yaml", "configs/infer.yaml"):
    workflow = ConfigWorkflow(config_file=config, meta_file="configs/metadata.json", workflow_type="infer")
    workflow.initialize()
    missing = workflow.check_properties()
    assert missing == [], f"{config}: missing or wrongly referenced properties {missing}"
    print(f"{config}: every inference property present")
EOF
echo "zoo checks passed"
