"""Cohort runs on clinical inputs: NIfTI and DICOM volumes, bad targets, huge images, crash and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from bundle.io import read_label_volume, read_volume, save_prediction
from tests.conftest import ROOT, disk
from tests.test_formats import _series
from tests.test_workflow import _dataset, _workflow

FAST = ["--progress", "False", "--working_size", "64", "--trainer#min_iterations", "3", "--trainer#initial_epochs", "1"]


def _ball(shape, centre, radius):
    """Boolean (x, y, z) ball, radius in voxels, shrinking towards its top and bottom slices."""
    xx, yy, zz = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (4 * (zz - centre[2])) ** 2 <= radius**2


def _nifti_case(root, name, centre, affine, labelled=True):
    shape = (64, 56, 6)
    label = np.zeros(shape, np.uint8)
    label[_ball(shape, centre, 14)] = 1
    label[centre[0] + 12 : centre[0] + 18, centre[1] - 22 : centre[1] - 16, 4] = 3  # small, on slice 4 only
    image = np.where(label > 0, 180.0, 40.0) + np.random.default_rng(len(name)).normal(0, 5, shape)
    image[..., 0] = 0  # a padding slice: constant, left empty
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(root / "images" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / f"{name}.nii.gz"))
    return {"image": f"images/{name}.nii.gz", **({"label": f"labels/{name}.nii.gz"} if labelled else {})}


def test_nifti_volumes_in_and_out_in_the_input_geometry(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    oblique = np.array([[0.0, -0.7, 0, 30], [0.8, 0, 0, -12], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    items = [
        _nifti_case(root, "a_ref", (30, 28, 3), np.diag([0.8, 0.8, 3.0, 1.0])),
        _nifti_case(root, "b", (34, 25, 3), oblique),
        _nifti_case(root, "c", (27, 31, 3), oblique @ np.diag([1.1, 1.0, 1.0, 1.0])),
    ]
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "organ", "3": "lesion"}, "training": items})
    )
    summary = _workflow(tmp_path, dataset_dir=str(root), strategy="registration").run()
    # per class, the reference slice where it is largest: the organ's slice 3, the lesion's slice 4
    # a sanity floor (measured 75-78 over seeds with this tiny training budget); the geometry checks are below
    assert summary["num_images"] == 2 and summary["per_class"]["organ"] > 60
    for name, centre in (("b", (34, 25, 3)), ("c", (27, 31, 3))):
        source = nib.load(str(root / "images" / f"{name}.nii.gz"))
        pred = nib.load(str(tmp_path / "out" / "predictions" / f"{name}.nii.gz"))
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)
        data = np.asarray(pred.dataobj)
        assert data[centre] == 1  # the organ's centre voxel is the organ at the same world position
        assert set(np.unique(data)) <= {0, 1, 3} and not data[..., 0].any()  # label values kept, padding empty


def _dicom_case(folder, shift):
    src = _series(folder, n=3)
    for k, name in enumerate(sorted(os.listdir(folder))):
        ds = pydicom.dcmread(folder / name)
        pixels = ds.pixel_array.copy()
        blob = disk(pixels.shape, (60 + shift[0], 70 + shift[1]), 24 - 4 * abs(k - 1))
        pixels[blob] = pixels[blob] + 600
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / name)
    return src


def test_dicom_series_gets_a_seg_that_overlays_its_source(tmp_path):
    root = tmp_path / "data"
    items = []
    for name, shift in (("p0", (0, 0)), ("p1", (6, -5)), ("p2", (-5, 4))):
        _dicom_case(root / "images" / name, shift)
        items.append({"image": f"images/{name}"})
    ref = read_volume(str(root / "images" / "p0"))
    label = np.stack([disk(ref.slices.shape[1:], (60, 70), 24 - 4 * abs(k - 1)) for k in range(3)]).astype(np.int64)
    save_prediction(label, str(root / "p0_label.nii.gz"), ref)
    items[0]["label"] = "p0_label.nii.gz"
    (root / "dataset.json").write_text(json.dumps({"labels": {"1": "mass"}, "training": items}))
    _workflow(tmp_path, dataset_dir=str(root), strategy="registration").run()
    out = tmp_path / "out" / "predictions"
    for name, shift in (("p1", (6, -5)), ("p2", (-5, 4))):
        assert (out / f"{name}.nii.gz").exists()
        seg = hd.seg.segread(str(out / f"{name}_seg.dcm"))
        assert seg.get_segment_description(1).segment_label == "mass"
        files = sorted(os.listdir(root / "images" / name))  # slice k of the series is file k (position order)
        nifti = read_label_volume(str(out / f"{name}.nii.gz"), read_volume(str(root / "images" / name)))
        for k, file in enumerate(files):
            source = pydicom.dcmread(root / "images" / name / file)
            mask = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
            assert mask.shape == (source.Rows, source.Columns)
            centre = (60 + shift[0], 70 + shift[1])
            assert mask[centre] == 1 and mask[5, 120] == 0  # the mass pixel of this source file, not a corner
            np.testing.assert_array_equal(mask, nifti[k])  # the SEG and the NIfTI say the same, pixel for pixel
            truth = disk(mask.shape, centre, 24 - 4 * abs(k - 1))
            assert 2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum()) > 0.6


@pytest.mark.parametrize(
    "breakage, message",
    [("unreadable", "cannot be read"), ("constant", "is constant")],
)
def test_bad_reference_image_stops_before_any_work(tmp_path, breakage, message):
    from bundle.io import InvalidReferenceError

    root = _dataset(tmp_path / "data")
    if breakage == "unreadable":
        (root / "images" / "c0.png").write_bytes(b"\x89PNG broken")
    else:
        Image.fromarray(np.full((80, 96), 7, np.uint8)).save(root / "images" / "c0.png")
    with pytest.raises(InvalidReferenceError, match=message) as err:
        _workflow(tmp_path, dataset_dir=str(root)).run()
    assert "c0.png" in str(err.value)
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def _bundle_run(data, out, *extra, **popen):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    cmd += [
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--adapted_model",
        str(out / "model.pt"),
        *FAST,
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_bad_targets_are_listed_the_rest_written_and_the_exit_status_says_so(tmp_path):
    root = _dataset(tmp_path / "data", n=6)
    (root / "images" / "c1.png").write_bytes(b"not a png")
    Image.fromarray(np.full((80, 96), 9, np.uint8)).save(root / "images" / "c2.png")
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(root / "images" / "c3.png")
    nan = np.full((96, 80), np.nan, np.float32)
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(root / "images" / "c4.nii.gz"))
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][4] = {"image": "images/c4.nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    proc = _bundle_run(root, tmp_path / "out", "--strategy", "registration")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "4 of 5 targets failed" in log
    with open(tmp_path / "out" / "errors.csv") as f:
        rows = {r.split(",")[0]: r for r in f.read().splitlines()[1:]}
    assert "cannot be read" in rows["c1"] and "is constant" in rows["c2"]
    assert "smaller than 32 px" in rows["c3"] and "non-finite" in rows["c4"]
    assert os.listdir(tmp_path / "out" / "predictions") == ["c5.png"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_failed"] == 4


def test_huge_image_is_processed_at_working_size_and_written_at_full_size(tmp_path):
    root = _dataset(tmp_path / "data", n=3)
    big = disk((6000, 7200), (75 * 42, 75 * 45), 75 * 16)  # the cohort's 80 x 96 picture, 75 times larger
    Image.fromarray(np.where(big, 200, 50).astype(np.uint8)).save(root / "images" / "c2.png")
    Image.fromarray(big.astype(np.uint8)).save(root / "labels" / "c2.png")
    summary = _workflow(tmp_path, dataset_dir=str(root), strategy="registration").run()
    pred = np.asarray(Image.open(tmp_path / "out" / "predictions" / "c2.png"))
    assert pred.shape == (6000, 7200)
    assert 2 * ((pred == 1) & big).sum() / ((pred == 1).sum() + big.sum()) > 0.8
    assert summary["peak_memory_mb"] < 8000


def _labels(out):
    pred = out / "predictions"
    return {n: np.asarray(Image.open(pred / n)) for n in sorted(os.listdir(pred))}


def test_killed_run_resumes_to_the_same_predictions_without_redoing_work(tmp_path):
    root = _dataset(tmp_path / "data", n=4)
    job = ["--strategy", "warp", "--rounds", "1", "--trainer#round_epochs", "60", "--trainer#batch_size", "2"]
    whole = _bundle_run(root, tmp_path / "whole", *job)
    assert whole.wait(timeout=900) == 0
    again = _bundle_run(root, tmp_path / "again", *job)  # same seed, CPU: the same label maps
    assert again.wait(timeout=900) == 0
    assert all(
        np.array_equal(a, b) for a, b in zip(_labels(tmp_path / "whole").values(), _labels(tmp_path / "again").values())
    )

    out = tmp_path / "killed"
    proc = _bundle_run(root, out, *job, start_new_session=True)
    checkpoints = out / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / "warp_round0.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2.0)  # well inside the 60-epoch (90-step) retraining round
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (checkpoints / "warp_round0.pt").exists() and not (checkpoints / "warp_round1.pt").exists()
    assert not (out / "predictions").exists() or not os.listdir(out / "predictions")

    resumed = _bundle_run(root, out, *job)
    log, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0 and "resumed from" in log and "warp_round0.pt" in log
    whole_labels, resumed_labels = _labels(tmp_path / "whole"), _labels(out)
    assert list(whole_labels) == list(resumed_labels) == ["c1.png", "c2.png", "c3.png"]
    assert all(np.array_equal(whole_labels[n], resumed_labels[n]) for n in whole_labels)

    # a finished image is not redone: remove one prediction, rerun, only that one is written again
    stamps = {n: os.stat(out / "predictions" / n).st_mtime_ns for n in whole_labels}
    os.remove(out / "predictions" / "c2.png")
    rerun = _bundle_run(root, out, *job)
    log, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0 and "2 of 3 targets already finished" in log
    assert "warp_round1.pt" in log  # training is not repeated: the last round's checkpoint is loaded
    for n in ("c1.png", "c3.png"):
        assert os.stat(out / "predictions" / n).st_mtime_ns == stamps[n]
    assert np.array_equal(_labels(out)["c2.png"], whole_labels["c2.png"])


def _edit_series(folder, edit):
    for name in sorted(os.listdir(folder)):
        ds = pydicom.dcmread(folder / name)
        edit(ds)
        ds.save_as(folder / name)


def _monochrome1(ds):
    ds.PhotometricInterpretation = "MONOCHROME1"


def _deidentified(ds):  # type-2 attributes dropped, as de-identification tools often do
    for keyword in ("PatientBirthDate", "PatientSex", "PatientID", "StudyID", "AccessionNumber", "StudyDate"):
        if keyword in ds:
            del ds[keyword]


def _broken_study(ds):  # a type-1 attribute missing: no SEG can be written for this series
    del ds.StudyInstanceUID


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    """A DICOM cohort: the reference labelled by a DICOM SEG (no label names in dataset.json), and targets that are
    MONOCHROME1 (p1), de-identified (p2) and without StudyInstanceUID (p3, its SEG cannot be written)."""
    from bundle.dicom import read_dicom_datasets
    from bundle.seg import write_dicom_seg

    tmp_path = tmp_path_factory.mktemp("dicom")
    root = tmp_path / "data"
    cases = (("p0", (0, 0), None), ("p1", (6, -5), _monochrome1), ("p2", (-5, 4), _deidentified))
    cases += (("p3", (3, 3), _broken_study),)
    items = []
    for name, shift, edit in cases:
        _dicom_case(root / "images" / name, shift)
        if edit is not None:
            _edit_series(root / "images" / name, edit)
        items.append({"image": f"images/{name}"})
    sources = read_dicom_datasets(str(root / "images" / "p0"))  # slice order
    label = np.stack([disk((sources[0].Rows, sources[0].Columns), (60, 70), 24 - 4 * abs(k - 1)) for k in range(3)])
    write_dicom_seg(label.astype(np.int64), sources, {1: "mass"}, str(root / "p0_seg.dcm"))
    items[0]["label"] = "p0_seg.dcm"
    (root / "dataset.json").write_text(json.dumps({"training": items}))
    with pytest.raises(SystemExit, match="1 of 3 targets failed"):
        _workflow(tmp_path, dataset_dir=str(root), strategy="registration").run()
    return root, tmp_path / "out"


def _seg_mask(seg_path, folder):
    seg = hd.seg.segread(str(seg_path))
    files = sorted(os.listdir(folder))
    uids = [pydicom.dcmread(folder / f).SOPInstanceUID for f in files]
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    return seg, masks[..., 0]


def test_a_dicom_seg_serves_as_the_reference_label(dicom_run):
    root, out = dicom_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"]["label"].endswith("p0_seg.dcm")
    assert (out / "metrics.csv").read_text().startswith("id,dice_mass")  # the segment's label names the class
    seg, masks = _seg_mask(out / "predictions" / "p2_seg.dcm", root / "images" / "p2")
    assert seg.get_segment_description(1).segment_label == "mass"
    assert masks[1][60 - 5, 70 + 4] == 1 and masks[1][5, 120] == 0


def test_a_monochrome1_series_gets_a_seg_over_the_right_pixels(dicom_run):
    root, out = dicom_run
    seg, masks = _seg_mask(out / "predictions" / "p1_seg.dcm", root / "images" / "p1")
    for k in range(3):
        truth = disk(masks[k].shape, (66, 65), 24 - 4 * abs(k - 1))
        assert 2 * (masks[k].astype(bool) & truth).sum() / (masks[k].sum() + truth.sum()) > 0.6


def test_a_seg_is_written_for_files_missing_type2_attributes(dicom_run):
    root, out = dicom_run
    seg = pydicom.dcmread(out / "predictions" / "p2_seg.dcm")
    assert seg.PatientBirthDate == "" and seg.StudyID == "" and seg.PatientID == ""
    assert seg.StudyInstanceUID == pydicom.dcmread(root / "images" / "p2" / "slice00.dcm").StudyInstanceUID


def test_a_seg_that_cannot_be_written_is_an_error_row_and_nothing_else_is_lost(dicom_run):
    root, out = dicom_run
    errors = (out / "errors.csv").read_text()
    assert "p3" in errors and "SEG" in errors
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["num_failed"] == 1 and summary["num_scored"] == 0
    assert {f for f in os.listdir(out / "predictions") if not f.endswith(".part")} == {
        "p1.nii.gz",
        "p1_seg.dcm",
        "p2.nii.gz",
        "p2_seg.dcm",
        "p3.nii.gz",  # its label map is still written
    }
    assert (out / "qc.csv").exists() and (out / "report.html").exists()
