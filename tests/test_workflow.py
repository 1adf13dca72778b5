import json
import os

import numpy as np
import pytest
from monai.bundle import ConfigParser
from PIL import Image

from bundle.io import InvalidReferenceError
from tests.conftest import ROOT, disk


def _dataset(root, n=4, size=(80, 96)):
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "labels", exist_ok=True)
    items = []
    for i in range(n):
        label = disk(size, (40 + 2 * i, 44 + i), 16).astype(np.uint8)
        image = np.where(label, 200, 50).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(label).save(root / "labels" / f"c{i}.png")
        items.append({"image": f"images/c{i}.png", "label": f"labels/c{i}.png"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "blob"}, "training": items}))
    return root


def _workflow(tmp_path, **overrides):
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "output_dir": str(tmp_path / "out"),
            "adapted_model": str(tmp_path / "out" / "model.pt"),
            "progress": False,
            "working_size": 64,
            "trainer#min_iterations": 3,
            "trainer#initial_epochs": 1,
            "trainer#round_epochs": 1,
            **overrides,
        }
    )
    return parser.get_parsed_content("workflow")


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_image", "reference image not found"),
        ("empty_label", "is empty"),
        ("size_mismatch", "px but the image"),
        ("unknown_value", "class map expects"),
    ],
)
def test_bad_reference_stops_before_any_work(tmp_path, breakage, message):
    root = _dataset(tmp_path / "data")
    if breakage == "missing_image":
        os.remove(root / "images" / "c0.png")
    elif breakage == "empty_label":
        Image.fromarray(np.zeros((80, 96), np.uint8)).save(root / "labels" / "c0.png")
    elif breakage == "size_mismatch":
        Image.fromarray(np.ones((40, 96), np.uint8)).save(root / "labels" / "c0.png")
    else:
        Image.fromarray(np.full((80, 96), 5, np.uint8)).save(root / "labels" / "c0.png")
    workflow = _workflow(tmp_path, dataset_dir=str(root))
    with pytest.raises(InvalidReferenceError, match=message):
        workflow.run()
    assert not os.path.exists(tmp_path / "out" / "checkpoints")  # no training started


def test_unreadable_target_is_reported_and_others_segmented(tmp_path):
    root = _dataset(tmp_path / "data")
    (root / "images" / "c2.png").write_bytes(b"not a png")
    workflow = _workflow(tmp_path, dataset_dir=str(root), strategy="registration")
    with pytest.raises(SystemExit, match="1 of 3 targets failed"):
        workflow.run()
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_failed"] == 1 and summary["num_images"] == 2
    assert "c2" in (out / "errors.csv").read_text()
    assert sorted(os.listdir(out / "predictions")) == ["c1.png", "c3.png"]
    pred = np.asarray(Image.open(out / "predictions" / "c1.png"))
    assert pred.shape == (80, 96) and set(np.unique(pred)) <= {0, 1}
    for key in ("dice_mean", "iou_mean", "per_class", "num_images", "seconds_total", "seconds_per_image"):
        assert key in summary
    assert summary["per_class"]["blob"] > 70
    assert (out / "overlays" / "c1.png").exists() and (out / "metrics.csv").read_text().startswith("id,dice_blob")
    peaks = summary["peak_memory_mb_by_stage"]  # which stage the run's memory peaks in
    assert set(peaks) >= {"warp_training_s", "prompting_and_sam_decoding_s"}
    assert 0 < peaks["warp_training_s"] <= peaks["prompting_and_sam_decoding_s"] == summary["peak_memory_mb"]


def _stamps(out):
    pred = out / "predictions"
    return {n: os.stat(pred / n).st_mtime_ns for n in sorted(os.listdir(pred))}


@pytest.mark.parametrize("change", [{"trainer#aug_weight": 0}, {"match_points": 4}, {"postprocessing#transforms": []}])
def test_any_config_change_into_the_same_output_dir_starts_afresh(tmp_path, change):
    root = _dataset(tmp_path / "data")
    job = {"dataset_dir": str(root), "strategy": "registration"}
    _workflow(tmp_path, **job).run()
    first = _stamps(tmp_path / "out")
    fingerprint = json.loads((tmp_path / "out" / "run_state.json").read_text())["fingerprint"]
    _workflow(tmp_path, **job).run()  # unchanged: everything is resumed, nothing rewritten
    assert _stamps(tmp_path / "out") == first
    assert json.loads((tmp_path / "out" / "run_state.json").read_text())["fingerprint"] == fingerprint
    _workflow(tmp_path, **job, **change).run()  # changed: a different job, every prediction made again
    again = _stamps(tmp_path / "out")
    assert set(again) == set(first) and all(again[n] != first[n] for n in first)
    assert json.loads((tmp_path / "out" / "run_state.json").read_text())["fingerprint"] != fingerprint


def test_an_adapted_model_of_another_job_is_not_overwritten_silently(tmp_path):
    root = _dataset(tmp_path / "data")
    shared = str(tmp_path / "models" / "model.pt")  # outside both output folders
    job = {"dataset_dir": str(root), "strategy": "registration", "adapted_model": shared}
    _workflow(tmp_path, **job).run()
    other = {**job, "output_dir": str(tmp_path / "other"), "working_size": 32}
    with pytest.raises(FileExistsError, match="overwrite_model"):
        _workflow(tmp_path, **other).run()
    assert not os.path.exists(tmp_path / "other" / "predictions")  # refused before any work
    _workflow(tmp_path, **other, overwrite_model=True).run()


def test_a_folder_of_images_without_a_datalist_is_segmented(tmp_path):
    root = _dataset(tmp_path / "data", n=4)
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "dataset.json").unlink()  # no datalist: the folder and the reference are all there is
    workflow = _workflow(
        tmp_path,
        image_dir=str(root / "images"),
        image_glob="c*",
        reference_image=str(root / "images" / "c0.png"),
        reference_label=str(root / "labels" / "c0.png"),
        class_names={1: "blob"},
        strategy="registration",
    )
    summary = workflow.run()
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "predictions")) == ["c1.png", "c2.png", "c3.png"]  # not the reference, no txt
    assert summary["num_images"] == 3 and summary["num_failed"] == 0
    assert summary["reference"]["image"].endswith("c0.png")
    with open(out / "qc.csv") as f:
        assert {line.split(",")[1] for line in f.read().splitlines()[1:]} == {"blob"}
    pred = np.asarray(Image.open(out / "predictions" / "c2.png"))
    assert (pred == 1).sum() > 0.5 * np.pi * 16**2


def test_a_folder_without_its_reference_is_refused(tmp_path):
    root = _dataset(tmp_path / "data", n=3)
    workflow = _workflow(tmp_path, image_dir=str(root / "images"), reference_image=str(root / "images" / "c0.png"))
    with pytest.raises(InvalidReferenceError, match="reference_label"):
        workflow.run()
