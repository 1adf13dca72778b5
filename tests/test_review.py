import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.utils import set_determinism
from PIL import Image

from bundle.qc import area_fractions, confidence, outline_stability, reference_stability, stability
from tests.test_workflow import _dataset, _workflow

BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome")


def test_confidence_is_low_only_for_the_result_that_strays_from_the_cohort():
    rng = np.random.default_rng(0)
    n = 20
    iou = rng.normal(0.85, 0.01, (n, 2))
    area = rng.normal(1.0, 0.05, (n, 2))
    support = rng.normal(0.6, 0.03, (n, 2))
    found = np.ones((n, 2), bool)
    area[3, 0] = 4.0  # four times the cohort's usual area
    iou[7, 1] = 0.4  # SAM much less sure than usual
    support[11, 0] = -0.2  # the locator does not back the mask
    found[15, 1] = False
    conf = confidence(iou, area, found, support)
    low = {(int(i), int(c)) for i, c in zip(*np.nonzero(conf < 0.5))}
    assert low == {(3, 0), (7, 1), (11, 0), (15, 1)}
    support[:10, 1] = 0.02  # half the cohort unsupported: no outlier, but each is below the absolute floor
    assert (confidence(iou, area, found, support)[:10, 1] < 0.5).all()
    assert conf[15, 1] == 0.0
    # NaN signals (not measured, e.g. the warped label serves the class) never flag by themselves
    iou[:, 0] = np.nan
    assert (confidence(iou, area, found, None)[:, 0] >= 0.5).sum() == n - 1


def test_a_cohort_that_mostly_fails_is_flagged_by_outlines_softer_than_the_references():
    """Half the cohort fails and is typical on every cohort-relative signal; only their softer outlines tell."""
    rng = np.random.default_rng(1)
    n = 20
    iou, support = rng.normal(0.88, 0.01, (n, 1)), rng.normal(0.6, 0.03, (n, 1))
    area, found = rng.normal(1.0, 0.05, (n, 1)), np.ones((n, 1), bool)
    stable = rng.normal(0.93, 0.01, (n, 1))
    stable[::2] = rng.normal(0.82, 0.02, (n // 2, 1))  # every other image: SAM hesitates over the outline
    assert (confidence(iou, area, found, support) >= 0.5).all()  # today's cohort-relative signals see nothing
    low = confidence(iou, area, found, support, stable, np.array([0.94])) < 0.5
    assert low[::2].all() and not low[1::2].any()
    # a reference sharper than anything in its cohort: the cohort's sharper quarter is the measure, no flood of flags
    assert (confidence(iou, area, found, support, stable, np.array([0.995]))[1::2] >= 0.5).all()
    assert (confidence(iou, area, found, support, stable, np.array([np.nan])) >= 0.5).all()  # unmeasured: no flag


def test_outline_stability_is_high_on_a_structure_and_low_where_the_mask_outlines_nothing():
    from bundle.sam import LiteMedSAM
    from bundle.store import EmbeddingStore, Reference

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 45) ** 2 + (xx - 45) ** 2 < 20**2
    image = rng.normal(60, 8, (128, 128))
    image[disk] = rng.normal(200, 8, disk.sum())
    image = np.clip(image, 0, 255).astype(np.uint8)
    nothing, straddle = np.zeros_like(disk), np.zeros_like(disk)
    nothing[80:115, 75:115] = True  # flat background
    straddle[30:75, 45:90] = True  # across the disk's edge
    store = EmbeddingStore(LiteMedSAM())
    embedding = store.embedding("x", image)
    sharp = outline_stability(store.sam, embedding, disk)
    assert sharp > 0.9
    assert outline_stability(store.sam, embedding, nothing) < sharp - 0.1
    assert outline_stability(store.sam, embedding, straddle) < sharp - 0.1
    assert np.isnan(outline_stability(store.sam, embedding, np.zeros_like(disk)))
    label = disk.astype(np.int64)
    assert np.allclose(reference_stability(store, Reference(image, label, 2)), [sharp, np.nan], equal_nan=True)
    logits = torch.full((3, 8, 8), -5.0)
    logits[0, 2:6, 2:6] = 5.0  # a step: sharp
    logits[1, 1:7, 1:7] = -0.5
    logits[1, 2:6, 2:6] = 0.5  # nothing above 1: all hesitation
    assert stability(logits)[:2].tolist() == [1.0, 0.0] and torch.isnan(stability(logits)[2])


def test_area_fractions_take_the_largest_slice():
    label = np.zeros((2, 10, 10), np.int64)
    label[0, :5] = 1
    label[1, :2] = 1
    label[1, 5:] = 2
    assert np.allclose(area_fractions(label, 3), [0.5, 0.5, 0.0])


def test_the_inferer_leaves_the_stability_decode_out_when_no_review_is_wanted(flagged_run):
    from bundle.dataset import PrepareTarget
    from bundle.inferer import OneShotInferer
    from bundle.io import Case
    from bundle.model import OneShotModel
    from bundle.sam import LiteMedSAM
    from bundle.store import EmbeddingStore

    store = EmbeddingStore(LiteMedSAM())
    model = OneShotModel.load(str(flagged_run / "model.pt"), store)
    target = PrepareTarget()(Case("c1", str(flagged_run.parent / "data" / "images" / "c1.png")))
    decodes = []
    predict = store.sam.predict
    store.sam.predict = lambda *a, **k: decodes.append(1) or predict(*a, **k)
    label, _, signals = OneShotInferer()(target, model, store)
    full = len(decodes)
    quick, _, quick_signals = OneShotInferer()(target, model, store, review=False)
    assert np.array_equal(label, quick) and label.any()
    assert np.isfinite(signals["stability"]).all() and np.isnan(quick_signals["stability"]).all()
    assert len(decodes) - full < full  # fewer SAM decodes without the review signal
    assert np.array_equal(signals["iou"], quick_signals["iou"])


@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory):
    """A cohort run of 9 targets where c6's image no longer shows its structure: its prediction is wrong."""
    set_determinism(seed=0)
    tmp_path = tmp_path_factory.mktemp("review")
    root = _dataset(tmp_path / "data", n=10)
    noise = np.random.default_rng(0).integers(40, 60, (80, 96)).astype(np.uint8)
    Image.fromarray(noise).save(root / "images" / "c6.png")
    _workflow(tmp_path, dataset_dir=str(root)).run()
    return tmp_path / "out"


def test_a_deliberately_wrong_prediction_is_flagged_and_shown_first(flagged_run):
    out = flagged_run
    with open(out / "qc.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows][0] == "c6"  # least confident first
    flagged = {r["id"] for r in rows if r["needs_review"] == "True"}
    assert "c6" in flagged and len(flagged) <= 3  # the failure, and only a minority of the 9 targets
    summary = json.loads((out / "summary.json").read_text())
    review = summary["review"]
    assert review["num_to_review"] == len(flagged) and review["to_review"][0] == "c6"
    dice = {r["id"]: float(r["dice"]) for r in rows}
    assert dice["c6"] < 0.8 and all(d > 0.9 for i, d in dice.items() if i != "c6")  # it is the wrong one
    assert review["num_scored"] == 9 and review["num_flagged_scored"] == len(flagged)
    assert (out / "overlays" / "c6.png").exists() and (out / "overlays" / "montage.png").exists()


def test_report_renders_in_a_real_headless_browser(flagged_run, tmp_path):
    page = flagged_run / "report.html"
    text = page.read_text()
    assert "c6" in text and "data:image/png;base64," in text and "Review list" in text
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing fetched
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        if os.environ.get("ONESHOT_REQUIRE_DATA"):
            pytest.fail("no headless browser (scripts/test.sh installs chromium-headless-shell)")
        pytest.skip("no headless browser")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert picture.shape[:2] == (1600, 1200)
    assert picture.std() > 20  # not blank: text, tables and the montage are drawn
    top = picture[:600]
    assert (top.std(-1) > 10).mean() > 0.02  # coloured pixels (the montage overlays, its legend) in the first screen


def test_review_table_recounts_a_finished_runs_flags_from_its_qc_csv(tmp_path):
    """scripts/review_table.py on a qc.csv: 12 typical images and one that strays (low IoU, unsupported, twice the
    area) and fails; the table counts it flagged and failing."""
    path = tmp_path / "qc.csv"
    fields = ["id", "class", "source", "sam_iou", "locator_support", "found", "area_vs_reference", "dice"]
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i in range(12):
            iou, sup, area = 0.9 + 0.01 * rng.standard_normal(), 0.6 + 0.02 * rng.standard_normal(), 1.0
            writer.writerow(dict(zip(fields, [f"c{i}", "lesion", "warp", iou, sup, True, area, 0.9])))
        writer.writerow(dict(zip(fields, ["bad", "lesion", "warp", 0.55, 0.02, True, 2.5, 0.05])))
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "review_table.py")
    out = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, check=True).stdout
    row = [line for line in out.splitlines() if str(path) in line][0]
    assert [cell.strip() for cell in row.split("|")[2:-1]] == ["13", "1 (8%)", "1", "1 of 1", "1 of 1"], out
