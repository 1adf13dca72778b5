"""MONAI Label infer task: one new image in, its label map out, with the bundle's fitted model.

The pieces are the bundle's own ``configs/infer.yaml`` ids (``store``: SAM backend; ``preprocessing``: how the
cohort run prepared its images; ``inferer``: the fitted model applied slice by slice with the post-processing),
and the model is applied exactly as the cohort run applied it (``bundle.model.OneShotModel``). The label comes back
in the image's geometry: an 8-bit PNG (H x W) for raster input, NIfTI with the image's affine otherwise.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from typing import Any, Dict, Tuple, Union

import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.io import Case, case_id, output_name, save_prediction
from bundle.model import OneShotModel, load_model_file

logger = logging.getLogger(__name__)


class OneShotInferTask(InferTask):
    """Segments a new image with what a cohort run of the bundle fitted (no reference files, no retraining).

    Args:
        bundle_root: the bundle folder (holds ``configs/infer.yaml``).
        model_path: the fitted model a cohort run of ``configs/inference.yaml`` saved (its ``adapted_model``).
        device: where the bundle runs (``cpu`` / ``cuda``).
    """

    def __init__(self, bundle_root: str, model_path: str, device: str = "cpu"):
        self.bundle_root, self.model_path, self.device = bundle_root, model_path, device
        labels: Dict[str, int] = {}
        if os.path.isfile(model_path):
            state = load_model_file(model_path)
            labels = {name: int(v) for name, v in zip(state["class_names"], state["class_values"])}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=2,
            description="One-shot SAM segmentation with the bundle's fitted model (adapt once, infer many)",
        )
        self._parts: Dict[str, Any] | None = None
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        return os.path.isfile(self.model_path)

    def get_path(self, validate: bool = True) -> Union[str, None]:
        return self.model_path if (not validate or self.is_valid()) else None

    def parts(self) -> Dict[str, Any]:
        """``configs/infer.yaml``'s store, preprocessing and inferer, and the loaded model, built once."""
        if self._parts is None:
            parser = ConfigParser()
            parser.read_config(os.path.join(self.bundle_root, "configs", "infer.yaml"))
            parser.update(
                {
                    "bundle_root": self.bundle_root,
                    "model_path": self.model_path,
                    "device": f"$torch.device('{self.device}')",
                }
            )
            parts = {k: parser.get_parsed_content(k) for k in ("store", "preprocessing", "inferer")}
            parts["model"] = OneShotModel.load(self.model_path, parts["store"], self.device)
            self._parts = parts
        return self._parts

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict[str, Any]]:
        """Run on ``request["image"]`` (a file path); returns (label file, result json)."""
        if not self.is_valid():
            raise FileNotFoundError(
                f"adapted model not found: {self.model_path}; run configs/inference.yaml on a cohort first"
            )
        start = time.time()
        path = request["image"]
        with self._lock:  # one embedding store and model: requests take turns
            parts = self.parts()
            model = parts["model"]
            target = parts["preprocessing"](Case(case_id(path), path))
            if target.error:
                raise ValueError(f"{path}: {target.error}")
            loaded = time.time()
            with torch.no_grad():
                label = parts["inferer"](target, model, parts["store"])[0]
        done = time.time()
        suffix = ".png" if output_name(target.case).endswith(".png") else ".nii.gz"
        out = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        save_prediction(np.array([0, *model.class_values])[label], out, target.volume)
        result = {
            "label_names": dict(zip(model.class_names, model.class_values)),
            "image_size": list(label.shape[1:]) if len(label) == 1 else list(label.shape),
            "latencies": {
                "pre": round(loaded - start, 3),
                "infer": round(done - loaded, 3),
                "post": round(time.time() - done, 3),
                "total": round(time.time() - start, 3),
            },
        }
        logger.info("one-shot infer on %s: %s", path, result["latencies"])
        return out, result
