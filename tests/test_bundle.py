"""End-to-end: the bundle command on the embedded demo and on real JSRT cases from ../shared/data."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import ROOT, shared_dataset


def _run_bundle(out, *args):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    cmd += ["--output_dir", str(out), "--progress", "False", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), proc.stdout


def test_demo_run_prints_dice_and_writes_outputs(tmp_path):
    summary, stdout = _run_bundle(tmp_path / "demo")
    assert "Dice" in stdout and "mean" in stdout
    assert summary["num_images"] == 8 and summary["num_failed"] == 0
    assert set(summary["per_class"]) == {"right_lung", "left_lung", "heart"}
    assert summary["dice_mean"] > 50
    preds = sorted(os.listdir(tmp_path / "demo" / "predictions"))
    assert len(preds) == 8
    assert np.asarray(Image.open(tmp_path / "demo" / "predictions" / preds[0])).shape == (192, 192)
    assert (tmp_path / "demo" / "overlays" / "montage.png").exists()
    assert summary["settings"]["strategy"] == "warp"
    assert set(summary["seconds_by_stage"]) >= {"sam_encoding_s", "warp_training_s", "prompting_and_sam_decoding_s"}


def test_real_jsrt_cases_reach_a_dice_floor(tmp_path):
    data = shared_dataset("jsrt")
    summary, _ = _run_bundle(tmp_path / "jsrt", "--dataset_dir", data, "--num_images", "3")
    assert summary["num_images"] == 3 and summary["num_scored"] == 3
    assert summary["per_class"]["right_lung"] > 85 and summary["per_class"]["left_lung"] > 85
    assert summary["dice_mean"] > 80, summary["per_class"]
    pred = np.asarray(Image.open(tmp_path / "jsrt" / "predictions" / "JPCLN002.png"))
    assert pred.shape == (512, 512) and set(np.unique(pred)) == {0, 1, 2, 3}
