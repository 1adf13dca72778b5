"""scripts/benchmark.py end to end: every method it compares, on real images, so the comparison cannot break."""

import importlib
import os
import sys

from conftest import ROOT, shared_dataset


def _benchmark():
    # imported by name, so that the benchmark's spawned worker processes can unpickle its functions
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    return importlib.import_module("benchmark")


def test_every_benchmark_method_segments_two_real_images(tmp_path):
    jsrt = shared_dataset("jsrt")
    markdown = tmp_path / "table.md"
    args = ["--dataset_dir", jsrt, "--num_images", "2", "--methods", "bundle", "elastix", "ants"]
    results = _benchmark().main([*args, "--output_dir", str(tmp_path / "out"), "--markdown", str(markdown)])["jsrt"]

    rows = {name.split(",")[0]: summary for name, summary in results.items()}
    assert set(rows) == {"bundle", "elastix", "ants"}
    for name, summary in rows.items():
        assert summary["num_images"] == 2, name
        assert summary["seconds_per_image"] > 0 and summary["peak_memory_mb"] > 0, name
        # single-atlas propagation of JSRT's lungs and heart lands well above chance; a broken peer scores ~0
        assert summary["dice_mean"] > 60, (name, summary["dice_mean"])
        assert set(summary["per_class"]) == {"right_lung", "left_lung", "heart"}, name
    text = markdown.read_text()
    assert "| elastix |" in text and "| ants |" in text and "bundle, fused (default config)" in text
    assert "python scripts/benchmark.py" in text
