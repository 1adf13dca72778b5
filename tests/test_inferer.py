import numpy as np
import pytest

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
