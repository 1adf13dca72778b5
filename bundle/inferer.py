"""One-shot inferer: reference (image, label) + targets -> per-class SAM logits for every target.

Strategies (SPEC 2), one SAM backend and one prompt-to-mask step for all:
- ``warp`` (Med-PerSAM): a test-time-trained warping network carries the reference label onto each target; the
  warped label becomes SAM's mask + box (+ points) prompts; optional refinement and retraining rounds.
- ``match`` (SAT / AP-MedSAM): forward/backward patch matching gives points and a box, SAM decodes them, then SAM
  again with the box of its first mask.
- ``persam``: one positive and one negative point from prototype similarity, then a cascaded refinement.
- ``registration``: the warped label itself, no SAM.
- ``fused`` (default): warping and a patch classifier on the frozen features both propose a SAM mask per class;
  per class, the cohort-wide agreement of the two and the warp's own similarity decide whether the warp found the
  structure (see ``choose``). Where it did not, the structure moves or changes size: the classifier says where it is
  and how large, each target is pre-aligned to the reference accordingly (``bundle.alignment``) and a second
  warping network outlines it there (source ``aligned``); of several guesses at that frame, each target keeps the
  one whose SAM mask scores best (``aligned_score``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from scipy import ndimage
from tqdm import tqdm

from bundle.alignment import (
    Frame,
    boundary_strength,
    candidate_frames,
    combine_frames,
    from_reference,
    gradient_magnitude,
    label_frame,
    probable_region,
    solidity,
    to_reference,
)
from bundle.classifier import PatchClassifier, reference_views
from bundle.engine import WarpTrainer
from bundle.features import Dinov2Features, sam_patch_features
from bundle.matching import match_prompts
from bundle.prompts import (
    PromptGenerator,
    Prompts,
    class_prototypes,
    mask_to_box,
    masks_to_boxes,
    persam_prompts,
    similarity_map,
)
from bundle.sam import Embedding, SamBackend
from bundle.transforms import from_working, normalize_intensity, one_hot, to_working

__all__ = ["OneShotInferer", "Prediction", "STRATEGIES"]

logger = logging.getLogger(__name__)

STRATEGIES = ("fused", "warp", "match", "persam", "registration")


@dataclass
class Prediction:
    """Per-class logits (C, H, W) for one target, positive = inside; ``iou`` is SAM's estimate per class.

    ``found`` is False for a class no prompt could be made for (it is then empty, never guessed).
    """

    logits: torch.Tensor
    iou: torch.Tensor
    found: torch.Tensor = field(default=None)  # type: ignore[assignment]
    prompts: Prompts | None = None  # the first-pass prompts, kept for pictures

    def __post_init__(self):
        if self.found is None:
            self.found = (self.logits > 0).flatten(1).any(1)

    def label(self) -> np.ndarray:
        """(H, W) label map with classes 1..C; background where every logit is negative."""
        best, idx = self.logits.max(0)
        return np.where(best.numpy() > 0, idx.numpy() + 1, 0).astype(np.int64)

    def masks(self) -> np.ndarray:
        """(C, H, W) boolean masks of the label map."""
        lab = self.label()
        return np.stack([lab == c + 1 for c in range(self.logits.shape[0])])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


class OneShotInferer(Inferer):
    """Segments a cohort from one labelled reference.

    Args:
        sam: SAM backend (encodes every image once per run).
        trainer: test-time trainer of the warping network (``warp``, ``registration``, ``fused``).
        prompter: turns a warped soft mask per class into SAM prompts.
        strategy: one of ``STRATEGIES``.
        working_size: long side of the frame the warping network works in.
        rounds: retraining rounds of the warping network on SAM pseudo-labels after the first pass.
        refine: refinement passes (SAM output -> new prompts -> SAM) for warped prompts.
        refine_multimask: in refinement passes, ask SAM for three masks and keep the best predicted IoU.
        pseudo_iou_weight: weight pseudo-labels by SAM's predicted IoU.
        classifier: patch classifier of the ``fused`` strategy (a default one when None).
        self_training: rounds the classifier is retrained on SAM's answers for the targets.
        agreement: a class takes the warped prompts when the median Dice between the warp's and the classifier's
            SAM masks over the cohort reaches this; otherwise it takes the classifier's (unless ``warp_similarity``
            keeps the warp).
        warp_similarity: a class also keeps the warped prompts when the median correlation between the warped
            reference and the target around the warped structure reaches this (the warp demonstrably found it, so
            a disagreeing classifier is the one that is wrong); None turns this test off.
        features: matching features; the SAM encoder's when None, or e.g. ``Dinov2Features`` from a checkpoint.
        match_points: positive and as many negative points per class for ``match``.
        aligned_scales: size factors of the candidate frames of the aligned source (``candidate_frames``).
        progress: progress bars.
    """

    def __init__(
        self,
        sam: SamBackend,
        trainer: WarpTrainer | None = None,
        prompter: PromptGenerator | None = None,
        strategy: str = "fused",
        working_size: int = 128,
        rounds: int = 0,
        refine: int = 0,
        refine_multimask: bool = False,
        pseudo_iou_weight: bool = True,
        classifier: PatchClassifier | None = None,
        self_training: int = 2,
        agreement: float = 0.73,
        warp_similarity: float | None = 0.7,
        features: Dinov2Features | None = None,
        match_points: int = 8,
        aligned_scales: tuple[float, ...] = (1.0, 1.15),
        progress: bool = True,
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy in ("fused", "warp", "registration") and trainer is None:
            raise ValueError(f"strategy {strategy!r} needs a warping trainer")
        self.sam, self.trainer, self.prompter = sam, trainer, prompter or PromptGenerator()
        self.strategy, self.working_size = strategy, working_size
        self.rounds, self.refine, self.refine_multimask = rounds, refine, refine_multimask
        self.pseudo_iou_weight, self.progress = pseudo_iou_weight, progress
        self.classifier = classifier or PatchClassifier()
        self.self_training, self.agreement, self.warp_similarity = self_training, agreement, warp_similarity
        self.features, self.match_points = features, match_points
        self.aligned_scales = tuple(aligned_scales)
        self.embeddings: dict[str, Embedding] = {}
        self.feature_cache: dict[str, torch.Tensor] = {}
        self.timings: dict[str, float] = {}
        self.decisions: dict[str, dict] = {}
        self.networks: dict[str, dict] = {}  # trained warping networks by source ("warp", "aligned"), for saving

    def _clock(self, stage: str, start: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.time() - start, 2)

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, leave=False, disable=not self.progress)

    def embed(self, key: str, image: np.ndarray) -> Embedding:
        """Encoder output for an image, computed once per run."""
        if key not in self.embeddings:
            self.embeddings[key] = self.sam.encode(image)
        return self.embeddings[key]

    def patch_features(self, key: str, image: np.ndarray) -> torch.Tensor:
        """(D, h, w) matching features: the SAM encoder's (cached embedding) or the given feature encoder's."""
        if self.features is None:
            return sam_patch_features(self.embed(key, image), self.sam.img_size)
        if key not in self.feature_cache:
            self.feature_cache[key] = self.features(image)
        return self.feature_cache[key]

    def _working(self, image: np.ndarray) -> torch.Tensor:
        return to_working(torch.from_numpy(normalize_intensity(image))[None], self.working_size)

    def __call__(  # type: ignore[override]
        self,
        ref_image: np.ndarray,
        ref_label: np.ndarray,
        num_classes: int,
        targets: list[tuple[str, np.ndarray]],
        skip: set[str] | None = None,
        tag: str = "",
    ) -> list[Prediction | None]:
        """Segment ``targets`` ((id, (H, W[, 3]) image) pairs) given the reference and its label (classes 1..C).

        ``skip`` names targets whose result is already on disk: they still take part where the method needs the
        whole cohort (warp training, the fused agreement, classifier self-training) but are not decoded where it
        does not; their entry is then None. ``tag`` names the warping checkpoints of this reference.
        """
        self.decisions, self.networks = {}, {}
        skip = skip or set()
        ref_onehot = one_hot(torch.from_numpy(ref_label), num_classes)
        cohort = self.strategy == "fused" or (self.strategy == "warp" and self.rounds > 0)
        todo = targets if cohort else [t for t in targets if t[0] not in skip]
        if self.strategy != "registration":
            start = time.time()
            for key, img in self._bar(todo, "SAM encoding"):
                self.embed(key, img)
            self._clock("sam_encoding_s", start)
        if self.strategy in ("match", "persam"):
            run = self._matched if self.strategy == "match" else self._persam
            done = dict(zip([k for k, _ in todo], run(ref_image, ref_onehot, todo)))
            return [done.get(k) for k, _ in targets]
        warped = self._warped(ref_image, ref_onehot, targets, num_classes, set() if cohort else skip, tag)
        if self.strategy != "fused":
            return warped
        similarity = self.trainer.warp_similarity()
        start = time.time()
        classified, grids = self._classified(ref_image, ref_label, targets, num_classes)
        self._clock("classifier_s", start)
        use_warp = self.choose(warped, classified, similarity)
        if not use_warp.all():
            aligned = self._aligned(ref_image, ref_label, ~use_warp, targets, grids, tag)
            classified = [m if a is None else a for a, m in zip(aligned, classified)]
        return self.combine(use_warp, warped, classified)

    # warp / registration --------------------------------------------------------------------------------------
    def _warped(self, ref_image, ref_onehot, targets, num_classes, skip, tag) -> list[Prediction | None]:
        S = self.working_size
        self.trainer.setup(
            self._working(ref_image),
            to_working(ref_onehot, S, mode="nearest"),
            torch.stack([self._working(img) for _, img in targets]),
            tag,
        )
        use_sam = self.strategy != "registration"
        prototypes = None
        if use_sam and self.prompter.num_points > 0:  # the reference is encoded only for the points' prototypes
            prototypes = class_prototypes(self.embed("__reference__", ref_image), ref_onehot[1:], self.sam.img_size)
        rounds = self.rounds if use_sam else 0
        first = self._fit()
        predictions: list[Prediction | None] = []
        for r in range(first, rounds + 1):
            start = time.time()
            warped = self.trainer.predict()
            predictions = []
            for (key, img), soft in self._bar(list(zip(targets, warped)), f"SAM round {r}"):
                if r == rounds and key in skip:
                    predictions.append(None)
                    continue
                emb = self.embed(key, img) if use_sam else None
                predictions.append(self.from_warped(soft, img.shape[:2], emb, prototypes))
            self._clock("prompting_and_sam_decoding_s", start)
            if r < rounds:
                start = time.time()
                self._retrain(predictions, num_classes)
                self._clock("warp_training_s", start)
        self.networks["warp"] = copy.deepcopy(self.trainer.network.state_dict())
        return predictions

    def _fit(self, stage: str = "warp_training_s") -> int:
        """Resume the last round a killed run of this job finished, else train from scratch; returns that round."""
        first = self.trainer.resume()
        if first is None:
            start = time.time()
            self.trainer.fit()
            self._clock(stage, start)
            first = 0
        return first

    def from_warped(
        self,
        soft: torch.Tensor,
        size: tuple[int, int],
        embedding: Embedding | None,
        prototypes: torch.Tensor | None = None,
    ) -> Prediction:
        """Prediction for one target from its warped soft label (K, S, S) in the working frame.

        With an embedding, SAM decodes the prompts made from it (``segment``); without one (``registration``), the
        warped label itself is the answer.
        """
        probs = from_working(soft, size)[1:].clamp(0, 1)
        if embedding is None:
            return Prediction(torch.logit(probs.clamp(1e-4, 1 - 1e-4)), torch.ones(probs.shape[0]))
        return self.segment(embedding, probs, prototypes)

    def _retrain(self, predictions: list[Prediction], num_classes: int) -> None:
        labels = torch.stack(
            [
                to_working(one_hot(torch.from_numpy(p.label()), num_classes), self.working_size, "nearest")
                for p in predictions
            ]
        )
        weights = torch.stack([p.iou.mean() for p in predictions]) if self.pseudo_iou_weight else None
        self.trainer.set_pseudo_labels(labels, weights)
        self.trainer.fit()

    def _decode(
        self, embedding: Embedding, prompts: Prompts, multimask: bool, logits: torch.Tensor, iou: torch.Tensor
    ) -> None:
        """SAM on the valid rows of ``prompts``; writes the best mask per row into ``logits`` / ``iou``."""
        keep = prompts.valid
        if not keep.any():
            return
        out, score = self.sam.predict(embedding, **prompts.rows(keep), multimask=multimask)
        best = score.argmax(1)
        rows = torch.arange(len(best))
        logits[keep], iou[keep] = out[rows, best].cpu(), score[rows, best].cpu()

    @torch.no_grad()
    def segment(self, embedding: Embedding, probs: torch.Tensor, prototypes: torch.Tensor | None = None) -> Prediction:
        """SAM on prompts from (C, H, W) probabilities, then ``refine`` passes; classes without a mask stay empty."""
        C = probs.shape[0]
        logits = torch.full((C, *embedding.original_size), -20.0)
        iou = torch.zeros(C)
        prompts = first = self.prompter(self.sam, embedding, probs, prototypes)
        found = prompts.valid.clone()
        self._decode(embedding, prompts, False, logits, iou)
        for _ in range(self.refine if found.any() else 0):
            # SAM's answer, binarised, becomes the next mask prompt and box (raw SAM logits as a mask prompt
            # make LiteMedSAM drift: measured in docs/benchmarks.md)
            prompts = self.prompter(self.sam, embedding, (logits > 0).float(), prototypes)
            self._decode(embedding, prompts, self.refine_multimask, logits, iou)
        return Prediction(logits, iou, found, first)

    # match / persam ----------------------------------------------------------------------------------------------
    def _box_pass(self, embedding: Embedding, logits: torch.Tensor, iou: torch.Tensor, found: torch.Tensor) -> None:
        """Second pass: the box of each class's first mask, multimask, best predicted IoU."""
        box, valid = masks_to_boxes((logits > 0).numpy())
        valid &= found
        if valid.any():
            self._decode(embedding, Prompts(box, None, None, None, valid), True, logits, iou)

    def _matched(self, ref_image, ref_onehot, targets) -> list[Prediction]:
        start = time.time()
        ref_feats = self.patch_features("__reference__", ref_image)
        predictions = []
        for key, img in self._bar(targets, "matching"):
            emb = self.embeddings[key]
            prompts = match_prompts(
                ref_feats, ref_onehot[1:], self.patch_features(key, img), emb.original_size, self.match_points
            )
            C = prompts.valid.shape[0]
            logits, iou = torch.full((C, *emb.original_size), -20.0), torch.zeros(C)
            self._decode(emb, prompts, True, logits, iou)
            self._box_pass(emb, logits, iou, prompts.valid)
            predictions.append(Prediction(logits, iou, prompts.valid.clone(), prompts))
        self._not_found(predictions)
        self._clock("prompting_and_sam_decoding_s", start)
        return predictions

    def _persam(self, ref_image, ref_onehot, targets) -> list[Prediction]:
        start = time.time()
        masks = ref_onehot[1:]
        prototypes = class_prototypes(self.embed("__reference__", ref_image), masks, self.sam.img_size)
        has = masks.flatten(1).any(1)
        predictions = []
        for key, _ in self._bar(targets, "PerSAM"):
            emb = self.embeddings[key]
            prompts = persam_prompts(similarity_map(emb, prototypes, self.sam.img_size).cpu(), has)
            C = has.shape[0]
            logits, iou = torch.full((C, *emb.original_size), -20.0), torch.zeros(C)
            self._decode(emb, prompts, True, logits, iou)
            # cascaded refinement: the first mask (as a mask prompt) and its box join the two points
            first = (logits > 0).float()
            box, valid = masks_to_boxes(first.numpy().astype(bool))
            valid &= has
            refined = Prompts(
                box, prompts.points, prompts.point_labels, self.sam.mask_prompt(first, emb.original_size), valid
            )
            self._decode(emb, refined, True, logits, iou)
            predictions.append(Prediction(logits, iou, has.clone(), prompts))
        self._clock("prompting_and_sam_decoding_s", start)
        return predictions

    def _not_found(self, predictions: list[Prediction]) -> None:
        missing = sum(int((~p.found).sum()) for p in predictions)
        if missing:
            logger.warning(
                "%d class(es) over %d image(s) had no positive match and are left empty", missing, len(predictions)
            )

    # fused -------------------------------------------------------------------------------------------------------
    def classifier_segment(self, probs: torch.Tensor, embedding: Embedding) -> Prediction:
        """SAM on the box of the most probable connected region of each class in a (C + 1, H, W) probability map."""
        C = probs.shape[0] - 1
        boxes = np.zeros((C, 4), np.float32)
        valid = torch.zeros(C, dtype=torch.bool)
        for c in range(C):
            region = probable_region(probs[c + 1].numpy())
            if region is not None:
                boxes[c], valid[c] = mask_to_box(region), True
        logits, iou = torch.full((C, *embedding.original_size), -20.0), torch.zeros(C)
        prompts = Prompts(torch.from_numpy(boxes), None, None, None, valid)
        self._decode(embedding, prompts, False, logits, iou)
        return Prediction(logits, iou, valid, prompts)

    def _classified(self, ref_image, ref_label, targets, num_classes) -> tuple[list[Prediction], list[torch.Tensor]]:
        """The classifier's SAM masks per target and its last probability maps on the feature grid (C + 1, h, w)."""

        def soft(label: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
            oh = one_hot(torch.from_numpy(label), num_classes)
            return F.interpolate(oh[None].float(), size=grid, mode="area")[0]

        base = []
        for i, (img, lab) in enumerate([(ref_image, ref_label), *reference_views(ref_image, ref_label)]):
            # view 0 is the reference itself: same cache key as the warp prototypes and match / persam use
            feats = self.patch_features("__reference__" if i == 0 else f"__reference_view{i}__", img)
            base.append((feats, soft(lab, tuple(feats.shape[1:])), 1.0))
        self.classifier.fit(base, num_classes)
        predictions: list[Prediction] = []
        grids: list[torch.Tensor] = []
        for r in range(self.self_training + 1):
            predictions, pseudo, grids = [], [], []
            for key, img in self._bar(targets, f"classifier round {r}"):
                emb, feats = self.embeddings[key], self.patch_features(key, img)
                grids.append(self.classifier(feats, tuple(feats.shape[1:])))
                pred = self.classifier_segment(self.classifier.upsample(grids[-1], emb.original_size), emb)
                predictions.append(pred)
                pseudo.append(
                    (
                        feats,
                        soft(pred.label(), tuple(feats.shape[1:])),
                        float(pred.iou[pred.found].mean()) if pred.found.any() else 0.0,
                    )
                )
            if r < self.self_training:
                self.classifier.fit(base + pseudo, num_classes)
        return predictions, grids

    def choose(
        self, warped: list[Prediction], classified: list[Prediction], similarity: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per class (C,), True where the warp found the structure; records the measurements in ``decisions``.

        Agreement is the median Dice, over the targets, between the warp's and the classifier's SAM masks of a class.
        High agreement means the anatomy sits where the warping puts it (e.g. chest X-rays), and the warp's mask
        prompt gives SAM a better outline; low agreement means the structure moves or changes size (lesions, fetal
        heads) and the warping lost it, or that the classifier is wrong. ``similarity`` (N, C) from
        ``WarpTrainer.warp_similarity`` tells these apart: a class whose median reaches ``warp_similarity`` keeps
        the warp whatever the agreement.
        """
        C = warped[0].logits.shape[0]
        pw, pc = [p.masks() for p in warped], [p.masks() for p in classified]
        use_warp = []
        for c in range(C):
            agree = float(np.median([_dice(a[c], b[c]) for a, b in zip(pw, pc)]))
            decision = {"agreement": round(agree, 3)}
            found = agree >= self.agreement
            if similarity is not None:
                sim = float(similarity[:, c].median())
                decision["warp_similarity"] = round(sim, 3)
                found |= self.warp_similarity is not None and sim >= self.warp_similarity
            use_warp.append(found)
            self.decisions[f"class_{c + 1}"] = {**decision, "source": "warp" if found else "aligned"}
        logger.info("fused strategy, per class: %s", self.decisions)
        return torch.tensor(use_warp)

    @staticmethod
    def combine(use_warp: torch.Tensor, warped: list[Prediction], other: list[Prediction]) -> list[Prediction]:
        """Per class, the warp's prediction where ``use_warp`` (C,) holds, else the other source's."""
        out = []
        for w, m in zip(warped, other):
            out.append(
                Prediction(
                    torch.where(use_warp[:, None, None], w.logits, m.logits),
                    torch.where(use_warp, w.iou, m.iou),
                    torch.where(use_warp, w.found, m.found),
                    Prompts.choose(use_warp, w.prompts, m.prompts),
                )
            )
        return out

    def fuse(
        self, warped: list[Prediction], classified: list[Prediction], similarity: torch.Tensor | None = None
    ) -> list[Prediction]:
        """``choose`` then ``combine``: the warp's masks where it found the structure, else the classifier's."""
        return self.combine(self.choose(warped, classified, similarity), warped, classified)

    def aligned_frames(
        self, ref_label: np.ndarray, classes: torch.Tensor, grids: list[torch.Tensor], sizes: list[tuple[int, int]]
    ) -> list[list[tuple[Frame, Frame]]]:
        """Per target, candidate (its frame, the reference's frame) pairs for ``classes`` (C,) from the classifier's
        grid probabilities (``candidate_frames`` per class, combined over the classes found in both; [] for none).

        The first candidate is the region's own frame, the one the aligned warping network trains on.
        """
        index = (torch.nonzero(classes)[:, 0] + 1).tolist()
        reference = [label_frame(ref_label == c) for c in index]
        out: list[list[tuple[Frame, Frame]]] = []
        for grid, size in zip(grids, sizes):
            probs = self.classifier.upsample(grid, size)
            frames = [candidate_frames(probs[c].numpy(), ref_label == c, self.aligned_scales) for c in index]
            keep = [i for i, (f, r) in enumerate(zip(frames, reference)) if f and r is not None]
            if not keep:
                out.append([])
                continue
            ref = combine_frames([reference[i] for i in keep])
            out.append([(combine_frames(list(guess)), ref) for guess in zip(*[frames[i] for i in keep])])
        return out

    def aligned_score(self, prediction: Prediction, classes: torch.Tensor, gradient: np.ndarray | None = None) -> float:
        """How good an aligned prediction looks over ``classes`` (C,), averaged: SAM's predicted IoU times the solidity
        of the mask's largest component (a mask that leaked into the tissue next to a structure is less convex),
        times, given the image's ``gradient_magnitude``, the square root of how strongly its outline follows image
        edges (a mask that stopped inside the fluid around a fetal head, or in the skin around a lesion, does not)."""
        masks = prediction.masks()
        scores = []
        for c in torch.nonzero(classes & prediction.found)[:, 0].tolist():
            region = probable_region(masks[c].astype(np.float32))
            if region is None:
                scores.append(0.0)
                continue
            region = ndimage.binary_fill_holes(region)
            score = float(prediction.iou[c]) * solidity(region)
            scores.append(score if gradient is None else score * np.sqrt(boundary_strength(gradient, region)))
        return float(np.mean(scores)) if scores else 0.0

    def aligned_image(self, image: np.ndarray, frame: Frame, reference: Frame, shape: tuple[int, int]) -> torch.Tensor:
        """A target resampled into the reference's frame, in the warping network's working frame (1, S, S)."""
        aligned = to_reference(normalize_intensity(image), frame, reference, shape)
        return to_working(torch.from_numpy(aligned)[None], self.working_size)

    def from_aligned(
        self, soft: torch.Tensor, frame: Frame, reference: Frame, shape: tuple[int, int], embedding: Embedding
    ) -> Prediction:
        """SAM on the prompts from a warped soft label (K, S, S) of an aligned pair, mapped back to the target."""
        probs = from_reference(from_working(soft, shape)[1:], frame, reference, embedding.original_size)
        return self.segment(embedding, probs.clamp(0, 1))

    def best_aligned(
        self,
        softs: list[torch.Tensor],
        candidates: list[tuple[Frame, Frame]],
        shape: tuple[int, int],
        image: np.ndarray,
        embedding: Embedding,
        classes: torch.Tensor,
    ) -> Prediction:
        """SAM on each candidate's warped soft label (K, S, S) (``from_aligned``) for the target ``image``; the best
        by ``aligned_score``."""
        gradient = gradient_magnitude(image)
        best, best_score = None, -1.0
        for soft, pair in zip(softs, candidates):
            pred = self.from_aligned(soft, *pair, shape, embedding)
            score = self.aligned_score(pred, classes, gradient)
            if score > best_score:
                best, best_score = pred, score
        return best

    def _aligned(self, ref_image, ref_label, classes, targets, grids, tag) -> list[Prediction | None]:
        """Warping on targets pre-aligned to the reference by where the classifier finds ``classes`` (C,) and how
        large; per target the best-scoring of its candidate frames (``aligned_score``); None where the classifier
        found none of the classes."""
        shape = tuple(ref_label.shape)
        candidates = self.aligned_frames(ref_label, classes, grids, [img.shape[:2] for _, img in targets])
        found = [i for i, c in enumerate(candidates) if c]
        out: list[Prediction | None] = [None] * len(targets)
        if not found:
            return out
        num_classes = int(classes.shape[0])
        self.trainer.setup(
            self._working(ref_image),
            to_working(one_hot(torch.from_numpy(ref_label), num_classes), self.working_size, mode="nearest"),
            torch.stack([self.aligned_image(targets[i][1], *candidates[i][0], shape) for i in found]),
            f"{tag}_aligned",
        )
        self._fit("aligned_warp_training_s")
        self.networks["aligned"] = copy.deepcopy(self.trainer.network.state_dict())
        start = time.time()
        softs: list[list[torch.Tensor]] = [[] for _ in targets]
        fixed = self.trainer.fixed  # the first candidates: the training images
        for j in range(len(candidates[found[0]])):
            if j:
                fixed = torch.stack([self.aligned_image(targets[i][1], *candidates[i][j], shape) for i in found])
            for i, soft in zip(found, self.trainer.predict(fixed=fixed)):
                softs[i].append(soft)
        for i in self._bar(found, "SAM aligned"):
            key, image = targets[i]
            out[i] = self.best_aligned(softs[i], candidates[i], shape, image, self.embeddings[key], classes)
        self._clock("prompting_and_sam_decoding_s", start)
        return out
