"""MONAI Label app serving the one-shot SAM bundle's adapted model.

    monailabel start_server --app monailabel_app --studies /data/images \
        --conf sam2 false --conf zoo_source local [--conf model_path eval/model.pt] [--conf device cuda]

Tasks:
- ``oneshot`` (infer): an image in (2D raster, NIfTI, DICOM file or series), its label map out in the image's
  geometry; volumes are segmented slice by slice.
- ``oneshot_clicks`` (infer): foreground / background clicks in, the clicked structure corrected (the image's SAM
  embedding is cached, so each click costs one decode).
- ``oneshot`` (train): the one-shot adaptation on the datastore (the labelled image as reference, the unlabelled ones
  as cohort); the served model is swapped for the new one when it finishes, without a restart.

The model is the fitted model a cohort run of ``configs/inference.yaml`` saved (its ``adapted_model``:
``eval/model.pt`` with the default ``output_dir``), or the train task's. Nothing is downloaded: ``sam2`` and
``zoo_source`` are accepted for the usual offline flags and have no task behind them here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

APP_DIR = os.path.dirname(os.path.abspath(__file__))
BUNDLE_ROOT = os.path.dirname(APP_DIR)
for path in (BUNDLE_ROOT, APP_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

from lib.adapt_task import AdaptTask  # noqa: E402
from lib.oneshot_task import ClickTask, OneShotInferTask  # noqa: E402
from lib.served import RequestError, ServedModel, default_device  # noqa: E402

logger = logging.getLogger(__name__)


class OneShotSAMApp(MONAILabelApp):
    """Conf keys: ``model_path`` (default ``<bundle>/eval/model.pt``; relative to the bundle), ``device`` (default
    cuda when available), ``work_dir`` (the train task's outputs; default ``adapt`` beside the model), ``labels``
    (JSON name -> value naming the classes of a new reference), ``cache_size`` (SAM embeddings kept in memory,
    default 32), ``bundle_root``; ``sam2`` and ``zoo_source`` are accepted and unused (no download here)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = conf or {}
        self.bundle_root = os.path.abspath(conf.get("bundle_root", BUNDLE_ROOT))
        model_path = conf.get("model_path", os.path.join(self.bundle_root, "eval", "model.pt"))
        model_path = model_path if os.path.isabs(model_path) else os.path.join(self.bundle_root, model_path)
        device = conf.get("device") or default_device()
        self.served = ServedModel(self.bundle_root, model_path, device, int(conf.get("cache_size", 32)))
        self.work_dir = conf.get("work_dir") or os.path.join(os.path.dirname(model_path), "adapt")
        self.labels = json.loads(conf["labels"]) if conf.get("labels") else {}
        if not os.path.isfile(model_path):
            logger.warning("%s not found yet: run the train task (or configs/inference.yaml on a cohort)", model_path)
        logger.info("one-shot SAM app: model %s on %s", model_path, device)
        with open(os.path.join(self.bundle_root, "configs", "metadata.json")) as f:
            version = json.load(f).get("version", "0")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="One-shot SAM segmentation",
            description="Segments new images from what one labelled reference taught the bundle (LiteMedSAM)",
            version=version,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {"oneshot": OneShotInferTask(self.served), "oneshot_clicks": ClickTask(self.served)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {"oneshot": AdaptTask(self.served, self.bundle_root, self.work_dir, self.labels)}

    def infer(self, request: Dict[str, Any], datastore: Any = None) -> Dict[str, Any]:
        """MONAI Label's infer, with an image id the datastore does not know answered 404 (not a 500)."""
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore or self.datastore()
            if image not in store.list_images():
                raise RequestError(404, f"unknown image id {image!r}: not in the datastore and not a file")
        return super().infer(request, datastore)
