"""Test-time training of the warping network as an ignite engine (SPEC 2.1.2 and 2.1.8).

One iteration draws a batch of targets and a batch of augmented copies of the reference:
    L = warp(ref -> targets) + w_aug * [warp(ref -> aug ref) + DiceCE(warped ref label, aug label)]
        + w_pseudo * DiceCE(warped ref label, SAM pseudo-label)        (retraining rounds only)
With several processes the batch is split between them (data parallel): every process draws the same batch, takes
its share, and the gradients are summed, so the steps are those of one process up to floating-point order.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from typing import Callable, Iterator

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.utils import convert_to_tensor

from bundle.distributed import average_gradients, broadcast_module, is_main
from bundle.losses import LabelLoss, WarpingLoss
from bundle.networks import WarpNet

__all__ = ["WarpTrainer"]

logger = logging.getLogger(__name__)


class _RandomBatches:
    """Endless random batches of target indices (without replacement within a pass)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(self.n, generator=self.generator)
            for i in range(0, self.n, self.batch_size):
                yield order[i : i + self.batch_size]


class WarpTrainer(Engine):
    """Trains ``network`` to carry the reference onto every target; re-runnable once per round.

    Args:
        network: the warping network.
        warping_loss: similarity + smoothness loss.
        augmentation: MONAI dict transform producing an augmented reference pair (``image``, ``label``).
        lr: AdamW learning rate.
        batch_size: targets per iteration (and as many augmented reference pairs).
        aug_weight: weight of the augmentation loss.
        pseudo_weight: weight of the pseudo-label loss in retraining rounds.
        initial_epochs / round_epochs: passes over the targets before the first SAM pass / per retraining round.
        min_iterations / max_iterations: bounds on the optimisation steps of one round, whatever the cohort size.
        grad_clip: gradient-norm clipping (0: off); keeps the similarity loss from blowing up the field.
        checkpoint_dir: where the network is saved after each round (None: not saved).
        progress: show a progress bar.
        seed: seeds batch sampling and augmentation.
    """

    def __init__(
        self,
        network: WarpNet,
        warping_loss: WarpingLoss,
        augmentation: Callable,
        lr: float = 1e-3,
        batch_size: int = 8,
        aug_weight: float = 0.3,
        pseudo_weight: float = 1.0,
        initial_epochs: float = 30,
        round_epochs: float = 10,
        min_iterations: int = 100,
        max_iterations: int = 5000,
        grad_clip: float = 1.0,
        checkpoint_dir: str | None = None,
        progress: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        super().__init__(self._step)
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self.warping_loss = warping_loss
        self.label_loss = LabelLoss()
        self.augmentation = augmentation
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=lr)
        self.batch_size, self.aug_weight, self.pseudo_weight = batch_size, aug_weight, pseudo_weight
        self.initial_epochs, self.round_epochs = initial_epochs, round_epochs
        self.min_iterations, self.max_iterations = min_iterations, max_iterations
        self.checkpoint_dir = checkpoint_dir
        self.grad_clip = grad_clip
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.pseudo: torch.Tensor | None = None
        self.pseudo_weights: torch.Tensor | None = None
        self.round = 0
        self.tag = ""
        self.resumable = False  # set by the cohort run when the checkpoints on disk belong to this very job
        self._initial = copy.deepcopy((self.network.state_dict(), self.optimizer.state_dict()))
        if progress:
            ProgressBar(persist=False, desc="warp training").attach(self, output_transform=lambda out: {"loss": out})
        self.add_event_handler(Events.COMPLETED, self._save)

    def setup(self, moving: torch.Tensor, moving_label: torch.Tensor, fixed: torch.Tensor, tag: str = "") -> None:
        """Reference image (1, S, S), its one-hot label (K, S, S) and all targets (N, 1, S, S).

        Starts from the initial weights; ``tag`` names this job's checkpoints (several references in one run).
        """
        self.moving, self.moving_label, self.fixed = moving.float(), moving_label.float(), fixed.float()
        self.pseudo = self.pseudo_weights = None
        self.network.load_state_dict(self._initial[0])
        broadcast_module(self.network)  # the same start in every process
        self.optimizer.load_state_dict(self._initial[1])
        self.generator.manual_seed(self.seed)
        self.round, self.tag = 0, tag

    def set_pseudo_labels(self, labels: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """One-hot SAM pseudo-labels (N, K, S, S) for the targets, optionally weighted per target (N,)."""
        self.pseudo, self.pseudo_weights = labels.float(), None if weights is None else weights.float()

    def _augmented_batch(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for seed in seeds:
            self.augmentation.set_random_state(seed)
            out = self.augmentation({"image": self.moving.clone(), "label": self.moving_label.clone()})
            # plain tensors: MONAI's MetaTensor would route every op of the training step through its metadata hooks
            images.append(convert_to_tensor(out["image"], dtype=torch.float32, track_meta=False))
            labels.append(convert_to_tensor(out["label"], dtype=torch.float32, track_meta=False))
        return torch.stack(images), torch.stack(labels)

    def _step(self, engine: Engine, batch: torch.Tensor) -> float:
        self.network.train()
        rank, size = idist.get_rank(), idist.get_world_size()
        draws = len(batch) if self.aug_weight > 0 else 0
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)) for _ in range(draws)]
        idx, seeds = batch[rank::size], seeds[rank::size]  # this process's share of the batch
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(idx, seeds) * (len(idx) / len(batch)) if len(idx) else None
        if loss is not None:
            loss.backward()
        average_gradients(self.network)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        value = float(loss.detach()) if loss is not None else 0.0
        return float(idist.all_reduce(value)) if size > 1 else value

    def _loss(self, idx: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """The mean loss over targets ``idx`` and the reference augmented with ``seeds``."""
        dev = self.device
        n = len(idx)
        fixed = self.fixed[idx].to(dev)
        aug_label = None
        if self.aug_weight > 0:
            aug_image, aug_label = self._augmented_batch(seeds)
            fixed = torch.cat([fixed, aug_image.to(dev)])
        moving = self.moving[None].to(dev)
        # one pass for targets and augmented copies: the reference is encoded once per step
        ddf = self.network(moving, fixed)
        warped = self.network.warp_image(moving.expand(len(fixed), -1, -1, -1), ddf)
        loss = self.warping_loss(warped[:n], fixed[:n], ddf[:n])
        need_labels = aug_label is not None or (self.pseudo is not None and self.pseudo_weight > 0)
        if need_labels:
            warped_label = self.network.warp_image(self.moving_label[None].to(dev).expand(len(fixed), -1, -1, -1), ddf)
        if self.pseudo is not None and self.pseudo_weight > 0:
            weights = None if self.pseudo_weights is None else self.pseudo_weights[idx].to(dev)
            loss = loss + self.pseudo_weight * self.label_loss(warped_label[:n], self.pseudo[idx].to(dev), weights)
        if aug_label is not None:
            aug_loss = self.warping_loss(warped[n:], fixed[n:], ddf[n:])
            aug_loss = aug_loss + self.label_loss(warped_label[n:], aug_label.to(dev))
            loss = loss + self.aug_weight * aug_loss
        return loss

    def iterations_for(self, epochs: float) -> int:
        """Optimisation steps for ``epochs`` passes over the targets, within the configured bounds."""
        if epochs <= 0:
            return 0
        steps = math.ceil(epochs * len(self.fixed) / min(self.batch_size, len(self.fixed)))
        return int(min(max(steps, self.min_iterations), self.max_iterations))

    def fit(self, iterations: int | None = None) -> float:
        """Train for ``iterations`` steps (the initial or per-round default); returns the last loss."""
        if iterations is None:
            epochs = self.initial_epochs if self.round == 0 else self.round_epochs
            iterations = self.iterations_for(epochs)
        if iterations <= 0:
            return float("nan")
        data = _RandomBatches(len(self.fixed), min(self.batch_size, len(self.fixed)), self.generator)
        # inference engines may call us under no_grad: test-time training needs gradients regardless
        with torch.enable_grad():
            self.run(data, max_epochs=1, epoch_length=iterations)
        logger.info("warp round %d: %d iterations, final loss %.4f", self.round, iterations, self.state.output)
        self.round += 1
        return float(self.state.output)

    def checkpoint_path(self, round: int) -> str:
        return os.path.join(self.checkpoint_dir or ".", f"warp{self.tag}_round{round}.pt")

    def _save(self, engine: Engine) -> None:
        """After every round: weights, optimiser and sampling state, written atomically, so a rerun resumes here."""
        if self.checkpoint_dir and is_main():
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            path = self.checkpoint_path(self.round)
            state = {
                "network": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "round": self.round,
            }
            torch.save(state, path + ".part")
            os.replace(path + ".part", path)

    def resume(self) -> int | None:
        """Load the latest round checkpoint of this job when resumable; returns its round (None: start afresh)."""
        if not (self.resumable and self.checkpoint_dir and os.path.isdir(self.checkpoint_dir)):
            return None
        pattern = re.compile(rf"warp{re.escape(self.tag)}_round(\d+)\.pt$")
        done = sorted(int(m.group(1)) for n in os.listdir(self.checkpoint_dir) if (m := pattern.match(n)))
        if not done:
            return None
        state = torch.load(self.checkpoint_path(done[-1]), map_location=self.device, weights_only=False)
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.round = state["round"] + 1
        logger.info("warping network resumed from %s", self.checkpoint_path(done[-1]))
        return int(state["round"])

    def clear_checkpoints(self) -> None:
        """Remove the round checkpoints of an earlier, different job."""
        if self.checkpoint_dir and os.path.isdir(self.checkpoint_dir) and is_main():
            for name in os.listdir(self.checkpoint_dir):
                if name.startswith("warp") and name.endswith(".pt"):
                    os.remove(os.path.join(self.checkpoint_dir, name))
