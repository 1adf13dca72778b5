"""MONAI Label app serving the one-shot SAM bundle's adapted model.

    monailabel start_server --app monailabel_app --studies /data/images \
        --conf sam2 false --conf zoo_source local [--conf model_path eval/model.pt] [--conf device cpu]

One infer task, ``oneshot``: a new image in, its label map out (PNG for raster input, NIfTI otherwise). The model
is the fitted model a cohort run of ``configs/inference.yaml`` saved (its ``adapted_model``: ``eval/model.pt`` with the
default ``output_dir``). Nothing is downloaded:
``sam2`` and ``zoo_source`` are accepted for the usual offline flags and have no task behind them here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

APP_DIR = os.path.dirname(os.path.abspath(__file__))
BUNDLE_ROOT = os.path.dirname(APP_DIR)
for path in (BUNDLE_ROOT, APP_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

from lib.oneshot_task import OneShotInferTask  # noqa: E402

logger = logging.getLogger(__name__)


class OneShotSAMApp(MONAILabelApp):
    """Conf keys: ``model_path`` (default ``<bundle>/eval/model.pt``), ``bundle_root``, ``device``; ``sam2`` and
    ``zoo_source`` are accepted and unused (no download here)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = conf or {}
        self.bundle_root = os.path.abspath(conf.get("bundle_root", BUNDLE_ROOT))
        model_path = conf.get("model_path", os.path.join(self.bundle_root, "eval", "model.pt"))
        self.model_path = model_path if os.path.isabs(model_path) else os.path.join(self.bundle_root, model_path)
        self.device = conf.get("device", "cpu")
        if not os.path.isfile(self.model_path):
            logger.warning("%s not found: run configs/inference.yaml on a cohort first", self.model_path)
        with open(os.path.join(self.bundle_root, "configs", "metadata.json")) as f:
            version = json.load(f).get("version", "0")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="One-shot SAM segmentation",
            description="Segments a new image from what one labelled reference taught the bundle (LiteMedSAM)",
            version=version,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {"oneshot": OneShotInferTask(self.bundle_root, self.model_path, self.device)}
