"""MONAI Label infer task: one new image in, its label map out, with the bundle's adapted model (models/model.pt).

The segmenter is the bundle's own ``configs/infer.yaml`` ``inferer`` (``bundle.adapted.AdaptedSegmenter``: SAM
backend, warping network, post-processing as configured there), built on the first request. The label comes back
in the image's geometry: an 8-bit PNG (H x W) for raster input, NIfTI with the image's affine otherwise.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from typing import Any, Dict, Tuple, Union

import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.adapted import load_adapted
from bundle.io import Case, output_name, read_image, save_label

logger = logging.getLogger(__name__)

RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class OneShotInferTask(InferTask):
    """Segments a new image with what a cohort run of the bundle learned (no reference files, no retraining).

    Args:
        bundle_root: the bundle folder (holds ``configs/infer.yaml``).
        model_path: the adapted model written by ``configs/inference.yaml``.
        device: where the bundle runs (``cpu`` / ``cuda``).
        refine_iterations: default test-time refinement steps of the warping network (a request may override).
    """

    def __init__(self, bundle_root: str, model_path: str, device: str = "cpu", refine_iterations: int = 0):
        self.bundle_root, self.model_path, self.device = bundle_root, model_path, device
        labels: Dict[str, int] = {}
        if os.path.isfile(model_path):
            state = load_adapted(model_path)
            labels = {name: int(v) for name, v in zip(state["class_names"], state["class_values"])}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=2,
            description="One-shot SAM segmentation with the bundle's adapted model (adapt once, infer many)",
            config={"refine_iterations": int(refine_iterations)},
        )
        self._segmenters: Dict[int, Any] = {}
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        return os.path.isfile(self.model_path)

    def get_path(self, validate: bool = True) -> Union[str, None]:
        return self.model_path if (not validate or self.is_valid()) else None

    def segmenter(self, refine_iterations: int = 0):
        """The ``inferer`` of ``configs/infer.yaml`` for this model, built once per refinement setting."""
        with self._lock:
            if refine_iterations not in self._segmenters:
                parser = ConfigParser()
                parser.read_config(os.path.join(self.bundle_root, "configs", "infer.yaml"))
                parser.update(
                    {
                        "bundle_root": self.bundle_root,
                        "model_path": self.model_path,
                        "device": f"$torch.device('{self.device}')",
                        "refine_iterations": int(refine_iterations),
                    }
                )
                self._segmenters[refine_iterations] = parser.get_parsed_content("inferer")
            return self._segmenters[refine_iterations]

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict[str, Any]]:
        """Run on ``request["image"]`` (a file path); returns (label file, result json)."""
        if not self.is_valid():
            raise FileNotFoundError(
                f"adapted model not found: {self.model_path}; run configs/inference.yaml on a cohort first"
            )
        start = time.time()
        path = request["image"]
        refine = int(request.get("refine_iterations", self._config["refine_iterations"]))
        segmenter = self.segmenter(refine)
        image, meta = read_image(path)
        loaded = time.time()
        with torch.no_grad():
            label = segmenter(image)
        done = time.time()
        suffix = ".png" if output_name(Case("x", path)).endswith(".png") else ".nii.gz"
        out = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        save_label(label, out, meta)
        result = {
            "label_names": dict(zip(segmenter.class_names, segmenter.class_values)),
            "sources": dict(zip(segmenter.class_names, segmenter.sources)),
            "image_size": list(label.shape),
            "latencies": {
                "pre": round(loaded - start, 3),
                "infer": round(done - loaded, 3),
                "post": round(time.time() - done, 3),
                "total": round(time.time() - start, 3),
            },
        }
        logger.info("one-shot infer on %s: %s", path, result["latencies"])
        return out, result
