"""MONAI Label train task: the one-shot adaptation run from the client on the datastore.

The labelled image (the ``final`` label an annotator saved) is the reference, the unlabelled images are the cohort;
``configs/inference.yaml`` fits on them, writes its usual outputs (predictions, metrics, qc.csv, report.html) to the
work folder and saves the adapted model to the served model's path in one atomic rename, so the infer tasks serve it
from their next request, without a restart. MONAI Label runs it in a background process; its log lines are the
progress the train-status endpoints (``GET /train/``) show.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict

import numpy as np
from lib.served import RequestError, ServedModel
from monai.bundle import ConfigParser
from monai.utils import set_determinism
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from bundle.io import read_volume

logger = logging.getLogger(__name__)


class AdaptTask(TrainTask):
    """Args:
    served: the served model, whose path the adapted model replaces.
    bundle_root: the bundle folder (holds ``configs/inference.yaml``).
    work_dir: where each adaptation writes its cohort outputs (``<work_dir>/<time>``).
    labels: class name -> label value, naming the reference's classes (default: the served model's names).

    Request keys (besides MONAI Label's): ``reference`` (image id; default the first labelled image),
    ``num_images`` (at most this many cohort images; 0 all), ``labels`` (as above), ``overrides`` (bundle config ids
    -> values, e.g. ``{"self_training": 1}``).
    """

    def __init__(self, served: ServedModel, bundle_root: str, work_dir: str, labels: Dict[str, int] | None = None):
        super().__init__(
            "One-shot adaptation: the labelled image teaches the model, the unlabelled ones are its cohort"
        )
        self.served, self.bundle_root, self.work_dir = served, bundle_root, work_dir
        self.labels = dict(labels or {})

    def config(self) -> Dict[str, Any]:
        return {"reference": "", "num_images": 0, "labels": self.labels, "overrides": {}}

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        start = time.time()
        reference, label_path, cohort = self._inputs(request, datastore)
        label_values = sorted(set(np.unique(np.rint(read_volume(label_path).slices)).astype(int).tolist()) - {0})
        given = request.get("labels") or self.labels
        names = self._names(given or self.served.class_map(), label_values, strict=bool(given))
        run_dir = os.path.join(self.work_dir, time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(run_dir, exist_ok=True)
        datalist = {
            "name": "MONAI Label datastore",
            "labels": {"0": "background", **{str(v): n for v, n in names.items()}},
            "training": [{"image": datastore.get_image_uri(reference), "label": label_path}],
            "test": [datastore.get_image_uri(i) for i in cohort],
        }
        with open(os.path.join(run_dir, "dataset.json"), "w") as f:
            json.dump(datalist, f, indent=2)
        logger.info(
            "adapting on %d images of the datastore, reference %s (classes %s); outputs in %s",
            len(cohort),
            reference,
            names,
            run_dir,
        )
        parser = ConfigParser()
        parser.read_config(os.path.join(self.bundle_root, "configs", "inference.yaml"))
        parser.update(
            {
                "bundle_root": self.bundle_root,
                "device": f"$torch.device('{self.served.device}')",
                "dataset_dir": run_dir,
                "output_dir": os.path.join(run_dir, "outputs"),
                "adapted_model": self.served.model_path,
                "overwrite_model": True,  # replacing the served model is the point
                "workflow#fail_on_errors": False,  # an unreadable datastore image is listed in errors.csv, no more
                "num_images": int(request.get("num_images") or 0),
                "progress": False,
                **dict(request.get("overrides") or {}),
            }
        )
        set_determinism(seed=int(parser.get("seed", 0)))
        parser.get_parsed_content("workflow").run()
        if not os.path.isfile(self.served.model_path):
            raise RuntimeError(f"the adaptation ended without a model at {self.served.model_path}; see {run_dir}")
        result = {
            "model": self.served.model_path,
            "reference": reference,
            "cohort": len(cohort),
            "labels": {n: v for v, n in names.items()},
            "outputs": os.path.join(run_dir, "outputs"),
            "failed_images": _count_rows(os.path.join(run_dir, "outputs", "errors.csv")),
            "seconds": round(time.time() - start, 1),
        }
        logger.info("adapted model saved: %s", result)
        return result

    @staticmethod
    def _inputs(request: Dict[str, Any], datastore: Datastore) -> tuple[str, str, list[str]]:
        """The reference image id, its label file and the cohort's image ids."""
        labelled = sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL))
        reference = request.get("reference") or (labelled[0] if labelled else "")
        if not reference:
            raise RequestError(409, "no labelled image in the datastore: label one image (final) to adapt on")
        if reference not in labelled:
            raise RequestError(409, f"reference {reference!r} has no final label in the datastore")
        cohort = sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL))
        if not cohort:
            raise RequestError(409, "no unlabelled image in the datastore to adapt on")
        label_id = datastore.get_label_by_image_id(reference, DefaultLabelTag.FINAL)
        return reference, datastore.get_label_uri(label_id, DefaultLabelTag.FINAL), cohort

    @staticmethod
    def _names(labels: Dict[str, int], values: list[int], strict: bool) -> Dict[int, str]:
        """Label value -> class name for the reference's values: from ``labels`` (name -> value), else class_<v>;
        ``strict``: every value must be named there (a class map the client gave)."""
        by_value = {int(v): str(n) for n, v in labels.items()}
        if strict and not set(values) <= set(by_value):
            raise RequestError(422, f"the reference label has values {values}, outside the class map {labels}")
        return {v: by_value.get(v, f"class_{v}") for v in values}


def _count_rows(csv_path: str) -> int:
    """Rows of a CSV file with a header (0 when it does not exist)."""
    if not os.path.isfile(csv_path):
        return 0
    with open(csv_path) as f:
        return max(sum(1 for line in f if line.strip()) - 1, 0)
