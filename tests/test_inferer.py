import numpy as np
import pytest
import torch

from bundle.classifier import PatchClassifier
from bundle.engine import WarpTrainer
from bundle.inferer import OneShotInferer
from bundle.losses import WarpingLoss
from bundle.networks import WarpNet
from bundle.prompts import PromptGenerator
from bundle.transforms import reference_augmentation
from tests.conftest import disk


def _cohort(size=(72, 96)):
    def case(shift):
        label = np.zeros(size, np.int64)
        label[disk(size, (30 + shift, 30 + shift), 12)] = 1
        label[disk(size, (36 + shift, 66 + shift), 10)] = 2
        image = np.where(label > 0, 180.0, 40.0) + np.where(label == 2, 50.0, 0.0)
        return image.astype(np.float32), label

    ref_image, ref_label = case(0)
    targets = [(f"t{i}", case(s)) for i, s in enumerate((2, 4, 5))]
    return ref_image, ref_label, targets


@pytest.mark.parametrize("rounds, refine", [(1, 1)])
def test_every_image_is_encoded_once_across_rounds(lite_medsam, rounds, refine, monkeypatch):
    ref_image, ref_label, targets = _cohort()
    calls = []
    original = lite_medsam.encode
    monkeypatch.setattr(lite_medsam, "encode", lambda image: calls.append(image.shape) or original(image))
    trainer = WarpTrainer(
        WarpNet(), WarpingLoss(), reference_augmentation(64), batch_size=3, min_iterations=5, progress=False
    )
    inferer = OneShotInferer(
        lite_medsam,
        trainer,
        PromptGenerator(num_points=2),
        strategy="warp",
        working_size=64,
        rounds=rounds,
        refine=refine,
        progress=False,
    )
    preds = inferer(ref_image, ref_label, 2, [(k, img) for k, (img, _) in targets])
    assert len(calls) == 1 + len(targets)  # reference (for prototypes) + each target, once for all rounds
    assert trainer.round == 1 + rounds
    for (_, (_, truth)), pred in zip(targets, preds):
        label = pred.label()
        assert label.shape == truth.shape and set(np.unique(label)) <= {0, 1, 2}
        for c in (1, 2):
            dice = 2 * ((label == c) & (truth == c)).sum() / ((label == c).sum() + (truth == c).sum())
            assert dice > 0.4, (c, dice)  # found in the right place (points + refinement are on here)


def test_registration_strategy_needs_no_sam_encoding(lite_medsam, monkeypatch):
    ref_image, ref_label, targets = _cohort()
    monkeypatch.setattr(lite_medsam, "encode", lambda image: pytest.fail("SAM must not run"))
    trainer = WarpTrainer(WarpNet(), WarpingLoss(), reference_augmentation(64), min_iterations=3, progress=False)
    inferer = OneShotInferer(lite_medsam, trainer, PromptGenerator(), strategy="registration", working_size=64)
    preds = inferer(ref_image, ref_label, 2, [(k, img) for k, (img, _) in targets])
    assert [p.label().shape for p in preds] == [(72, 96)] * 3


def test_unknown_strategy_is_refused(lite_medsam):
    with pytest.raises(ValueError, match="strategy"):
        OneShotInferer(lite_medsam, None, PromptGenerator(), strategy="magic")
    with pytest.raises(ValueError, match="warping trainer"):
        OneShotInferer(lite_medsam, None, strategy="fused")


def _moving_cohort(size=(96, 128)):
    """A bright textured disk that moves and changes size from image to image (where warping struggles)."""
    rng = np.random.default_rng(0)

    def case(centre, radius):
        label = disk(size, centre, radius).astype(np.int64)
        image = 40 + 10 * rng.standard_normal(size) + label * (150 + 20 * np.sin(np.arange(size[1]) / 2.0))
        return image.astype(np.float32), label

    ref_image, ref_label = case((30, 35), 14)
    targets = [(f"t{i}", case(c, r)) for i, (c, r) in enumerate([((65, 95), 18), ((40, 90), 10), ((62, 30), 16)])]
    return ref_image, ref_label, targets


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("strategy", ["match", "persam"])
def test_feature_strategies_find_a_moving_object(lite_medsam, strategy):
    ref_image, ref_label, targets = _moving_cohort()
    inferer = OneShotInferer(lite_medsam, strategy=strategy, progress=False)
    preds = inferer(ref_image, ref_label, 1, [(k, img) for k, (img, _) in targets])
    for (_, (_, truth)), pred in zip(targets, preds):
        assert pred.found.tolist() == [True]
        points, labels = pred.prompts.points[0].round().long(), pred.prompts.point_labels[0]
        pos, neg = points[labels == 1], points[labels == 0]
        assert len(pos) >= 1 and len(neg) >= 1
        assert truth[pos[:, 1], pos[:, 0]].all()  # (x, y) points land inside the moved object...
        assert not truth[neg[:, 1], neg[:, 0]].any()  # ...and negatives outside it
        assert pred.label().shape == truth.shape and (pred.label() == 1).any()


def test_match_reports_a_class_without_reference_pixels_as_not_found(lite_medsam):
    ref_image, ref_label, targets = _moving_cohort()
    inferer = OneShotInferer(lite_medsam, strategy="match", progress=False)
    # class 2 is declared but has no reference pixel: no positive match can exist for it
    preds = inferer(ref_image, ref_label, 2, [(k, img) for k, (img, _) in targets])
    for pred in preds:
        assert pred.found.tolist() == [True, False]
        assert not (pred.label() == 2).any()


def test_fused_strategy_aligns_by_the_classifier_where_the_object_moves(lite_medsam):
    ref_image, ref_label, targets = _moving_cohort()
    trainer = WarpTrainer(
        WarpNet(), WarpingLoss(), reference_augmentation(64), batch_size=3, min_iterations=10, progress=False
    )
    classifier = PatchClassifier(iterations=100)
    inferer = OneShotInferer(
        lite_medsam, trainer, working_size=64, classifier=classifier, self_training=1, progress=False
    )
    preds = inferer(ref_image, ref_label, 1, [(k, img) for k, (img, _) in targets])
    assert inferer.decisions["class_1"]["source"] == "aligned", inferer.decisions
    assert set(inferer.networks) == {"warp", "aligned"}
    assert np.mean([_dice(p.label() == 1, t == 1) for (_, (_, t)), p in zip(targets, preds)]) > 0.8


def test_fuse_picks_the_source_per_class_by_cohort_agreement(lite_medsam):
    from bundle.inferer import Prediction

    def pred(masks):
        logits = torch.where(torch.from_numpy(np.stack(masks)), 5.0, -5.0)
        return Prediction(logits, torch.ones(len(masks)))

    a, b, far = disk((40, 40), (12, 12), 6), disk((40, 40), (13, 12), 6), disk((40, 40), (30, 30), 6)
    warped = [pred([a, a]), pred([a, a])]
    classified = [pred([b, far]), pred([b, far])]  # class 1 agrees with the warp, class 2 does not
    fused = OneShotInferer(lite_medsam, strategy="match").fuse(warped, classified)
    for p in fused:
        assert (p.label() == 1).sum() > 0 and _dice(p.label() == 1, a) == 1.0
        assert _dice(p.label() == 2, far) == 1.0


def test_aligned_score_prefers_a_compact_confident_mask_over_a_leaked_one(lite_medsam):
    from bundle.inferer import Prediction

    size = (80, 100)
    head = disk(size, (30, 40), 15)
    leaked = head.copy()
    leaked[44:70, 10:90] = True  # the mask ran into the neighbouring tissue
    inferer = OneShotInferer(lite_medsam, strategy="match", progress=False)

    def pred(masks, iou):
        return Prediction(torch.where(torch.from_numpy(np.stack(masks)), 5.0, -5.0), torch.tensor(iou))

    both = torch.tensor([True, True])
    # same SAM confidence: the leak loses; much lower confidence outweighs compactness
    assert inferer.aligned_score(pred([head, head], [0.9, 0.9]), both) > inferer.aligned_score(
        pred([leaked, head], [0.9, 0.9]), both
    )
    assert inferer.aligned_score(pred([head, head], [0.3, 0.3]), both) < inferer.aligned_score(
        pred([leaked, leaked], [0.95, 0.95]), both
    )
    # only the aligned classes count, and a class with nothing found scores nothing
    only_first = torch.tensor([True, False])
    assert inferer.aligned_score(pred([head, leaked], [0.9, 0.1]), only_first) == pytest.approx(
        0.9 * inferer.aligned_score(pred([head], [1.0]), torch.tensor([True])), rel=1e-6
    )
    empty = np.zeros(size, bool)
    assert inferer.aligned_score(pred([empty, empty], [0.9, 0.9]), both) == 0.0


def test_aligned_score_with_the_image_prefers_the_mask_on_the_structures_edge(lite_medsam):
    from bundle.alignment import gradient_magnitude
    from bundle.inferer import Prediction

    size = (80, 100)
    structure = disk(size, (40, 50), 15)
    image = np.where(structure, 200.0, 60.0)  # a bright structure in dark fluid
    gradient = gradient_magnitude(image.astype(np.float32))
    inferer = OneShotInferer(lite_medsam, strategy="match", progress=False)
    one = torch.tensor([True])

    def pred(mask, iou):
        return Prediction(torch.where(torch.from_numpy(mask[None]), 5.0, -5.0), torch.tensor([iou]))

    # structure + fluid is as convex and SAM is more confident about it: only the outline tells them apart
    with_fluid = pred(disk(size, (40, 50), 28), 0.9)
    alone = pred(structure, 0.85)
    assert inferer.aligned_score(with_fluid, one) > inferer.aligned_score(alone, one)
    assert inferer.aligned_score(alone, one, gradient) > inferer.aligned_score(with_fluid, one, gradient)
