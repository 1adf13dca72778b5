"""End-to-end: the bundle command (default config) on the embedded demo and on real cases of every shared dataset."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import ROOT, shared_dataset

# measured on these 4 cases with the default config: HC18 79.8, PH2 92.2 (2-core CPU, seed 0; 74.7 / 92.8 before the
# aligned source). On the 2026-12-02 machine (another CPU; main at 0b4c20d and 0.7.0 alike): HC18 86.9 (aligned),
# PH2 74.2: there the 4-case cohort's agreement is 0.784, above the 0.73 threshold, so PH2 keeps the warp; with 4
# images the cohort-level decision is borderline, so only HC18's is asserted (the 40-image benchmark takes aligned).
HC18_FLOOR, PH2_FLOOR = 70, 70


# third-party notices a normal run must not print (each is silenced where it arises, bundle/console.py)
NOISE = ("timm", "nvImageCodec", "grid_sample", "deprecated", "Warning", "\r")


def _run_bundle(out, *args, progress="False"):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    cmd += ["--output_dir", str(out), "--adapted_model", str(out / "model.pt"), "--progress", progress, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), proc


def test_demo_run_prints_dice_and_writes_outputs(tmp_path):
    # progress auto: stderr is a pipe here, as in a log file, so no progress frames
    summary, proc = _run_bundle(tmp_path / "demo", progress="auto")
    stdout = proc.stdout
    assert "Dice" in stdout and "mean" in stdout
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, noise
    log = proc.stderr + stdout
    assert "reference" in log and "results go to " + str(tmp_path / "demo") in log
    assert (tmp_path / "demo" / "report.html").exists() and (tmp_path / "demo" / "qc.csv").exists()
    assert summary["num_images"] == 8 and summary["num_failed"] == 0
    assert set(summary["per_class"]) == {"right_lung", "left_lung", "heart"}
    # 87.1 measured (seed 0, CPU); 75.7 when the fused strategy wrongly dropped the warp for the left lung
    assert summary["dice_mean"] > 80 and summary["per_class"]["left_lung"] > 70, summary["strategy_decisions"]
    preds = sorted(os.listdir(tmp_path / "demo" / "predictions"))
    assert len(preds) == 8
    assert np.asarray(Image.open(tmp_path / "demo" / "predictions" / preds[0])).shape == (192, 192)
    assert (tmp_path / "demo" / "overlays" / "montage.png").exists()
    assert (tmp_path / "demo" / "model.pt").exists()  # adapt once, infer many (configs/infer.yaml)
    assert summary["source"] == "choice"
    assert set(summary["strategy_decisions"]) == {"right_lung", "left_lung", "heart"}
    decisions = summary["strategy_decisions"].values()
    assert all(d["primary"] for d in decisions)  # anatomy in place: the warp's network serves every class
    # ... so the choice's gate measures nothing and no image is chosen per image (the search never runs)
    assert all(d["search_wins"] is None and not d["per_image"] for d in decisions)
    # SAM's own outline where it is sure (the right lung), the warped label where SAM is unsure (the demo's left lung)
    assert all(d["source"] == ("registration" if d["registration"] else "warp") for d in decisions)
    assert (
        all(0 < d["sam_iou"] <= 1 for d in decisions)
        and summary["strategy_decisions"]["right_lung"]["source"] == "warp"
    )
    assert summary["not_found"] == []
    stages = {"sam_encoding_s", "warp_training_s", "prompting_and_sam_decoding_s", "classifier_s"}
    assert "aligned_warp_training_s" not in summary["seconds_by_stage"]  # no second network when the warp is kept
    assert set(summary["seconds_by_stage"]) >= stages | {"other_s"}
    # each stage's own seconds (an encoding inside the classifier's fitting counts once): they add up to the whole run
    seconds = summary["seconds_by_stage"]
    assert all(v >= -0.05 for v in seconds.values()), seconds
    assert abs(sum(seconds.values()) - summary["seconds_total"]) < 0.1, seconds


def test_real_jsrt_cases_reach_a_dice_floor(tmp_path):
    data = shared_dataset("jsrt")
    summary, _ = _run_bundle(tmp_path / "jsrt", "--dataset_dir", data, "--num_images", "3")
    assert summary["num_images"] == 3 and summary["num_scored"] == 3
    assert summary["per_class"]["right_lung"] > 85 and summary["per_class"]["left_lung"] > 85
    assert summary["dice_mean"] > 80, summary["per_class"]
    pred = np.asarray(Image.open(tmp_path / "jsrt" / "predictions" / "JPCLN002.png"))
    assert pred.shape == (512, 512) and set(np.unique(pred)) == {0, 1, 2, 3}


def test_real_cases_where_the_structure_moves_reach_a_dice_floor(tmp_path):
    """HC18 fetal heads and PH2 lesions move and change size: the same default config must still find them."""
    floors = {"hc18": ("fetal_head", HC18_FLOOR), "ph2": ("lesion", PH2_FLOOR)}
    for name, (structure, floor) in floors.items():
        summary, _ = _run_bundle(tmp_path / name, "--dataset_dir", shared_dataset(name), "--num_images", "4")
        assert summary["num_scored"] == 4
        assert summary["per_class"][structure] > floor, (name, summary["per_class"], summary["strategy_decisions"])
        if name == "hc18":  # the warp loses the head: agreement 0.61 and warp similarity 0.14, far below both bars
            assert summary["strategy_decisions"][structure]["source"] == "aligned", summary["strategy_decisions"]
