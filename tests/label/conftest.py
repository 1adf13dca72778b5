"""Fixtures of the MONAI Label tests (run in .venv-label by scripts/test_label.sh; the main suite skips them)."""

import copy
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, shared_dataset

# a JSRT case not used for the adaptation (the reference is case 0, the adaptation targets cases 1-3)
TEST_CASE = "JPCLN011"
CONF = {"sam2": "false", "zoo_source": "local"}
# a volume's geometry: anisotropic spacing, an oblique direction and an origin, so that a lost affine shows
_TILT = np.deg2rad(5.0)
AFFINE = np.eye(4)
AFFINE[:3, :3] = np.array(
    [[1.0, 0.0, 0.0], [0.0, np.cos(_TILT), -np.sin(_TILT)], [0.0, np.sin(_TILT), np.cos(_TILT)]]
) @ np.diag([-0.175, 0.175, 2.5])
AFFINE[:3, 3] = [40.0, -12.0, 3.0]


@pytest.fixture(scope="session")
def jsrt() -> str:
    return shared_dataset("jsrt")


@pytest.fixture(scope="session")
def adapted_model(tmp_path_factory, jsrt) -> str:
    """A fitted model from a short fused adaptation on the first JSRT cases (fast settings), in a temporary folder.

    ONESHOT_LABEL_MODEL names an adapted model made by this fixture before, to skip the adaptation while developing.
    """
    if os.environ.get("ONESHOT_LABEL_MODEL"):
        return os.environ["ONESHOT_LABEL_MODEL"]
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    out = tmp_path_factory.mktemp("adaptation")
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "dataset_dir": jsrt,
            "num_images": 3,
            "output_dir": str(out / "cohort"),
            "adapted_model": str(out / "model.pt"),
            "progress": False,
            "num_overlays": 0,
            **FAST,
        }
    )
    set_determinism(seed=0)
    parser.get_parsed_content("workflow").run()
    return str(out / "model.pt")


# the adaptation's fast settings (the fixture's and the train task's in these tests)
FAST = {"working_size": 96, "self_training": 1, "trainer#initial_epochs": 20, "trainer#min_iterations": 60}


def jsrt_image(jsrt: str, case: str = TEST_CASE) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(jsrt, "images", f"{case}.png")))


def truth(jsrt: str, case: str = TEST_CASE) -> np.ndarray:
    from bundle.io import read_label

    return read_label(os.path.join(jsrt, "labels", f"{case}.png"))


def mean_dice(prediction: np.ndarray, reference: np.ndarray, values=(1, 2, 3)) -> float:
    scores = []
    for v in values:
        a, b = prediction == v, reference == v
        scores.append(200.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return float(np.mean(scores))


def write_volume(jsrt: str, path: str) -> np.ndarray:
    """A 3-slice NIfTI volume of the test case (slices: the image, its 8-bit negative-free brighter copy, the image
    again), with ``AFFINE``; returns the (x, y, z) array."""
    image = jsrt_image(jsrt).T.astype(np.float32)  # (x = column, y = row)
    volume = np.stack([image, np.clip(image * 1.1, 0, 255), image], axis=-1)
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    return volume


def write_dicom_series(jsrt: str, folder: str, n: int = 3) -> None:
    """The test case as an n-slice DICOM series (pydicom's CT_small as the template: geometry, UIDs replaced)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = jsrt_image(jsrt).astype(np.uint16)
    os.makedirs(folder, exist_ok=True)
    series = generate_uid()
    for k in range(n):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        ds.ImagePositionPatient = [-100.0, -120.0, 30.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels.tobytes()
        ds.save_as(os.path.join(folder, f"slice{k:02d}.dcm"))


def studies_with(folder, jsrt: str, cases=(TEST_CASE,)) -> str:
    """A MONAI Label studies folder holding copies of JSRT images."""
    os.makedirs(folder, exist_ok=True)
    for case in cases:
        shutil.copy(os.path.join(jsrt, "images", f"{case}.png"), os.path.join(folder, f"{case}.png"))
    return str(folder)
