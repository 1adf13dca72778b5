"""Adapt once, infer many: what a cohort run learned, saved as one file, and a segmenter for new single images.

``save_adapted`` writes ``models/model.pt`` at the end of a cohort run (``configs/inference.yaml``): a dict whose key
``network`` is the warping network's state dict (so Model Zoo tools can export it with ``--key_in_ckpt network``),
plus the reference image and label, the class map, the fused strategy's per-class source, the patch classifier's
trained head and the resolved settings. ``AdaptedSegmenter`` loads it and segments one new image at a time with the
same steps the cohort run used for each target, without the reference files and without retraining:

- a class whose source is ``warp``: the warping network carries the saved reference label onto the image; its warped
  label gives SAM's box + mask prompts (``OneShotInferer.from_warped``);
- ``aligned``: the patch classifier's probability map says where the structure is and how large; the image is
  pre-aligned to the reference accordingly and the second warping network (``aligned_network``) outlines it there
  (``OneShotInferer.aligned_frames`` / ``aligned_image`` / ``from_aligned``);
- ``match`` (models saved before 0.5.0): the box of the classifier's most probable region prompts SAM
  (``OneShotInferer.classifier_segment``);
- ``registration``: the warped label itself.

An optional short test-time refinement (``refine_iterations``) fine-tunes a copy of the warping network on the
reference -> new image pair before predicting; it is off by default.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.inferers import Inferer

from bundle.classifier import PatchClassifier
from bundle.features import sam_patch_features
from bundle.inferer import OneShotInferer, Prediction
from bundle.io import Case, case_id, load_datalist, output_name, read_label, read_target, save_label, to_class_index
from bundle.metrics import class_scores, summarize
from bundle.networks import WarpNet
from bundle.prompts import PromptGenerator, class_prototypes
from bundle.report import write_json, write_tables
from bundle.sam import LiteMedSAM, SamBackend
from bundle.transforms import normalize_intensity, one_hot, resize_label, scale_intensity, shrink, to_working

__all__ = ["FORMAT_VERSION", "SOURCES", "save_adapted", "load_adapted", "AdaptedSegmenter", "AdaptedRun"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: source "aligned" and its "aligned_network"; 3: its candidate frames ("aligned_scales")
SOURCES = ("warp", "aligned", "match", "registration")


def _decisions(inferer: OneShotInferer, num_classes: int) -> list[str] | None:
    """Per-class source of the cohort run: the fused strategy's choice, or the single strategy's (None: none)."""
    if inferer.strategy == "fused":
        return [inferer.decisions.get(f"class_{c + 1}", {}).get("source", "warp") for c in range(num_classes)]
    if inferer.strategy in ("warp", "registration"):
        return [inferer.strategy] * num_classes
    return None


def save_adapted(
    path: str,
    inferer: OneShotInferer,
    ref_image: np.ndarray,
    ref_label: np.ndarray,
    class_values: Sequence[int],
    class_names: Sequence[str],
    settings: dict[str, Any] | None = None,
) -> str | None:
    """Write what a cohort run learned to ``path`` (atomically: a temporary file, then a rename); returns the path.

    The ``match`` and ``persam`` strategies train nothing per cohort: for them a warning is logged, None returned.

    Args:
        path: e.g. ``models/model.pt``.
        inferer: the inferer after its cohort run (trained warping network, fitted classifier, decisions).
        ref_image: the reference image (H, W[, 3]).
        ref_label: the reference label as class indices 1..C (0 background).
        class_values / class_names: label value and name of each class, in class-index order.
        settings: the run's resolved settings, recorded as they are.
    """
    num_classes = len(class_values)
    sources = _decisions(inferer, num_classes)
    if sources is None:
        logger.warning(
            "strategy %r learns nothing to reuse: no adapted model saved (fused, warp and registration save one)",
            inferer.strategy,
        )
        return None
    if inferer.trainer is None:
        raise ValueError("the inferer has no warping trainer to save")
    classifier = None
    if "match" in sources or "aligned" in sources:
        classifier = inferer.classifier.state_dict()
    network = inferer.trainer.network
    weights = inferer.networks.get("warp", network.state_dict())
    aligned = inferer.networks.get("aligned") if "aligned" in sources else None
    state = {
        "version": FORMAT_VERSION,
        "network": {k: v.detach().cpu().clone() for k, v in weights.items()},
        "aligned_network": None if aligned is None else {k: v.detach().cpu().clone() for k, v in aligned.items()},
        "network_args": {
            "in_channels": int(network.encoder[0][0].conv.in_channels),
            "channels": list(network.channels),
            "hidden": int(network.affine_out.in_features),
        },
        "reference_image": torch.from_numpy(np.ascontiguousarray(ref_image, dtype=np.float32)),
        "reference_label": torch.from_numpy(np.ascontiguousarray(ref_label, dtype=np.uint8)),
        "class_values": [int(v) for v in class_values],
        "class_names": [str(n) for n in class_names],
        "working_size": int(inferer.working_size),
        "decisions": sources,
        "agreement": {k: v.get("agreement") for k, v in inferer.decisions.items()},
        "classifier": classifier,
        "prompter": {
            "use_box": inferer.prompter.use_box,
            "use_mask": inferer.prompter.use_mask,
            "num_points": inferer.prompter.num_points,
            "band": inferer.prompter.band,
            "threshold": inferer.prompter.threshold,
            "mask_logit": inferer.prompter.mask_logit,
        },
        "aligned_scales": [float(s) for s in inferer.aligned_scales],
        "refine": int(inferer.refine),
        "refine_multimask": bool(inferer.refine_multimask),
        "features": "sam" if inferer.features is None else type(inferer.features).__name__,
        "sam": type(inferer.sam).__name__,
        "settings": dict(settings or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    torch.save(state, tmp)
    os.replace(tmp, path)
    logger.info("adapted model saved to %s (per class: %s)", path, dict(zip(class_names, sources)))
    return path


def load_adapted(path: str) -> dict[str, Any]:
    """Read a file written by ``save_adapted``; a clear error when it is missing or of another kind."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"adapted model not found: {path}. Run configs/inference.yaml on a cohort first: it saves what it "
            "learned there (config id adapted_model)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "network" not in state or "reference_label" not in state:
        raise ValueError(f"{path} is not an adapted model written by configs/inference.yaml (bundle.adapted)")
    if int(state.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {state['version']}; this bundle reads up to {FORMAT_VERSION}")
    return state


class AdaptedSegmenter(Inferer):
    """Segments new single images with an adapted model (``models/model.pt``), no reference files, no retraining.

    Args:
        model_path: the file ``save_adapted`` wrote.
        sam: the SAM backend (LiteMedSAM when None); must be the one the cohort run used.
        network: a ``WarpNet`` matching the saved one (``network_def``); built from the saved shape when None.
        features: the matching features the cohort run used when they were not SAM's (e.g. ``Dinov2Features``).
        postprocessing: callable on a (1, H, W) class-index tensor (MONAI transforms), or None.
        refine_iterations: optional test-time refinement steps of the warping network per image (0: off).
        device: where the warping network runs.
    """

    def __init__(
        self,
        model_path: str,
        sam: SamBackend | None = None,
        network: WarpNet | None = None,
        features: Callable | None = None,
        postprocessing: Callable | None = None,
        refine_iterations: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        state = load_adapted(model_path)
        self.model_path = model_path
        self.state = state
        self.device = torch.device(device)
        self.class_values: list[int] = list(state["class_values"])
        self.class_names: list[str] = list(state["class_names"])
        self.sources: list[str] = list(state["decisions"])
        self.num_classes = len(self.class_values)
        self.working_size = int(state["working_size"])
        self.postprocessing = postprocessing
        self.refine_iterations = int(refine_iterations)
        if state.get("features", "sam") != "sam" and features is None and {"match", "aligned"} & set(self.sources):
            raise ValueError(
                f"{model_path} was adapted with {state['features']} matching features: pass the same features"
            )
        network = network if network is not None else WarpNet(**state["network_args"])
        network.load_state_dict(state["network"], strict=True)
        self.network = network.to(self.device).eval()
        needs_sam = any(s != "registration" for s in self.sources)
        self.sam = LiteMedSAM(device=self.device) if sam is None and needs_sam else sam
        if self.sam is not None and type(self.sam).__name__ != state.get("sam", type(self.sam).__name__):
            logger.warning("%s was adapted with %s, not %s: use the same SAM", model_path, state["sam"], type(sam))
        self.features = features
        ref_image = state["reference_image"].numpy()
        ref_label = state["reference_label"].long()
        self.reference_image = ref_image
        self.reference_label = ref_label.numpy()
        # the per-image SAM steps of the cohort run (prompting, decoding, refinement), reused as they are
        self.steps = OneShotInferer(
            self.sam,
            prompter=PromptGenerator(**state["prompter"]),
            strategy="match",  # a strategy that needs no trainer: only the per-image methods are used
            working_size=self.working_size,
            refine=int(state.get("refine", 0)),
            refine_multimask=bool(state.get("refine_multimask", False)),
            aligned_scales=tuple(state.get("aligned_scales", (1.0,))),
            progress=False,
        )
        # before version 3 the aligned source had one frame per image, not the best of several candidates
        self.aligned_candidates = int(state.get("version", 0)) >= 3
        onehot = one_hot(ref_label, self.num_classes)
        self.moving = to_working(torch.from_numpy(normalize_intensity(ref_image))[None], self.working_size)
        self.moving_label = to_working(onehot, self.working_size, mode="nearest")
        self.prototypes = None
        if self.steps.prompter.num_points > 0 and any(s == "warp" for s in self.sources):
            ref_emb = self.sam.encode(ref_image)
            self.prototypes = class_prototypes(ref_emb, onehot[1:], self.sam.img_size)
        self.classifier = None
        if "match" in self.sources or "aligned" in self.sources:
            if state.get("classifier") is None:
                raise ValueError(f"{model_path} has classes taken from the classifier but no classifier state")
            self.classifier = PatchClassifier().load_state_dict(state["classifier"])
        self.aligned_network = None
        if "aligned" in self.sources:
            if state.get("aligned_network") is None:
                raise ValueError(f"{model_path} has classes of source 'aligned' but no aligned_network")
            aligned_network = WarpNet(**state["network_args"])
            aligned_network.load_state_dict(state["aligned_network"], strict=True)
            self.aligned_network = aligned_network.to(self.device).eval()

    def _network_for(self, fixed: torch.Tensor) -> WarpNet:
        """The adapted network, or a briefly fine-tuned copy of it for this image (``refine_iterations``)."""
        if self.refine_iterations <= 0:
            return self.network
        from bundle.engine import WarpTrainer
        from bundle.losses import WarpingLoss

        settings = self.state.get("settings", {})
        loss = WarpingLoss(
            similarity=settings.get("similarity", "lncc"), lambda_reg=float(settings.get("lambda_reg", 0.6))
        )
        trainer = WarpTrainer(
            copy.deepcopy(self.network),
            loss,
            augmentation=None,
            lr=float(settings.get("lr", 5e-4)),
            batch_size=1,
            aug_weight=0.0,
            min_iterations=0,
            progress=False,
            device=self.device,
        )
        trainer.setup(self.moving, self.moving_label, fixed[None])
        trainer.fit(self.refine_iterations)
        return trainer.network.eval()

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> Prediction:
        """Per-class prediction (logits in the image frame) for one (H, W[, 3]) image."""
        image = np.asarray(image, dtype=np.float32)
        size = tuple(image.shape[:2])
        needs_sam = any(s != "registration" for s in self.sources)
        emb = self.sam.encode(image) if needs_sam else None
        parts: dict[str, Prediction] = {}
        if any(s in ("warp", "registration") for s in self.sources):
            fixed = to_working(torch.from_numpy(normalize_intensity(image))[None], self.working_size)
            network = self._network_for(fixed)
            ddf = network(self.moving[None].to(self.device), fixed[None].to(self.device))
            soft = network.warp_image(self.moving_label[None].to(self.device), ddf)[0].cpu()
            if "warp" in self.sources:
                parts["warp"] = self.steps.from_warped(soft, size, emb, self.prototypes)
            if "registration" in self.sources:
                parts["registration"] = self.steps.from_warped(soft, size, None)
        if "match" in self.sources or "aligned" in self.sources:
            feats = sam_patch_features(emb, self.sam.img_size) if self.features is None else self.features(image)
            grid = self.classifier(feats, tuple(feats.shape[1:]))
            aligned = self._aligned(image, grid, emb) if "aligned" in self.sources else None
            if aligned is None or "match" in self.sources:  # the classifier's box: a source, or the fallback
                parts["match"] = self.steps.classifier_segment(self.classifier.upsample(grid, size), emb)
            parts["aligned"] = aligned or parts.get("match")
        logits = torch.stack([parts[s].logits[c] for c, s in enumerate(self.sources)])
        iou = torch.stack([parts[s].iou[c] for c, s in enumerate(self.sources)])
        found = torch.stack([parts[s].found[c] for c, s in enumerate(self.sources)])
        return Prediction(logits, iou, found)

    def _aligned(self, image: np.ndarray, grid: torch.Tensor, emb) -> Prediction | None:
        """The cohort run's ``aligned`` steps for one image (None where the classifier finds none of its classes)."""
        classes = torch.tensor([s == "aligned" for s in self.sources])
        size = tuple(image.shape[:2])
        (candidates,) = self.steps.aligned_frames(self.reference_label, classes, [grid], [size])
        if not candidates:
            return None
        shape = tuple(self.reference_label.shape)
        fixed = torch.stack([self.steps.aligned_image(image, *pair, shape) for pair in candidates])
        if not self.aligned_candidates:
            fixed = fixed[:1]
        ddf = self.aligned_network(self.moving[None].to(self.device), fixed.to(self.device))
        moving_label = self.moving_label[None].to(self.device).expand(len(fixed), -1, -1, -1)
        softs = list(self.aligned_network.warp_image(moving_label, ddf).cpu())
        return self.steps.best_aligned(softs, candidates, shape, image, emb, classes)

    def label(self, image: np.ndarray) -> np.ndarray:
        """(H, W) class-index label map (0 background, 1..C), post-processed.

        The image is prepared as the cohort run prepared its targets: the same intensity window (or percentile
        clipping) and processing size; the label comes back at the image's size.
        """
        settings = self.state.get("settings", {})
        size = image.shape[:2]
        work = shrink(scale_intensity(image, settings.get("window")), int(settings.get("max_size") or 1024))
        label = self.predict(work).label()
        if self.postprocessing is not None:
            label = np.asarray(self.postprocessing(torch.from_numpy(label)[None]))[0].astype(np.int64)
        return label if label.shape == size else resize_label(label, size)

    def __call__(self, image: np.ndarray) -> np.ndarray:  # type: ignore[override]
        """(H, W) label map of one image in its own geometry, with the reference's label values."""
        values = np.array([0, *self.class_values], dtype=np.int64)
        return values[self.label(image)]


class AdaptedRun:
    """Segments new images with an adapted model and writes label maps (and scores where a label exists).

    Args:
        segmenter: the ``AdaptedSegmenter``.
        output_dir: where ``predictions/``, ``metrics.csv`` and ``summary.json`` go.
        image: one image path or a list of them (takes precedence over ``dataset_dir``).
        dataset_dir: a folder with a decathlon ``dataset.json``; every listed image, sorted by name.
        first_image / num_images: the slice of the sorted ``dataset_dir`` images to segment (0: all).
    """

    def __init__(
        self,
        segmenter: AdaptedSegmenter,
        output_dir: str,
        image: str | Sequence[str] | None = None,
        dataset_dir: str | None = None,
        first_image: int = 0,
        num_images: int = 0,
    ):
        self.segmenter, self.output_dir = segmenter, output_dir
        self.image, self.dataset_dir = image, dataset_dir
        self.first_image, self.num_images = int(first_image or 0), int(num_images or 0)

    def cases(self) -> list[Case]:
        """The images to segment, with their labels where the datalist has them."""
        if self.image:
            paths = [self.image] if isinstance(self.image, str) else list(self.image)
            return [Case(case_id(p), p) for p in paths]
        if not self.dataset_dir:
            raise ValueError("nothing to segment: give image (a path or a list) or dataset_dir (with dataset.json)")
        reference, targets, _ = load_datalist(self.dataset_dir)
        cases = sorted([reference, *targets], key=lambda c: os.path.basename(c.image_path))[self.first_image :]
        return cases[: self.num_images] if self.num_images > 0 else cases

    def run(self) -> dict[str, Any]:
        """Segment, write, score; returns the summary (also written to ``summary.json``)."""
        seg = self.segmenter
        os.makedirs(self.output_dir, exist_ok=True)
        pred_dir = os.path.join(self.output_dir, "predictions")
        rows, errors, seconds, outputs = [], [], [], []
        for case in self.cases():
            volume, problem = read_target(case.image_path)
            if volume is not None and volume.is_3d:
                volume, problem = None, f"is a 3D image ({volume.spatial_shape}): the adapted model segments 2D images"
            if problem:
                logger.warning("skipping %s: %s", case.image_path, problem)
                errors.append({"id": case.id, "image": case.image_path, "error": problem})
                continue
            image, meta = volume.slices[0], volume.meta
            start = time.time()
            label = seg(image)
            seconds.append(time.time() - start)
            outputs.append(save_label(label, os.path.join(pred_dir, output_name(case)), meta))
            if case.label_path and os.path.exists(case.label_path):
                truth = to_class_index(read_label(case.label_path), seg.class_values)
                if truth.shape == label.shape:
                    scores = class_scores(to_class_index(label, seg.class_values), truth, seg.num_classes)
                    rows.append({"id": case.id, **scores})
        write_tables(self.output_dir, rows, errors, seg.class_names)
        summary = {
            **summarize(rows, seg.class_names),
            "num_images": len(outputs),
            "num_scored": len(rows),
            "num_failed": len(errors),
            "model": seg.model_path,
            "sources": dict(zip(seg.class_names, seg.sources)),
            "seconds_per_image": round(float(np.mean(seconds)), 3) if seconds else None,
            "seconds_total": round(float(np.sum(seconds)), 2),
            "predictions": outputs,
        }
        write_json(os.path.join(self.output_dir, "summary.json"), summary)
        line = f"adapted model: {len(outputs)} image(s) in {summary['seconds_per_image']} s each"
        if rows:
            line += f", mean Dice {summary['dice_mean']:.2f} " + str(summary["per_class"])
        print(line, flush=True)
        return summary
