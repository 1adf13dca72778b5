"""scripts/benchmark.py end to end: every method it compares, on real images, so the comparison cannot break."""

import importlib
import json
import os
import sys

import numpy as np
import pytest
from conftest import ROOT, shared_dataset


def _script(name: str = "benchmark"):
    # imported by name, so that the benchmark's spawned worker processes can unpickle its functions
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    return importlib.import_module(name)


def test_every_benchmark_method_segments_two_real_images(tmp_path):
    jsrt = shared_dataset("jsrt")
    markdown = tmp_path / "table.md"
    args = ["--dataset_dir", jsrt, "--num_images", "2", "--methods", "bundle", "elastix", "ants"]
    results = _script().main([*args, "--output_dir", str(tmp_path / "out"), "--markdown", str(markdown)])["jsrt"]

    rows = {name.split(",")[0]: summary for name, summary in results.items()}
    assert set(rows) == {"bundle", "elastix", "ants"}
    for name, summary in rows.items():
        assert summary["num_images"] == 2, name
        assert summary["seconds_per_image"] > 0 and summary["peak_memory_mb"] > 0, name
        # single-atlas propagation of JSRT's lungs and heart lands well above chance; a broken peer scores ~0
        assert summary["dice_mean"] > 60, (name, summary["dice_mean"])
        assert set(summary["per_class"]) == {"right_lung", "left_lung", "heart"}, name
    text = markdown.read_text()
    assert "| elastix |" in text and "| ants |" in text and "bundle, choice (default config)" in text
    assert "python scripts/benchmark.py" in text


def test_each_reference_of_the_spread_takes_the_cases_after_it_and_the_table_gives_their_spread(tmp_path):
    bench = _script()
    items = [{"image": f"images/case{i:02d}.png", "label": f"labels/case{i:02d}.png"} for i in range(12)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"labels": {"1": "x"}, "training": items[::-1]}))

    out = bench.split_dir(str(tmp_path / "data"), 5, 0, 3, str(tmp_path / "ref5"))
    listed = json.loads(open(os.path.join(out, "dataset.json")).read())["training"]
    assert [os.path.basename(i["image"]) for i in listed] == ["case05.png", "case06.png", "case07.png", "case08.png"]
    assert all(os.path.isabs(i["label"]) for i in listed)

    results = {f"reference {r}": {"dice_mean": d, "missed_share": 0.0} for r, d in [(1, 90.0), (11, 86.0), (21, 88.0)]}
    text = bench.spread_table(results)
    assert "| reference 11 | 86.0 | 0.0 |" in text
    assert "**88.0 +- 2.0**" in text  # sample standard deviation of 90, 86, 88


def test_a_reference_within_the_tuning_split_takes_the_splits_other_cases_and_nothing_after_it(tmp_path):
    from bundle.dataset import load_datalist

    bench = _script()
    items = [{"image": f"images/case{i:02d}.png", "label": f"labels/case{i:02d}.png"} for i in range(12)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"labels": {"1": "x"}, "training": items[::-1]}))

    data, image = bench.tuning_dir(str(tmp_path / "data"), 2, 4, str(tmp_path / "ref2"))
    assert os.path.basename(image) == "case02.png"
    # the bundle, given that reference, segments the split's four other cases: none from after the split
    reference, targets, _ = load_datalist(data, reference_image=image)
    assert reference.image_path == image and reference.label_path.endswith("case02.png")
    assert [os.path.basename(t.image_path) for t in targets] == [f"case{i:02d}.png" for i in (0, 1, 3, 4)]
    with pytest.raises(ValueError, match="not among the tuning split"):
        bench.tuning_dir(str(tmp_path / "data"), 5, 4, str(tmp_path / "ref5"))


def test_the_true_box_ceiling_scores_sams_masks_from_each_structures_box():
    box_ceiling = _script("box_ceiling")
    summary = box_ceiling.ceiling(shared_dataset("jsrt"), num_images=2)
    assert set(summary["per_class"]) == {"right_lung", "left_lung", "heart"}
    # the true box around a lung gives LiteMedSAM the lung; a mislabelled or misplaced box scores far lower
    assert summary["per_class"]["right_lung"] > 85 and summary["per_class"]["left_lung"] > 85, summary
    assert summary["missed_share"] == 0


def test_true_boxes_bound_each_present_class():
    box_ceiling = _script("box_ceiling")
    truth = np.zeros((20, 30), np.uint8)
    truth[2:5, 3:9] = 1
    truth[10:18, 20:25] = 3
    present, boxes = box_ceiling.true_boxes(truth, 3)
    assert present == [1, 3]
    assert boxes.tolist() == [[3, 2, 9, 5], [20, 10, 25, 18]]
