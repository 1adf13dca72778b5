import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from bundle.dataset import load_datalist
from bundle.io import output_name, read_image, read_label, save_label


def test_png_orientation_is_row_column(tmp_path):
    # asymmetric: 20 rows x 30 columns, a bright block in the top-left corner only
    arr = np.zeros((20, 30), np.uint8)
    arr[2:5, 3:10] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    image, _ = read_image(str(tmp_path / "a.png"))
    assert image.shape == (20, 30)
    np.testing.assert_array_equal(image, arr.astype(np.float32))


def test_rgb_png_keeps_colour_last(tmp_path):
    arr = np.zeros((16, 40, 3), np.uint8)
    arr[0, 39] = (10, 20, 30)
    Image.fromarray(arr).save(tmp_path / "c.png")
    image, _ = read_image(str(tmp_path / "c.png"))
    assert image.shape == (16, 40, 3)
    np.testing.assert_array_equal(image[0, 39], [10, 20, 30])


def test_png_label_round_trip(tmp_path):
    label = np.zeros((24, 36), np.int64)
    label[1:4, 30:35] = 2
    label[20, 0] = 1
    path = save_label(label, str(tmp_path / "p" / "x.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), label)
    np.testing.assert_array_equal(read_label(path), label)
    assert not [f for f in os.listdir(tmp_path / "p") if ".part" in f]


def test_nifti_label_keeps_affine_and_orientation(tmp_path):
    affine = np.diag([0.5, 0.7, 1.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    data = np.zeros((30, 20), np.float32)  # nibabel (x, y): 30 columns, 20 rows
    data[25, 3] = 7.0
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "img.nii.gz"))
    image, meta = read_image(str(tmp_path / "img.nii.gz"))
    assert image.shape == (20, 30) and image[3, 25] == 7.0
    label = (image > 0).astype(np.int64)
    out = save_label(label, str(tmp_path / "out.nii.gz"), meta)
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert np.asarray(back.dataobj)[25, 3] == 1 and np.asarray(back.dataobj).sum() == 1


def test_datalist_reference_is_first_by_name(tmp_path):
    items = [{"image": f"images/{n}.png", "label": f"labels/{n}.png"} for n in ("c", "a", "b")]
    items.append({"image": "images/d.png"})
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "organ"}, "training": items}))
    ref, targets, names = load_datalist(str(tmp_path), num_images=2)
    assert ref.id == "a" and [t.id for t in targets] == ["b", "c"] and names == {1: "organ"}
    _, all_targets, _ = load_datalist(str(tmp_path))
    assert [t.id for t in all_targets] == ["b", "c", "d"] and all_targets[-1].label_path is None


def test_datalist_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_datalist(str(tmp_path))


def test_output_name_follows_input_kind():
    from bundle.io import Case

    assert output_name(Case("x", "/d/x.png")) == "x.png"
    assert output_name(Case("y", "/d/y.nii.gz")) == "y.nii.gz"


def test_named_reference_from_the_datalist_keeps_its_label(tmp_path):
    items = [{"image": f"images/{n}.png", "label": f"labels/{n}.png"} for n in ("a", "b", "c")]
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"1": "organ"}, "training": items}))
    ref, targets, _ = load_datalist(str(tmp_path), reference_image=str(tmp_path / "images" / "b.png"))
    assert ref.id == "b" and ref.label_path.endswith("labels/b.png")
    assert [t.id for t in targets] == ["a", "c"]


def test_label_values_map_to_class_indices():
    from bundle.io import to_class_index

    label = np.array([[0, 255, 7], [128, 300, 255]])
    np.testing.assert_array_equal(to_class_index(label, [128, 255]), [[0, 2, 0], [1, 0, 2]])


def test_prepared_slices_on_disk_read_back_exactly(tmp_path):
    from bundle.dataset import PrepareTarget, SliceFiles
    from bundle.io import Case

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8)).save(tmp_path / "large.png")  # resized: float
    for name in ("small", "large"):
        case = Case(name, str(tmp_path / f"{name}.png"))
        in_memory = PrepareTarget(max_size=64)(case)
        prepare = PrepareTarget(max_size=64, slice_dir=str(tmp_path / "slices"))
        on_disk = prepare(case)
        assert isinstance(on_disk.images, SliceFiles) and list(on_disk.images) == [name]
        image = on_disk.images[name]
        assert image.dtype == np.float32 and np.array_equal(image, in_memory.images[name])
    stored = sorted(p.name for p in (tmp_path / "slices" / "rank0").iterdir())
    assert len(stored) == 2 and sum(n.endswith(".u8.npy") for n in stored) == 1  # 8-bit content as uint8
    prepare.clear()
    assert not (tmp_path / "slices").exists()
