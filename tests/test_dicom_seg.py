import json
import os

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bundle.dicom import dicom_pixels, read_dicom_datasets, read_dicom_volume, sort_slices
from bundle.seg import ALGORITHM_NAME, SERIES_DESCRIPTION, write_dicom_seg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, COLS, SLICES = 96, 128, 3
# an oblique orientation: unit row and column directions, orthogonal to each other
ROW_DIR = np.array([np.cos(0.5), np.sin(0.5), 0.0])
COL_DIR = np.array([-np.sin(0.5) * np.cos(0.3), np.cos(0.5) * np.cos(0.3), -np.sin(0.3)])
NORMAL = np.cross(ROW_DIR, COL_DIR)
ORIGIN = np.array([-40.0, 25.0, 110.0])
THICKNESS = 5.0


def _testdata(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


def _version() -> str:
    with open(os.path.join(ROOT, "configs", "metadata.json")) as f:
        return json.load(f)["version"]


def _geometry(ds, frame: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(position, row direction, column direction, (row spacing, column spacing)) of a plane or of one frame."""
    if frame is None:
        ipp, iop, spacing = ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    else:
        shared = ds.SharedFunctionalGroupsSequence[0]
        per = ds.PerFrameFunctionalGroupsSequence[frame]

        def group(name):
            return (per if name in per else shared)[name][0]

        ipp = group("PlanePositionSequence").ImagePositionPatient
        iop = group("PlaneOrientationSequence").ImageOrientationPatient
        spacing = group("PixelMeasuresSequence").PixelSpacing
    iop = np.asarray(iop, float)
    return np.asarray(ipp, float), iop[:3], iop[3:], np.asarray(spacing, float)


def _to_patient(geometry, r: int, c: int) -> np.ndarray:
    ipp, row_dir, col_dir, spacing = geometry
    return ipp + c * spacing[1] * row_dir + r * spacing[0] * col_dir


def _to_pixel(geometry, point: np.ndarray) -> tuple[float, float, float]:
    """(row, column, distance from the plane) of a patient point."""
    ipp, row_dir, col_dir, spacing = geometry
    d = point - ipp
    return d @ col_dir / spacing[0], d @ row_dir / spacing[1], d @ np.cross(row_dir, col_dir)


def _make_series(folder, spacing: tuple[float, float] | None = None) -> list[pydicom.Dataset]:
    """Three oblique CT slices from CT_small, cropped to 96 x 128, in position order k = 0, 1, 2.

    Slice k holds CT_small's pixels plus 100 * k; instance numbers and file names do not follow the position order.
    ``spacing``: (row, column) PixelSpacing instead of CT_small's.
    """
    folder.mkdir(exist_ok=True)
    pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array[:ROWS, :COLS]
    series_uid = generate_uid()
    slices = []
    for k, (instance, name) in enumerate(zip([2, 3, 1], ["b.dcm", "c.dcm", "a.dcm"])):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = instance
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*ROW_DIR, *COL_DIR)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in ORIGIN + k * THICKNESS * NORMAL]
        ds.SliceThickness = THICKNESS
        ds.Rows, ds.Columns = ROWS, COLS
        if spacing is not None:
            ds.PixelSpacing = list(spacing)
        ds.PixelData = (pixels + 100 * k).astype(np.int16).tobytes()
        ds.save_as(folder / name)
        slices.append(pydicom.dcmread(folder / name))
    return slices


def _series_label() -> np.ndarray:
    """Class 1 in a different top-left block on each slice; class 2 only on slice 0, bottom right."""
    label = np.zeros((SLICES, ROWS, COLS), np.uint8)
    for k in range(SLICES):
        label[k, 4 + 20 * k : 9 + 20 * k, 6 + 30 * k : 14 + 30 * k] = 1
    label[0, 80:90, 100:120] = 2
    return label


def _source_uid(frame_item) -> tuple[str, int | None]:
    ref = frame_item.DerivationImageSequence[0].SourceImageSequence[0]
    frames = ref.get("ReferencedFrameNumber")
    return ref.ReferencedSOPInstanceUID, (int(frames) if frames is not None else None)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm"])
def test_single_frame_seg_reads_back_and_overlays(tmp_path, name):
    source = pydicom.dcmread(get_testdata_file(name))
    rows, cols = int(source.Rows), int(source.Columns)
    label = np.zeros((rows, cols), np.int64)
    label[3:10, 20:40] = 1  # top-left, wider than tall: a transpose or flip moves it
    label[rows - 10 : rows - 4, 2:6] = 3
    names = {1: "lung", 3: "heart", 5: "absent"}
    assert dicom_pixels(source).shape[:3] == (1, rows, cols)
    out = write_dicom_seg(label, source, names, str(tmp_path / "out" / "seg.dcm"))

    assert out == str(tmp_path / "out" / "seg.dcm")
    assert os.listdir(tmp_path / "out") == ["seg.dcm"]
    seg = hd.seg.segread(out)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == SERIES_DESCRIPTION
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientID == source.PatientID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "heart", "absent"]
    for item in seg.SegmentSequence:
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ALGORITHM_NAME
        assert algorithm.AlgorithmVersion == _version()
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"
    assert [uid for _, _, uid in seg.get_source_image_uids()] == [source.SOPInstanceUID]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert _source_uid(frame)[0] == source.SOPInstanceUID

    masks = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3])
    assert masks.shape == (1, rows, cols, 3)
    np.testing.assert_array_equal(masks[0, ..., 0], label == 1)
    np.testing.assert_array_equal(masks[0, ..., 1], label == 3)
    assert not masks[..., 2].any()
    assert masks[0, 5, 25, 0] == 1 and masks[0, 25, 5, 0] == 0
    assert masks[0, rows - 5, 3, 1] == 1 and masks[0, 4, 3, 1] == 0


def test_slices_sorted_along_the_normal(tmp_path):
    made = _make_series(tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not DICOM, skipped")
    volume, datasets, _ = read_dicom_volume(str(tmp_path / "series"))

    assert [d.SOPInstanceUID for d in datasets] == [d.SOPInstanceUID for d in made]
    positions = [np.asarray(d.ImagePositionPatient, float) @ NORMAL for d in datasets]
    assert positions == sorted(positions) and positions[0] < positions[-1]
    assert volume.shape == (SLICES, ROWS, COLS) and volume.dtype == np.float32
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(SLICES):
        expected = (ct.pixel_array[:ROWS, :COLS] + 100 * k) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
        np.testing.assert_array_equal(volume[k], expected)

    by_instance = sort_slices(list(reversed(datasets)), by="instance")
    assert [int(d.InstanceNumber) for d in by_instance] == [1, 2, 3]
    for d in made:
        del d.ImagePositionPatient
    assert [int(d.InstanceNumber) for d in sort_slices(made)] == [1, 2, 3]


def test_series_seg_frames_point_to_their_slices(tmp_path):
    made = _make_series(tmp_path / "series")  # in position order, as the label
    _, datasets, _ = read_dicom_volume(str(tmp_path / "series"))
    label = _series_label()
    path = write_dicom_seg(label, datasets, ["organ", "lesion"], str(tmp_path / "seg.dcm"), version="9.9")

    seg = pydicom.dcmread(path)
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "9.9"
    by_uid = {d.SOPInstanceUID: (k, d) for k, d in enumerate(made)}
    frames = seg.pixel_array.reshape(-1, ROWS, COLS)
    assert len(frames) == SLICES + 1  # class 1 on every slice, class 2 on slice 0; empty frames omitted
    seen = set()
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid, _ = _source_uid(item)
        k, source = by_uid[uid]
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        seen.add((k, segment))
        np.testing.assert_array_equal(frames[i], label[k] == segment)
        seg_geometry, src_geometry = _geometry(seg, i), _geometry(source)
        np.testing.assert_allclose(seg_geometry[0], src_geometry[0], atol=1e-3)
        for r, c in zip(*np.nonzero(frames[i])):
            point = _to_patient(seg_geometry, r, c)
            np.testing.assert_allclose(point, _to_patient(src_geometry, r, c), atol=1e-3)
            # the labelled point lies on exactly one source slice, at the same pixel, labelled with this class
            hits = [(z, _to_pixel(_geometry(d), point)) for z, d in enumerate(made)]
            hits = [(z, rr, cc) for z, (rr, cc, dist) in hits if abs(dist) < 1e-3]
            assert len(hits) == 1
            z, rr, cc = hits[0]
            assert z == k and label[z, int(round(rr)), int(round(cc))] == segment
    assert seen == {(0, 1), (1, 1), (2, 1), (0, 2)}

    hd_seg = hd.seg.segread(path)
    masks = hd_seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in made], segment_numbers=[1, 2])
    np.testing.assert_array_equal(masks[..., 0], label == 1)
    np.testing.assert_array_equal(masks[..., 1], label == 2)
    reversed_masks = hd_seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in reversed(made)])
    assert not np.array_equal(reversed_masks[..., 0], label == 1)


def test_multi_frame_source(tmp_path):
    volume, datasets, _ = read_dicom_volume(_enhanced(tmp_path, spacing=None))

    assert len(datasets) == 1 and int(datasets[0].NumberOfFrames) == SLICES
    source = datasets[0]
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    label = np.zeros((SLICES, ROWS, COLS), np.int64)
    for i in range(SLICES):
        # frame i carries the pixels of the generated slice at its position: frame order is the stored order
        k = int(round((_geometry(source, i)[0] - ORIGIN) @ NORMAL / THICKNESS))
        expected = (ct.pixel_array[:ROWS, :COLS] + 100 * k) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
        np.testing.assert_array_equal(volume[i], expected)
        label[i, 5 + 25 * i : 10 + 25 * i, 3 + 40 * i : 9 + 40 * i] = 1

    path = write_dicom_seg(label, source, {1: "organ"}, str(tmp_path / "seg.dcm"))
    seg = hd.seg.segread(path)
    masks = seg.get_pixels_by_source_frame(source.SOPInstanceUID, [1, 2, 3], segment_numbers=[1])
    np.testing.assert_array_equal(masks[..., 0], label == 1)
    frames = seg.pixel_array.reshape(-1, ROWS, COLS)
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid, number = _source_uid(item)
        assert uid == source.SOPInstanceUID
        np.testing.assert_array_equal(frames[i], label[number - 1] == 1)
        np.testing.assert_allclose(_geometry(seg, i)[0], _geometry(source, number - 1)[0], atol=1e-3)


def test_enhanced_mr_from_pydicom_if_shipped(tmp_path):
    source = pydicom.dcmread(_testdata("emri_small.dcm"))
    volume = dicom_pixels(source)
    label = np.zeros(volume.shape, np.int64)
    label[:, 1:4, 2:8] = 1
    path = write_dicom_seg(label, source, ["structure"], str(tmp_path / "seg.dcm"))
    masks = hd.seg.segread(path).get_pixels_by_source_frame(
        source.SOPInstanceUID, list(range(1, len(volume) + 1)), segment_numbers=[1]
    )
    np.testing.assert_array_equal(masks[..., 0], label == 1)


def test_empty_label_writes_empty_frames(tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    path = write_dicom_seg(np.zeros((128, 128), np.uint8), [source], {1: "lung", 2: "heart"}, str(tmp_path / "s.dcm"))
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "heart"]
    masks = seg.get_pixels_by_source_instance([source.SOPInstanceUID])
    assert masks.shape == (1, 128, 128, 2) and not masks.any()


def test_unsupported_inputs_raise_naming_the_file(tmp_path):
    report = get_testdata_file("test-SR.dcm")
    with pytest.raises(ValueError, match="test-SR.dcm.*no pixel data"):
        read_dicom_volume(report)
    with pytest.raises(ValueError, match="test-SR.dcm"):
        write_dicom_seg(np.zeros((4, 4), np.uint8), pydicom.dcmread(report), ["a"], str(tmp_path / "s.dcm"))
    dose = get_testdata_file("rtdose.dcm")
    with pytest.raises(ValueError, match="rtdose.dcm.*not supported"):
        write_dicom_seg(np.zeros((15, 10, 10), np.uint8), pydicom.dcmread(dose), ["a"], str(tmp_path / "s.dcm"))
    text = tmp_path / "notes.dcm"
    text.write_text("not dicom")
    with pytest.raises(ValueError, match="notes.dcm"):
        read_dicom_datasets(str(text))
    assert not (tmp_path / "s.dcm").exists() and not (tmp_path / "s.dcm.part").exists()


def test_folder_and_label_checks(tmp_path):
    _make_series(tmp_path / "series")
    other = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    other.save_as(tmp_path / "series" / "other.dcm")
    with pytest.raises(ValueError, match="2 series"):
        read_dicom_datasets(str(tmp_path / "series"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM image"):
        read_dicom_datasets(str(tmp_path / "empty"))

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    label = np.zeros((128, 128), np.uint8)
    label[0, 0] = 4
    with pytest.raises(ValueError, match=r"\[4\]"):
        write_dicom_seg(label, source, {1: "lung"}, str(tmp_path / "s.dcm"))
    with pytest.raises(ValueError, match="does not match"):
        write_dicom_seg(np.zeros((2, 128, 128), np.uint8), source, {1: "lung"}, str(tmp_path / "s.dcm"))


def _itk(path: str):
    """What MONAI's ITKReader makes of ``path``: the (C, x, y, z) array and its metadata."""
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    data = LoadImage(image_only=True, ensure_channel_first=True, reader=ITKReader())(path)
    return np.asarray(data), data.meta


def _edited(tmp_path, name: str, edit) -> str:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    edit(ds)
    ds.save_as(tmp_path / name)
    return str(tmp_path / name)


def _secondary_capture(ds):  # no position or orientation: a 2D picture with a pixel spacing
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage


def _radiograph(ds):  # projection radiograph: ITK takes the detector spacing
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.ImagerPixelSpacing = [0.2, 0.3]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation


def _enhanced(tmp_path, spacing: tuple[float, float] | None = (0.7, 0.9)) -> str:
    """A legacy-converted enhanced CT of the oblique series: its frames are stored against the position order."""
    slices = _make_series(tmp_path / "series", spacing=spacing)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices,
        series_instance_uid=generate_uid(),
        series_number=7,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    return str(tmp_path / "enhanced.dcm")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: (_make_series(t / "s", spacing=(0.7, 0.9)), str(t / "s"))[1], id="oblique-series"),
        pytest.param(_enhanced, id="enhanced-multi-frame"),
        pytest.param(lambda t: get_testdata_file("CT_small.dcm"), id="ct-slice"),
        pytest.param(lambda t: get_testdata_file("MR_small.dcm"), id="mr-slice-no-slice-spacing"),
        pytest.param(lambda t: get_testdata_file("examples_rgb_color.dcm"), id="rgb-no-geometry"),
        pytest.param(lambda t: _edited(t, "sc.dcm", _secondary_capture), id="secondary-capture"),
        pytest.param(lambda t: _edited(t, "dx.dcm", _radiograph), id="radiograph"),
    ],
)
def test_one_pass_geometry_and_pixels_are_monai_itk_readers(tmp_path, make):
    from bundle.io import read_volume, save_prediction

    path = make(tmp_path)
    pixels, sources, meta = read_dicom_volume(path)
    itk_array, itk_meta = _itk(path)
    expected = np.asarray(itk_meta["original_affine"], float)
    np.testing.assert_allclose(meta["original_affine"], expected, atol=1e-4)
    np.testing.assert_allclose(meta["affine"], np.asarray(itk_meta["affine"], float), atol=1e-4)
    np.testing.assert_array_equal(meta["spatial_shape"], np.asarray(itk_meta["spatial_shape"]))
    # (C, x = column, y = row, z = slice) -> (Z, H, W[, C]); MONOCHROME2 and RGB: the same values, not just close
    itk_pixels = itk_array.transpose(3, 2, 1, 0)
    np.testing.assert_array_equal(pixels, itk_pixels if pixels.ndim == 4 else itk_pixels[..., 0])
    assert all(not any(k in ds for k in ("PixelData", "FloatPixelData")) for ds in sources)

    volume = read_volume(path)
    assert volume.dicom_sources is not None and volume.axis == 2
    out = save_prediction(np.zeros(volume.slices.shape[:3], np.uint8), str(tmp_path / "p.nii.gz"), volume)
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, expected, atol=1e-4)
    assert written.shape == tuple(int(v) for v in itk_meta["spatial_shape"])


def _counting_reads(monkeypatch) -> dict[str, int]:
    """Counts ``pydicom.dcmread`` calls per file from now on; MONAI's readers (ITK, pydicom) fail if used."""
    import bundle.io

    reads: dict[str, int] = {}
    dcmread = pydicom.dcmread

    def counted(fp, *args, **kwargs):
        key = os.path.realpath(fp) if isinstance(fp, (str, os.PathLike)) else repr(fp)
        reads[key] = reads.get(key, 0) + 1
        return dcmread(fp, *args, **kwargs)

    def no_monai_reader(reader):
        raise AssertionError(f"read again through MONAI's {reader} reader")

    monkeypatch.setattr(pydicom, "dcmread", counted)
    monkeypatch.setattr(bundle.io, "_loader", no_monai_reader)
    return reads


def test_a_dicom_target_is_read_once_from_preparing_to_its_seg(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bundle.dataset import PrepareTarget
    from bundle.evaluator import OneShotEvaluator
    from bundle.io import Case, read_label_volume

    made = _make_series(tmp_path / "series")  # position order k = 0, 1, 2; files b, c, a
    files = sorted(os.path.realpath(tmp_path / "series" / f) for f in os.listdir(tmp_path / "series"))
    label = _series_label()
    reads = _counting_reads(monkeypatch)

    target = PrepareTarget(max_size=64)(Case("p", str(tmp_path / "series")))
    assert target.error is None and target.volume.dicom_sources is None  # the target is the one carrier
    assert [d.SOPInstanceUID for d in target.dicom_sources] == [d.SOPInstanceUID for d in made]
    assert not any("PixelData" in d for d in target.dicom_sources)
    evaluator = OneShotEvaluator(lambda target, model, store: (label, {}, {}), str(tmp_path / "out"))
    model = SimpleNamespace(class_values=[1, 2], class_names=["organ", "lesion"])
    evaluator.evaluate(model, None, [target])

    assert evaluator.errors == []
    assert reads == {f: 1 for f in files}
    monkeypatch.undo()
    seg = hd.seg.segread(str(tmp_path / "out" / "predictions" / "p_seg.dcm"))
    masks = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in made], segment_numbers=[1, 2])
    np.testing.assert_array_equal(masks[..., 0], label == 1)  # frame k of the SEG is file k of the series
    np.testing.assert_array_equal(masks[..., 1], label == 2)
    nifti = tmp_path / "out" / "predictions" / "p.nii.gz"
    np.testing.assert_array_equal(read_label_volume(str(nifti), target.volume), label)


def test_a_dicom_seg_reference_label_reads_the_image_files_once(tmp_path, monkeypatch):
    from bundle.io import Case
    from bundle.reference import check_reference

    made = _make_series(tmp_path / "series")
    write_dicom_seg(_series_label(), made, ["organ", "lesion"], str(tmp_path / "ref_seg.dcm"))
    files = sorted(os.path.realpath(tmp_path / "series" / f) for f in os.listdir(tmp_path / "series"))
    reads = _counting_reads(monkeypatch)

    refs, class_values = check_reference(Case("ref", str(tmp_path / "series"), str(tmp_path / "ref_seg.dcm")))
    assert {f: n for f, n in reads.items() if f in files} == {f: 1 for f in files}
    assert class_values == [1, 2]
    # the organ is as large on every slice (the first wins), the lesion only on slice 0 (position order, file b)
    assert [(r.slice_index, r.classes) for r in refs] == [(0, [0, 1])]
    assert refs[0].label[6, 10] == 1 and refs[0].label[85, 110] == 2 and refs[0].label[30, 40] == 0


def test_cut_across_the_files_or_unreadable_by_pydicom_gives_no_seg(tmp_path, caplog):
    from bundle.dataset import PrepareTarget
    from bundle.io import Case

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (tmp_path / "tall").mkdir()
    for k in range(40):  # enough slices for a cut across them to be an image
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ct.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ct.save_as(tmp_path / "tall" / f"{k:02d}.dcm")
    along = PrepareTarget()(Case("z", str(tmp_path / "tall")))
    assert along.error is None and along.shape == (40, 128, 128) and len(along.dicom_sources) == 40
    across = PrepareTarget(slice_axis=0)(Case("x", str(tmp_path / "tall")))
    assert across.error is None and across.shape == (128, 40, 128) and across.dicom_sources is None
    assert "not across its DICOM slices" in caplog.text

    _make_series(tmp_path / "series")

    # two series in one folder: the pydicom pass refuses it, MONAI's ITK reader still reads one series
    pydicom.dcmread(get_testdata_file("MR_small.dcm")).save_as(tmp_path / "series" / "other.dcm")
    caplog.clear()
    mixed = PrepareTarget()(Case("m", str(tmp_path / "series")))
    assert mixed.error is None and mixed.dicom_sources is None and mixed.volume.kind == "dicom"
    assert "2 series" in caplog.text and "MONAI" in caplog.text
