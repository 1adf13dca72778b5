"""MONAI Label infer tasks over the served adapted model: ``oneshot`` (an image in, its label map out) and
``oneshot_clicks`` (an annotator's clicks in, the clicked structure corrected).

Labels come back in the image's geometry: an 8-bit PNG (H x W) for raster input, otherwise NIfTI with the image's
affine and array layout (a NIfTI volume or DICOM series segmented slice by slice comes back as a volume).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Tuple, Union

import numpy as np
from lib.served import RequestError, ServedModel
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.dataset import Target
from bundle.heap import trim
from bundle.io import output_name, save_prediction

logger = logging.getLogger(__name__)


def _write(values: np.ndarray, target: Target) -> str:
    """(Z, H, W) label values -> a temporary PNG or NIfTI file in the image's geometry."""
    suffix = ".png" if output_name(target.case).endswith(".png") else ".nii.gz"
    out = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
    return save_prediction(values, out, target.volume)


def _size(target: Target) -> list[int]:
    return list(target.shape[1:]) if target.shape[0] == 1 else list(target.shape)


class _ServedTask(InferTask):
    """An infer task over a ``ServedModel``: its labels are the served model's, read again when the model changes."""

    def __init__(self, served: ServedModel, type: InferType, description: str):
        self.served = served
        super().__init__(type=type, labels={}, dimension=3, description=description)

    @property
    def labels(self) -> Dict[str, int]:  # the class map of the model on disk now (it changes after a train task)
        return self.served.class_map()

    @labels.setter
    def labels(self, _value: Any) -> None:
        pass

    def is_valid(self) -> bool:  # listed before the first adaptation too: a train task makes the model
        return True

    def get_path(self, validate: bool = True) -> Union[str, None]:
        return self.served.model_path if (not validate or os.path.isfile(self.served.model_path)) else None

    def run(self, request: Dict[str, Any]) -> Tuple[np.ndarray, Target, Dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict[str, Any]]:
        start = time.time()
        try:
            values, target, result = self.run(request)
        except RequestError as e:
            logger.warning("%s: %s", type(self).__name__, e)
            raise
        written = time.time()
        out = _write(values, target)
        trim()  # a long-lived server: what the request freed goes back to the system
        result.update(
            {
                "label_names": self.served.class_map(),
                "image_size": _size(target),
                "latencies": {
                    "infer": round(written - start, 3),
                    "write": round(time.time() - written, 3),
                    "total": round(time.time() - start, 3),
                },
            }
        )
        logger.info("%s on %s: %s", type(self).__name__, request.get("image"), result["latencies"])
        return out, result


class OneShotInferTask(_ServedTask):
    """Segments a new image (2D, or a volume slice by slice) with what a cohort run fitted: no reference files, no
    retraining."""

    def __init__(self, served: ServedModel):
        super().__init__(
            served,
            InferType.SEGMENTATION,
            "One-shot SAM segmentation with the bundle's adapted model (2D images and volumes, slice by slice)",
        )

    def run(self, request: Dict[str, Any]) -> Tuple[np.ndarray, Target, Dict[str, Any]]:
        values, target, _ = self.served.segment(request.get("image", ""))
        return values, target, {}


class ClickTask(_ServedTask):
    """Corrects one structure from an annotator's clicks, reusing the image's cached SAM embedding.

    Request: ``foreground`` / ``background`` points ((x, y) of a 2D image, (x, y, z) of a volume, as MONAI reads the
    array), ``structure`` (class name or value; default the first), optional ``slice`` and ``label`` (the label file
    being corrected, default the model's own mask; a ``label`` that is no file names the structure, as deepgrow
    clients send it). Returns a label holding only that structure.
    """

    def __init__(self, served: ServedModel):
        super().__init__(served, InferType.DEEPGROW, "Correct one structure with foreground / background clicks")

    def run(self, request: Dict[str, Any]) -> Tuple[np.ndarray, Target, Dict[str, Any]]:
        structure, label = request.get("structure"), request.get("label")
        if isinstance(label, str) and label and not os.path.exists(label):
            structure, label = structure or label, None  # a client naming the structure (segment) as ``label``
        values, target, summary = self.served.correct(
            request.get("image", ""),
            structure,
            request.get("foreground") or [],
            request.get("background") or [],
            request.get("slice"),
            label,
        )
        return values, target, summary
