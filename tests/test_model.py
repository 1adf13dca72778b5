"""The fitted model: one per-image path for the cohort run, the saved model (configs/infer.yaml) and MONAI Label."""

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle.classifier import PatchClassifier
from bundle.decoder import SamDecoder
from bundle.engine import WarpTrainer
from bundle.losses import WarpingLoss
from bundle.model import OneShotModel, load_model_file
from bundle.networks import WarpNet
from bundle.sources import AlignedSource, ClassifierSource, Cohort, FusedSource, WarpSource
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import reference_augmentation
from tests.conftest import ROOT, disk

SIZE = (72, 96)  # not square: a transposed geometry would show


def _case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(SIZE, np.int64)
    label[disk(SIZE, (30 + shift, 30 + shift), 12)] = 1
    label[disk(SIZE, (36 + shift, 66 + shift), 10)] = 2
    image = np.where(label > 0, 180.0, 40.0) + np.where(label == 2, 50.0, 0.0)
    return image.astype(np.float32), label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _fused(sam, **thresholds) -> FusedSource:
    trainer = WarpTrainer(
        WarpNet(), WarpingLoss(), reference_augmentation(64), batch_size=3, min_iterations=20, progress=False
    )
    decoder = SamDecoder(sam)
    locator = ClassifierSource(decoder, PatchClassifier(iterations=60), self_training=1)
    return FusedSource(
        WarpSource(trainer, decoder, 64), locator, AlignedSource(locator, trainer, decoder, 64), **thresholds
    )


def _fitted(sam, folder, **thresholds) -> dict:
    """A fused model fitted on a small synthetic cohort and saved; returns what the tests need."""
    ref_image, ref_label = _case(0)
    targets = [(f"t{i}", _case(s)) for i, s in enumerate((2, 4, 5))]
    store = EmbeddingStore(sam)
    cohort = Cohort([(k, img) for k, (img, _) in targets], store)
    model = OneShotModel.fit(
        _fused(sam, **thresholds), [(Reference(ref_image, ref_label, 2), [0, 1])], cohort, [1, 2], ["left", "right"]
    )
    path = model.save(str(folder / "model.pt"))
    preds = [model.predict(k, img, store) for k, (img, _) in targets]
    return {"path": path, "model": model, "targets": targets, "preds": preds, "sam": sam}


@pytest.fixture(scope="module")
def fitted(lite_medsam, tmp_path_factory):
    return _fitted(lite_medsam, tmp_path_factory.mktemp("fitted"))


@pytest.fixture(scope="module")
def fitted_aligned(lite_medsam, tmp_path_factory):
    """Thresholds that send every class to the aligned warp (the warp is never trusted here)."""
    return _fitted(lite_medsam, tmp_path_factory.mktemp("aligned"), agreement=1.01, warp_similarity=None)


@pytest.mark.parametrize("which", ["fitted", "fitted_aligned"])
def test_saved_model_gives_the_cohort_runs_own_masks(which, request):
    run = request.getfixturevalue(which)
    loaded = OneShotModel.load(run["path"], EmbeddingStore(run["sam"]))  # a fresh store: nothing cached
    assert loaded.groups[0].source.switch_margin == run["model"].groups[0].source.switch_margin == 0.25
    store = EmbeddingStore(run["sam"])
    for (key, (image, truth)), cohort in zip(run["targets"], run["preds"]):
        pred = loaded.predict(key, image, store)
        assert torch.allclose(pred.logits, cohort.logits, atol=1e-4), key
        assert np.array_equal(pred.label(), cohort.label())
        # each image names the source that served each class; the per-image switch travels with the model
        assert pred.sources == cohort.sources and len(pred.sources) == 2, (pred.sources, cohort.sources)
        assert set(pred.sources) <= {"warp", "aligned", "classifier", "registration"}
        for c in (1, 2):
            assert _dice(cohort.label() == c, truth == c) > 0.6, (key, c)


def test_saved_model_holds_each_sources_state(fitted, fitted_aligned):
    state = load_model_file(fitted["path"])
    assert set(state["network"]) == set(WarpNet().state_dict())  # Model Zoo exports it with --key_in_ckpt network
    assert state["class_values"] == [1, 2] and state["class_names"] == ["left", "right"]
    (group,) = state["groups"]
    assert group["source"]["kind"] == "fused" and group["source"]["primary"]["kind"] == "warp"
    assert tuple(group["reference_image"].shape) == SIZE and tuple(group["reference_label"].shape) == SIZE
    assert not os.path.exists(fitted["path"] + ".part")
    aligned = load_model_file(fitted_aligned["path"])["groups"][0]["source"]
    assert [d["source"] for d in aligned["decisions"]] == ["aligned", "aligned"]
    # two warping networks, each saved by its own source
    plain, second = aligned["primary"]["network"], aligned["fallback"]["warp"]["network"]
    assert set(plain) == set(second) and any(not torch.equal(plain[k], second[k]) for k in plain)


def test_an_old_or_foreign_file_is_refused_with_a_clear_message(tmp_path):
    torch.save({"version": 3, "network": {}, "reference_label": torch.zeros(2), "class_values": [1]}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="adapt again"):
        load_model_file(str(tmp_path / "a.pt"))
    with pytest.raises(FileNotFoundError, match="Run configs/inference.yaml on a cohort first"):
        load_model_file(str(tmp_path / "none.pt"))


def test_each_reference_group_gets_what_it_would_get_alone(lite_medsam):
    """Two references whose classes differ (the slices of a labelled volume where each class is largest): under the
    fused source, each group's classes come out as when that group runs alone (no reference state is shared)."""
    image_a, label_a = _case(0)
    image_b, label_b = _case(6)
    image_b = np.ascontiguousarray(image_b[:, ::-1])  # another slice: other content, the class elsewhere
    label_b = np.ascontiguousarray(label_b[:, ::-1])
    first = Reference(image_a, (label_a == 1).astype(np.int64), 1, "_slice0")
    second = Reference(image_b, (label_b == 2).astype(np.int64), 1, "_slice1")
    targets = [(f"t{i}", _case(s)[0]) for i, s in enumerate((2, 4, 5))]

    def run(groups):
        torch.manual_seed(0)  # the same initial warping network in both runs
        store = EmbeddingStore(lite_medsam)
        fresh = [(Reference(r.image, r.label, 1, r.tag), classes) for r, classes in groups]
        model = OneShotModel.fit(_fused(lite_medsam), fresh, Cohort(targets, store), [1, 2], ["a", "b"])
        return [model.predict(k, img, store) for k, img in targets]

    both, alone = run([(first, [0]), (second, [1])]), run([(second, [1])])
    for b, a in zip(both, alone):
        assert torch.equal(b.logits[1], a.logits[1])


def _write_case(path, image):
    Image.fromarray(image.astype(np.uint8)).save(path)


def test_infer_config_writes_png_and_nifti_in_the_input_geometry(fitted, tmp_path):
    image, truth = _case(3)
    png = tmp_path / "new.png"
    _write_case(png, image)
    affine = np.diag([0.7, 0.5, 1.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    nii = tmp_path / "new_ct.nii.gz"
    nib.save(nib.Nifti1Image(image.T.copy(), affine), nii)  # NIfTI stores (x, y): the transpose of (H, W)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "model_path": fitted["path"],
            "image": [str(png), str(nii)],
            "output_dir": str(tmp_path / "out"),
        }
    )
    parser["sam"] = fitted["sam"]  # the session's backend, already loaded
    summary = parser.get_parsed_content("workflow").run()
    assert summary["num_images"] == 2 and summary["num_failed"] == 0
    out_png = np.asarray(Image.open(tmp_path / "out" / "predictions" / "new.png"))
    assert out_png.shape == SIZE and out_png.dtype == np.uint8
    out_nii = nib.load(tmp_path / "out" / "predictions" / "new_ct.nii.gz")
    assert np.allclose(out_nii.affine, affine)
    assert np.array_equal(np.asarray(out_nii.dataobj).T, out_png)
    for c in (1, 2):
        assert _dice(out_png == c, truth == c) > 0.6, c
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["model"] == os.path.abspath(fitted["path"])


def test_infer_config_applies_the_model_in_the_precision_it_was_fitted_in(fitted, tmp_path, caplog):
    state = torch.load(fitted["path"], weights_only=True)
    state["preparation"] = {"window": None, "max_size": 1024, "precision": "bfloat16"}  # as a bfloat16 run saves it
    path = str(tmp_path / "bfloat16.pt")
    torch.save(state, path)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    parser.update({"bundle_root": ROOT, "model_path": path})
    assert parser.get_parsed_content("sam#precision") == "bfloat16"
    parser.update({"model_path": fitted["path"]})  # saved without it (older models): float32
    assert parser.get_parsed_content("sam#precision") == "float32"
    with caplog.at_level(logging.WARNING, logger="bundle.model"):
        OneShotModel.load(path, EmbeddingStore(fitted["sam"]))  # a float32 backend: said, not hidden
    assert "fitted with SAM in bfloat16; it is applied in float32" in caplog.text


def test_missing_model_says_to_run_the_cohort_config_first(tmp_path):
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    parser.update({"bundle_root": ROOT, "model_path": str(tmp_path / "none.pt"), "sam": None})
    with pytest.raises(FileNotFoundError, match="Run configs/inference.yaml on a cohort first"):
        parser.get_parsed_content("workflow").run()


def test_cohort_config_saves_the_model_that_infer_config_reuses(tmp_path):
    """inference.yaml (registration: no SAM, fast) saves model.pt; infer.yaml segments the same images alike."""
    from tests.test_workflow import _dataset

    data = _dataset(tmp_path / "data")
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    overrides = {"strategy": "registration", "progress": False, "working_size": 64, "trainer#min_iterations": 10}
    parser.update({"bundle_root": ROOT, "dataset_dir": str(data), "output_dir": str(tmp_path / "cohort"), **overrides})
    cohort = parser.get_parsed_content("workflow").run()
    model = tmp_path / "cohort" / "model.pt"  # under output_dir by default
    assert torch.load(model, weights_only=True)["preparation"]["precision"] == "float32"  # infer.yaml applies it
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(model, weights_only=True)["network"])  # what ckpt_export does
    infer = ConfigParser()
    infer.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    infer.update({"bundle_root": ROOT, "model_path": str(model), "dataset_dir": str(data), "first_image": 1})
    infer.update({"output_dir": str(tmp_path / "infer"), "sam": None})
    summary = infer.get_parsed_content("workflow").run()
    assert summary["num_images"] == 3 and abs(summary["dice_mean"] - cohort["dice_mean"]) < 1e-6
    for name in ("c1.png", "c2.png", "c3.png"):
        a = np.asarray(Image.open(tmp_path / "cohort" / "predictions" / name))
        b = np.asarray(Image.open(tmp_path / "infer" / "predictions" / name))
        assert np.array_equal(a, b), name
