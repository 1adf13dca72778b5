"""Reading every supported input kind into (Z, H, W) slices, in one orientation, and writing results back."""

import copy
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bundle.io import read_image, read_label_volume, read_volume, save_prediction, to_array
from bundle.transforms import scale_intensity


def _asymmetric(h=40, w=56):
    arr = np.zeros((h, w), np.float32)
    arr[2:6, 3:12] = 1.0  # top-left block only: a transpose or flip moves it
    return arr


@pytest.mark.parametrize(
    "name, mode, scale",
    [("g8.png", "L", 255), ("g16.png", "I;16", 60000), ("g.bmp", "L", 200), ("g.tif", "L", 255), ("g.jpg", "L", 255)],
)
def test_grey_raster_kinds_are_row_column(tmp_path, name, mode, scale):
    arr = (_asymmetric() * scale).astype(np.uint16 if mode == "I;16" else np.uint8)
    Image.fromarray(arr).save(tmp_path / name)
    volume = read_volume(str(tmp_path / name))
    assert volume.kind == "raster" and not volume.is_3d and volume.slices.shape == (1, 40, 56)
    tol = 40 if name.endswith(".jpg") else 0  # lossy
    np.testing.assert_allclose(volume.slices[0][:10, :14], arr[:10, :14], atol=tol)
    assert volume.slices[0][30:, 40:].max() <= tol


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_raster_drops_alpha(tmp_path, channels):
    arr = np.zeros((40, 56, channels), np.uint8)
    arr[2:6, 3:12, 0] = 200
    if channels == 4:
        arr[..., 3] = 255
    Image.fromarray(arr).save(tmp_path / "c.png")
    image, _ = read_image(str(tmp_path / "c.png"))
    assert image.shape == (40, 56, 3) and image[3, 5, 0] == 200 and image[30, 50].max() == 0


def test_single_frame_dicom_matches_pydicom_rows_and_columns():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert volume.kind == "dicom" and volume.slices.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_allclose(volume.slices[0], expected)


def test_multi_frame_dicom_is_a_stack_of_frames():
    path = get_testdata_file("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.is_3d and volume.slices.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns, 3)
    frames = ds.pixel_array  # (frames, rows, columns, 3), RGB
    assert np.abs(volume.slices[7] - frames[7]).mean() < 3  # JPEG decoders differ by a grey level at most


def _series(folder, n=4, reverse_numbers=True):
    """A CT series from pydicom's CT_small: slice k is shifted along the normal by 2.5 mm * k and carries k in a
    corner; instance numbers run against the position so that sorting by them would reverse the volume."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    os.makedirs(folder, exist_ok=True)
    series = generate_uid()
    row, col = np.array(src.ImageOrientationPatient[:3], float), np.array(src.ImageOrientationPatient[3:], float)
    normal, origin = np.cross(row, col), np.array(src.ImagePositionPatient, float)
    for k in range(n):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = n - k if reverse_numbers else k + 1
        ds.ImagePositionPatient = [float(v) for v in origin + 2.5 * k * normal]
        pixels = src.pixel_array.copy()
        pixels[:6, :6] = 100 * (k + 1)
        ds.PixelData = pixels.tobytes()
        ds.save_as(os.path.join(folder, f"slice{k:02d}.dcm"))
    return src


def test_dicom_series_folder_is_a_volume_in_position_order(tmp_path):
    src = _series(tmp_path / "series")
    volume = read_volume(str(tmp_path / "series"))
    assert volume.is_3d and volume.slices.shape == (4, src.Rows, src.Columns)
    corners = volume.slices[:, 0, 0] - float(src.RescaleIntercept)
    np.testing.assert_allclose(corners, [100, 200, 300, 400])  # ascending along the normal, not by instance number
    affine = np.asarray(volume.meta["original_affine"], float)  # RAS, for the (x, y, z) array
    for k, name in enumerate(sorted(os.listdir(tmp_path / "series"))):
        ipp = np.array(pydicom.dcmread(tmp_path / "series" / name).ImagePositionPatient, float)
        ras = affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], ipp, atol=1e-3)  # slice k sits where file k says


def test_nifti_volume_slices_and_round_trip(tmp_path):
    affine = np.array([[0.0, -0.8, 0, 20], [0.9, 0, 0, -5], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    data = np.zeros((50, 40, 6), np.float32)  # (x, y, z)
    data[45, 3, 4] = 9.0
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    volume = read_volume(str(tmp_path / "v.nii.gz"))
    assert volume.slices.shape == (6, 40, 50) and volume.slices[4, 3, 45] == 9.0  # slice z, row y, column x
    np.testing.assert_array_equal(to_array(volume.slices, volume), data)
    across = read_volume(str(tmp_path / "v.nii.gz"), slice_axis=0)
    assert across.slices.shape == (50, 6, 40) and across.slices[45, 4, 3] == 9.0
    out = save_prediction((volume.slices > 0).astype(np.int64), str(tmp_path / "p.nii.gz"), volume)
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert back.shape == data.shape and np.asarray(back.dataobj)[45, 3, 4] == 1 and np.asarray(back.dataobj).sum() == 1
    np.testing.assert_array_equal(read_label_volume(out, volume), volume.slices > 0)


def test_one_slice_volume_keeps_its_layout(tmp_path):
    data = np.zeros((30, 1, 40), np.float32)  # a coronal slice stored as (x, 1, z)
    data[2, 0, 35] = 1.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "c.nii"))
    volume = read_volume(str(tmp_path / "c.nii"))
    assert not volume.is_3d and volume.slices.shape == (1, 40, 30) and volume.slices[0, 35, 2] == 1.0
    assert to_array(volume.slices, volume).shape == (30, 1, 40)


def test_intensity_window_and_percentiles():
    ct = np.linspace(-1000, 3000, 64 * 64, dtype=np.float32).reshape(64, 64)
    windowed = scale_intensity(ct, window=(40, 400))
    assert windowed.min() == 0 and windowed.max() == 255
    assert windowed[ct <= -160].max() == 0 and windowed[ct >= 240].min() == 255
    spiky = np.random.default_rng(0).normal(500, 50, (64, 64)).astype(np.float32)
    spiky[0, 0] = 1e6
    robust = scale_intensity(spiky)
    assert robust.max() == 255 and np.median(robust) > 100  # one extreme pixel does not flatten the contrast
    eight_bit = np.arange(256, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(scale_intensity(eight_bit), eight_bit)
    with pytest.raises(ValueError, match="width"):
        scale_intensity(ct, window=(40, 0))
