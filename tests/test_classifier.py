"""Patch classifier and reference views on synthetic features; the DINOv2 loader on a real timm checkpoint file."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bundle.classifier import PatchClassifier, reference_views
from bundle.features import Dinov2Features
from tests.conftest import disk


def test_reference_views_zoom_rotate_and_mirror_image_and_label_together():
    image = np.zeros((80, 100), np.float32)
    label = np.zeros((80, 100), np.int64)
    label[32:48, 40:56] = 1  # just right of centre, so a 2x zoom stays inside
    image[label == 1] = 1.0
    views = reference_views(image, label, [(2.0, 0, False), (1.0, 0, True)])
    (zimg, zlab), (fimg, flab) = views
    assert zlab.shape == label.shape and set(np.unique(zlab)) <= {0, 1}
    assert abs(zlab.sum() / label.sum() - 4.0) < 0.3  # zoom 2x: four times the area
    assert np.array_equal(flab, label[:, ::-1])  # mirrored, same place on the other side
    assert np.allclose(fimg, image[:, ::-1], atol=1e-5)
    assert ((zimg > 0.5) == (zlab == 1)).mean() > 0.98  # image and label moved together
    rgb = reference_views(np.repeat(image[..., None], 3, -1), label)
    assert all(v[0].shape == (80, 100, 3) and v[1].shape == (80, 100) for v in rgb)


def _features(label: np.ndarray, seed: int) -> torch.Tensor:
    """(8, h, w) features: code 0 inside class 1, code 1 inside class 2, code 2 elsewhere, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.eye(8)[[2, 0, 1]]
    f = codes[torch.from_numpy(label)].permute(2, 0, 1)
    return F.normalize(f + 0.2 * torch.rand(f.shape, generator=gen), dim=0)


def test_patch_classifier_learns_classes_from_one_map_and_finds_them_elsewhere():
    ref = np.zeros((32, 32), np.int64)
    ref[disk((32, 32), (8, 8), 5)] = 1
    ref[disk((32, 32), (22, 22), 4)] = 2
    soft = F.one_hot(torch.from_numpy(ref), 3).permute(2, 0, 1).float()
    clf = PatchClassifier(iterations=150).fit([(_features(ref, 0), soft, 1.0)], num_classes=2)
    moved = np.zeros((32, 32), np.int64)
    moved[disk((32, 32), (24, 10), 6)] = 1
    moved[disk((32, 32), (6, 24), 3)] = 2
    probs = clf(_features(moved, 1), (64, 64))
    assert probs.shape == (3, 64, 64) and torch.allclose(probs.sum(0), torch.ones(64, 64), atol=1e-4)
    pred = probs.argmax(0).numpy()[::2, ::2]
    for c in (1, 2):
        dice = 2 * ((pred == c) & (moved == c)).sum() / ((pred == c).sum() + (moved == c).sum())
        assert dice > 0.8, (c, dice)


def test_patch_classifier_trains_the_same_on_pixels_sampled_ahead_as_on_whole_maps():
    # the classifier source keeps only the pixels fit would draw of each self-training image (bounded memory)
    first, second = np.zeros((48, 48), np.int64), np.zeros((48, 48), np.int64)
    first[disk((48, 48), (20, 24), 9)] = 1
    second[disk((48, 48), (30, 14), 6)] = 1
    maps = [
        (_features(lab, i), F.one_hot(torch.from_numpy(lab), 2).permute(2, 0, 1).float())
        for i, lab in enumerate((first, second))
    ]
    whole = PatchClassifier(iterations=40, pixels_per_map=256).fit([(f, s, 0.7) for f, s in maps], num_classes=1)
    sampler = PatchClassifier(pixels_per_map=256)
    picks = sampler.picks([s for _, s in maps])
    assert [p.shape for p in picks] == [(256,), (256,)] and not torch.equal(picks[0], picks[1])
    f, s = maps[1]
    x, y = f.reshape(8, -1).T[picks[1]], s.reshape(2, -1).T[picks[1]]
    assert y[:, 1].sum() >= min(128, s[1].sum())  # half the pixels (or all it has) from inside the structure
    ahead = PatchClassifier(iterations=40, pixels_per_map=256).fit([(*maps[0], 0.7), (x, y, 0.7)], num_classes=1)
    assert torch.equal(whole(f, (48, 48)), ahead(f, (48, 48)))


def test_patch_classifier_refuses_prediction_before_fit():
    with pytest.raises(RuntimeError, match="fit"):
        PatchClassifier()(torch.zeros(8, 4, 4), (8, 8))


def test_dinov2_features_load_a_local_timm_checkpoint(tmp_path):
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=112)
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(model.state_dict(), path)
    enc = Dinov2Features(str(path), img_size=112)
    feats = enc(np.random.default_rng(0).random((60, 90)).astype(np.float32))
    assert feats.shape == (384, 5, 8)  # 112 px long side -> 8 patches of 14 px; 60 px -> 75 px -> 5 patches
    assert torch.allclose(feats.norm(dim=0), torch.ones(5, 8), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="no download"):
        Dinov2Features(str(tmp_path / "missing.pth"))
