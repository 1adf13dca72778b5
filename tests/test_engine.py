import os

import numpy as np
import torch

from bundle.engine import WarpTrainer
from bundle.losses import LabelLoss, WarpingLoss
from bundle.networks import WarpNet
from bundle.transforms import one_hot, reference_augmentation
from tests.conftest import disk


def _pair(size=64):
    ref = torch.from_numpy(disk((size, size), (28, 30), 12)).float()
    targets = torch.stack([torch.from_numpy(disk((size, size), (28 + d, 30 + d), 12)).float()[None] for d in (5, 6, 7)])
    return ref[None], one_hot(ref.long(), 1), targets


def _dice_with_targets(trainer, targets):
    net = trainer.network.eval()
    with torch.no_grad():
        ddf = net(trainer.moving[None], trainer.fixed)
        warped = net.warp_image(trainer.moving_label[None].expand(len(ddf), -1, -1, -1), ddf)
    fg = warped[:, 1] > 0.5
    truth = targets[:, 0] > 0.5
    return float(2 * (fg & truth).sum() / (fg.sum() + truth.sum()))


def test_training_reduces_loss_and_aligns_label():
    torch.manual_seed(0)
    ref, ref_label, targets = _pair()
    trainer = WarpTrainer(
        WarpNet(), WarpingLoss("lncc", 0.6), reference_augmentation(64), lr=2e-3, batch_size=3, progress=False
    )
    trainer.setup(ref, ref_label, targets)
    before = _dice_with_targets(trainer, targets)
    first = trainer.fit(5)
    last = trainer.fit(80)
    after = _dice_with_targets(trainer, targets)
    assert last < first
    assert after > before + 0.05, (before, after)


def test_pseudo_labels_pull_the_warp_and_checkpoint_is_written(tmp_path):
    torch.manual_seed(0)
    ref, ref_label, targets = _pair()
    trainer = WarpTrainer(
        WarpNet(),
        WarpingLoss("ssim", 0.6),
        reference_augmentation(64),
        lr=2e-3,
        batch_size=3,
        aug_weight=0.0,
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    trainer.setup(ref, ref_label, targets)
    trainer.set_pseudo_labels(torch.stack([one_hot(t[0].long(), 1) for t in targets]), torch.ones(3))
    trainer.fit(40)
    assert _dice_with_targets(trainer, targets) > 0.8
    assert (tmp_path / "warp_round0.pt").exists()
    state = torch.load(tmp_path / "warp_round0.pt", weights_only=False)
    assert set(state["network"]) == set(trainer.network.state_dict()) and state["round"] == 0


def _trainer(checkpoint_dir=None):
    torch.manual_seed(1)
    return WarpTrainer(
        WarpNet(channels=(4, 8, 16)),
        WarpingLoss(),
        reference_augmentation(32),
        batch_size=2,
        aug_weight=0.3,
        checkpoint_dir=checkpoint_dir,
        progress=False,
        seed=3,
    )


def test_resumed_training_matches_uninterrupted(tmp_path):
    ref, ref_label, targets = _pair(32)
    whole = _trainer()
    whole.setup(ref, ref_label, targets)
    whole.fit(4)
    whole.fit(4)
    killed = _trainer(str(tmp_path))
    killed.setup(ref, ref_label, targets)
    killed.fit(4)  # round 0 checkpointed; the "kill" happens before round 1
    resumed = _trainer(str(tmp_path))
    resumed.setup(ref, ref_label, targets)
    assert resumed.resume() is None  # not resumable unless the cohort run says the checkpoints are this job's
    resumed.resumable = True
    assert resumed.resume() == 0 and resumed.round == 1
    resumed.fit(4)
    for name, value in whole.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[name], value)
    resumed.clear_checkpoints()
    assert not os.listdir(tmp_path)


def test_setup_restarts_from_initial_weights():
    ref, ref_label, targets = _pair(32)
    trainer = _trainer()
    first = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.setup(ref, ref_label, targets)
    trainer.fit(3)
    trainer.setup(ref, ref_label, targets, tag="_slice2")
    assert trainer.round == 0 and trainer.checkpoint_path(0).endswith("warp_slice2_round0.pt")
    for name, value in first.items():
        torch.testing.assert_close(trainer.network.state_dict()[name], value)


def test_training_works_under_no_grad():
    # MONAI evaluators and MONAI Label call inferers under no_grad
    ref, ref_label, targets = _pair(32)
    trainer = WarpTrainer(WarpNet(), WarpingLoss(), reference_augmentation(32), batch_size=2, progress=False)
    trainer.setup(ref, ref_label, targets)
    with torch.no_grad():
        loss = trainer.fit(2)
    assert np.isfinite(loss)


def test_iterations_scale_with_cohort_within_bounds():
    ref, ref_label, targets = _pair(32)
    trainer = WarpTrainer(
        WarpNet(), WarpingLoss(), reference_augmentation(32), batch_size=2, min_iterations=5, max_iterations=40
    )
    trainer.setup(ref, ref_label, targets)
    assert trainer.iterations_for(4) == 6  # ceil(4 * 3 / 2)
    assert trainer.iterations_for(1) == 5 and trainer.iterations_for(100) == 40 and trainer.iterations_for(0) == 0


def test_label_loss_is_low_for_matching_labels():
    target = one_hot(torch.from_numpy(disk((32, 32), (16, 16), 8)).long(), 1)[None]
    good = LabelLoss()(target.clamp(0.01, 0.99), target)
    bad = LabelLoss()(target.flip(1).clamp(0.01, 0.99), target)
    assert good < 0.1 < bad
