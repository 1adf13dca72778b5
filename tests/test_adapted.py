"""Adapt once, infer many: models/model.pt from a cohort run, then new single images through configs/infer.yaml."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle.adapted import AdaptedSegmenter, load_adapted, save_adapted
from bundle.classifier import PatchClassifier
from bundle.engine import WarpTrainer
from bundle.inferer import OneShotInferer
from bundle.losses import WarpingLoss
from bundle.networks import WarpNet
from bundle.prompts import PromptGenerator
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


def _fused_run(sam, folder, force: dict | None = None, **thresholds) -> dict:
    """A fused cohort run on a small synthetic cohort, saved as an adapted model; returns what the tests need.

    ``force`` overrides per-class decisions after the run; ``thresholds`` go to the inferer.
    """
    ref_image, ref_label = _case(0)
    targets = [(f"t{i}", _case(s)) for i, s in enumerate((2, 4, 5))]
    trainer = WarpTrainer(
        WarpNet(), WarpingLoss(), reference_augmentation(64), batch_size=3, min_iterations=20, progress=False
    )
    inferer = OneShotInferer(
        sam,
        trainer,
        PromptGenerator(),
        strategy="fused",
        working_size=64,
        classifier=PatchClassifier(iterations=60),
        self_training=1,
        progress=False,
        **thresholds,
    )
    preds = inferer(ref_image, ref_label, 2, [(k, img) for k, (img, _) in targets])
    inferer.decisions.update(force or {})
    path = str(folder / "model.pt")
    save_adapted(path, inferer, ref_image, ref_label, [1, 2], ["left", "right"], {"strategy": "fused"})
    return {"path": path, "inferer": inferer, "targets": targets, "preds": preds, "sam": sam}


@pytest.fixture(scope="module")
def adapted(lite_medsam, tmp_path_factory):
    # both kinds of source must be exercised whatever the cohort decided: class 2 is forced onto the classifier's
    # masks (source "match", as models saved before 0.5.0 have it)
    force = {"class_2": {"agreement": 0.0, "source": "match"}}
    return _fused_run(lite_medsam, tmp_path_factory.mktemp("adapted"), force)


@pytest.fixture(scope="module")
def adapted_aligned(lite_medsam, tmp_path_factory):
    """Thresholds that send every class to the aligned warp (the warp is never trusted here)."""
    folder = tmp_path_factory.mktemp("adapted_aligned")
    return _fused_run(lite_medsam, folder, agreement=1.01, warp_similarity=None)


def test_aligned_sources_are_saved_and_reproduced(adapted_aligned):
    inferer = adapted_aligned["inferer"]
    assert [d["source"] for d in inferer.decisions.values()] == ["aligned", "aligned"]
    state = load_adapted(adapted_aligned["path"])
    assert state["decisions"] == ["aligned", "aligned"] and state["classifier"] is not None
    # the two warping networks are both kept: the plain one under "network", the aligned one beside it
    assert set(state["aligned_network"]) == set(state["network"])
    assert any(not torch.equal(state["network"][k], state["aligned_network"][k]) for k in state["network"])
    seg = AdaptedSegmenter(adapted_aligned["path"], sam=adapted_aligned["sam"])
    for (key, (image, truth)), cohort in zip(adapted_aligned["targets"], adapted_aligned["preds"]):
        pred = seg.predict(image)
        assert torch.allclose(pred.logits, cohort.logits, atol=1e-3), key
        for c in (1, 2):
            assert _dice(cohort.label() == c, truth == c) > 0.6, (key, c)


def test_saved_model_holds_network_reference_and_decisions(adapted):
    state = load_adapted(adapted["path"])
    assert set(state["network"]) == set(WarpNet().state_dict())  # Model Zoo exports it with --key_in_ckpt network
    assert state["class_values"] == [1, 2] and state["class_names"] == ["left", "right"]
    assert state["decisions"][1] == "match" and state["decisions"][0] in ("warp", "match")
    assert tuple(state["reference_image"].shape) == SIZE and tuple(state["reference_label"].shape) == SIZE
    assert state["classifier"] is not None and state["working_size"] == 64
    assert not os.path.exists(adapted["path"] + ".part")


def test_adapted_segmenter_reproduces_the_cohort_run_without_the_reference_files(adapted):
    seg = AdaptedSegmenter(adapted["path"], sam=adapted["sam"])
    inferer = adapted["inferer"]
    for (key, (image, truth)), cohort in zip(adapted["targets"], adapted["preds"]):
        pred = seg.predict(image)
        assert pred.logits.shape == (2, *SIZE)
        # class 1: same source as the cohort run; class 2: the classifier's SAM mask, recomputed here
        emb = inferer.embeddings[key]
        classified = inferer.classifier_segment(inferer.classifier(inferer.patch_features(key, image), SIZE), emb)
        first = cohort.logits[0] if seg.sources[0] == "warp" else classified.logits[0]
        assert torch.allclose(pred.logits[0], first, atol=1e-3)
        assert torch.allclose(pred.logits[1], classified.logits[1], atol=1e-3)
        label = seg(image)
        assert label.shape == SIZE
        for c in (1, 2):
            assert _dice(label == c, truth == c) > 0.6, (key, c)


def test_optional_refinement_changes_only_a_copy_of_the_network(adapted):
    seg = AdaptedSegmenter(adapted["path"], sam=adapted["sam"], refine_iterations=3)
    before = {k: v.clone() for k, v in seg.network.state_dict().items()}
    label = seg(adapted["targets"][0][1][0])
    assert label.shape == SIZE
    assert all(torch.equal(before[k], v) for k, v in seg.network.state_dict().items())


def test_infer_config_writes_png_and_nifti_in_the_input_geometry(adapted, tmp_path):
    image, truth = _case(3)
    png = tmp_path / "new.png"
    Image.fromarray(image.astype(np.uint8)).save(png)
    affine = np.diag([0.7, 0.5, 1.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    nii = tmp_path / "new_ct.nii.gz"
    nib.save(nib.Nifti1Image(image.T.copy(), affine), nii)  # NIfTI stores (x, y): the transpose of (H, W)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "model_path": adapted["path"],
            "image": [str(png), str(nii)],
            "output_dir": str(tmp_path / "out"),
        }
    )
    parser["sam"] = adapted["sam"]  # the session's backend, already loaded
    summary = parser.get_parsed_content("workflow").run()
    assert summary["num_images"] == 2 and summary["num_failed"] == 0
    out_png = np.asarray(Image.open(tmp_path / "out" / "predictions" / "new.png"))
    assert out_png.shape == SIZE and out_png.dtype == np.uint8
    out_nii = nib.load(tmp_path / "out" / "predictions" / "new_ct.nii.gz")
    assert np.allclose(out_nii.affine, affine)
    assert np.array_equal(np.asarray(out_nii.dataobj).T, out_png)
    for c in (1, 2):
        assert _dice(out_png == c, truth == c) > 0.6, c
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["predictions"]


def test_missing_model_says_to_run_the_cohort_config_first(tmp_path):
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    parser.update({"bundle_root": ROOT, "model_path": str(tmp_path / "none.pt"), "sam": None})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("inferer")
    messages, error = [], info.value
    while error is not None:  # the config parser wraps the segmenter's error
        messages.append(str(error))
        error = error.__cause__
    assert any("Run configs/inference.yaml on a cohort first" in m for m in messages), messages


def test_cohort_config_saves_the_model_that_infer_config_reuses(tmp_path):
    """inference.yaml (registration: no SAM, fast) saves model.pt; infer.yaml segments the same images alike."""
    from tests.test_workflow import _dataset

    data = _dataset(tmp_path / "data")
    model = tmp_path / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "dataset_dir": str(data),
            "output_dir": str(tmp_path / "cohort"),
            "adapted_model": str(model),
            "strategy": "registration",
            "progress": False,
            "working_size": 64,
            "trainer#min_iterations": 10,
            "trainer#initial_epochs": 1,
        }
    )
    cohort = parser.get_parsed_content("workflow").run()
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(model, weights_only=True)["network"])  # what ckpt_export does
    infer = ConfigParser()
    infer.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    infer.update(
        {"bundle_root": ROOT, "model_path": str(model), "dataset_dir": str(data), "first_image": 1},
    )
    infer.update({"output_dir": str(tmp_path / "infer"), "sam": None})
    summary = infer.get_parsed_content("workflow").run()
    assert summary["num_images"] == 3 and summary["sources"] == {"blob": "registration"}
    assert abs(summary["dice_mean"] - cohort["dice_mean"]) < 0.5
    for name in ("c1.png", "c2.png", "c3.png"):
        a = np.asarray(Image.open(tmp_path / "cohort" / "predictions" / name))
        b = np.asarray(Image.open(tmp_path / "infer" / "predictions" / name))
        assert np.array_equal(a, b), name
