"""The adapted model as the MONAI Label tasks serve it: one SAM backend and embedding cache shared by every task,
the fitted model reloaded when its file changes (a train task swaps it in without a restart), and bad requests
turned into HTTP 4xx answers with a message.

The pieces are the bundle's own ``configs/infer.yaml`` ids (``store``: SAM backend and embedding cache;
``preprocessing``: how the cohort run prepared its images; ``inferer``: the fitted model applied slice by slice with
the post-processing), so a served image is segmented exactly as the cohort run and ``configs/infer.yaml`` segment it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any, Sequence

import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser

from bundle.clicks import clicks_honoured, correct_mask
from bundle.dataset import Target
from bundle.io import Case, case_id, read_label_volume
from bundle.model import OneShotModel, load_model_file
from bundle.transforms import resize_label

logger = logging.getLogger(__name__)


class RequestError(HTTPException):
    """A request the server cannot serve as asked: MONAI Label's endpoints answer it with ``status`` and the message
    (FastAPI's ``HTTPException``: ``RequestError(status, message)``), and the server goes on serving."""

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ServedModel:
    """The fitted model a cohort run saved at ``model_path``, applied to single images and clicks.

    Args:
        bundle_root: the bundle folder (holds ``configs/infer.yaml``).
        model_path: the adapted model (``configs/inference.yaml``'s ``adapted_model``); reloaded when it changes.
        device: where SAM and the model run.
        cache_size: SAM embeddings of this many slices stay in memory, so clicks on an image reuse its embedding.
    """

    def __init__(self, bundle_root: str, model_path: str, device: str = "cpu", cache_size: int = 32):
        self.bundle_root, self.model_path, self.device = bundle_root, model_path, device
        self.cache_size = int(cache_size)
        self.lock = threading.RLock()  # one SAM, one cache, one model: requests take turns
        self._parser: ConfigParser | None = None
        self._parts: dict[str, Any] = {}
        self._stamp: tuple[int, int] | None = None
        self._class_map: tuple[tuple[int, int] | None, dict[str, int]] = (None, {})

    def stamp(self) -> tuple[int, int] | None:
        """(mtime ns, size) of the model file, None while there is none."""
        try:
            st = os.stat(self.model_path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def class_map(self) -> dict[str, int]:
        """Class name -> label value of the model on disk now ({} without one)."""
        stamp = self.stamp()
        if stamp is None:
            return {}
        if self._class_map[0] != stamp:
            state = load_model_file(self.model_path)
            self._class_map = (stamp, {n: int(v) for n, v in zip(state["class_names"], state["class_values"])})
        return dict(self._class_map[1])

    def _load(self) -> dict[str, Any]:
        """The store, preprocessing, inferer and model, the model (and the preparation it fixes) loaded again when the
        file changed since the last request. Call with the lock held."""
        stamp = self.stamp()
        if stamp is None:
            raise RequestError(
                409, f"no adapted model at {self.model_path} yet: run the train task (or configs/inference.yaml) first"
            )
        if self._parser is None:
            parser = ConfigParser()
            parser.read_config(os.path.join(self.bundle_root, "configs", "infer.yaml"))
            parser.update(
                {
                    "bundle_root": self.bundle_root,
                    "model_path": self.model_path,
                    "device": f"$torch.device('{self.device}')",
                    "store#max_in_memory": self.cache_size,
                }
            )
            self._parts = {k: parser.get_parsed_content(k) for k in ("store", "inferer")}
            self._parser = parser
        if stamp != self._stamp:
            # the preparation (intensity window, processing size) comes from the model file: parsed again with it
            self._parts["preprocessing"] = self._parser.get_parsed_content("preprocessing", lazy=False)
            self._parts["model"] = OneShotModel.load(self.model_path, self._parts["store"], self.device)
            if self._stamp is not None:
                logger.info("adapted model changed on disk: %s reloaded", self.model_path)
            self._stamp = stamp
        return self._parts

    def prepare(self, path: str, preprocessing: Any) -> Target:
        """Read and prepare an image; its slices are keyed by the file's identity (path, size, mtime), so an
        embedding cached for it is reused until the file changes."""
        if not path or not os.path.exists(path):
            raise RequestError(404, f"image not found: {path or '(empty)'}")
        st = os.stat(path)
        digest = hashlib.sha1(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target = preprocessing(Case(f"{case_id(path)}-{digest}", path))
        if target.error:
            raise RequestError(422, f"{os.path.basename(path)}: {target.error}")
        return target

    def segment(self, path: str) -> tuple[np.ndarray, Target, OneShotModel]:
        """(Z, H, W) label values of the image at ``path``, its prepared target (geometry) and the model used."""
        with self.lock:
            parts = self._load()
            model = parts["model"]
            target = self.prepare(path, parts["preprocessing"])
            with torch.no_grad():
                index = parts["inferer"](target, model, parts["store"], review=False)[0]
        return np.array([0, *model.class_values])[index], target, model

    def correct(
        self,
        path: str,
        structure: str | int | None,
        foreground: Sequence[Sequence[float]],
        background: Sequence[Sequence[float]],
        slice_index: int | None = None,
        label_path: str | None = None,
    ) -> tuple[np.ndarray, Target, dict[str, Any]]:
        """The clicked structure corrected on the clicked slice.

        Clicks are (i, j) or (i, j, k) indices of the image array as MONAI reads it (x = column, y = row; k the
        slice of a volume). The mask corrected is the structure's in the label at ``label_path`` (values of the
        model's class map), else the model's own. Returns (Z, H, W) label values holding only the structure (its
        value; the clicked slice corrected, the others as in ``label_path`` or empty), the target and a summary.
        """
        with self.lock:
            parts = self._load()
            model = parts["model"]
            value = self._class_value(model, structure)
            target = self.prepare(path, parts["preprocessing"])
            fg, bg, z = self._clicks(target, foreground, background, slice_index)
            key = target.keys[z]
            if key is None:
                raise RequestError(422, f"slice {z} of {os.path.basename(path)} is constant: nothing to segment")
            out = np.zeros(target.shape, np.int64)
            previous = None
            if label_path:
                label = self._read_label(label_path, target, model)
                out[label == value] = value
                previous = label[z] == value
            image = target.images[key]
            scale = image.shape[0] / target.shape[1]
            if previous is None:
                with torch.no_grad():
                    index, _ = parts["inferer"].slice_label(model, key, image, parts["store"])
                previous = index == model.class_values.index(value) + 1
            elif previous.shape != image.shape[:2]:
                previous = resize_label(previous.astype(np.uint8), image.shape[:2]).astype(bool)
            embedding = parts["store"].embedding(key, image)
            mask, iou = correct_mask(parts["store"].sam, embedding, previous, fg * scale, bg * scale)
        full = resize_label(mask.astype(np.uint8), target.shape[1:]).astype(bool)
        out[z] = np.where(full, value, 0)
        summary = {
            "structure": model.class_names[model.class_values.index(value)],
            "value": value,
            "slice": z,
            "iou": round(iou, 4),
            "clicks_honoured": clicks_honoured(full, fg, bg),
            "clicks": len(fg) + len(bg),
        }
        return out, target, summary

    @staticmethod
    def _class_value(model: OneShotModel, structure: str | int | None) -> int:
        if structure is None or structure == "":
            return model.class_values[0]
        for name, value in zip(model.class_names, model.class_values):
            if str(structure) in (name, str(value)):
                return value
        known = dict(zip(model.class_names, model.class_values))
        raise RequestError(422, f"unknown structure {structure!r}: the model segments {known}")

    @staticmethod
    def _clicks(
        target: Target, foreground: Sequence[Sequence[float]], background: Sequence[Sequence[float]], z: int | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Clicks as (x, y) pixels of one slice, and that slice's index."""
        axis = target.volume.axis
        ndim = 2 if axis is None else 3
        points = {"foreground": foreground or [], "background": background or []}
        if not points["foreground"] and not points["background"]:
            raise RequestError(422, "no click: give foreground and/or background points")
        slices, xy = set(), {}
        for name, pts in points.items():
            if len(pts) == 0:
                xy[name] = np.zeros((0, 2))
                continue
            try:
                arr = np.asarray(pts, float).reshape(len(pts), -1)
            except ValueError as e:
                raise RequestError(422, f"{name}: points must be lists of {ndim} numbers ({e})") from e
            if arr.shape[1] not in (2, ndim) or not np.isfinite(arr).all():
                raise RequestError(422, f"{name}: points must be lists of {ndim} numbers, got {pts}")
            if arr.shape[1] == 3:
                slices.update(int(round(v)) for v in arr[:, axis])
                arr = np.delete(arr, axis, axis=1)
            xy[name] = arr
        if z is None or int(z) < 0:
            if len(slices) > 1:
                raise RequestError(422, f"clicks on several slices {sorted(slices)}: correct one slice at a time")
            z = slices.pop() if slices else 0
        z = int(z)
        h, w = target.shape[1:]
        if not 0 <= z < target.shape[0]:
            raise RequestError(422, f"slice {z} is outside the image (0..{target.shape[0] - 1})")
        for name, arr in xy.items():
            if len(arr) and ((arr < -0.5).any() or (arr[:, 0] > w - 0.5).any() or (arr[:, 1] > h - 0.5).any()):
                raise RequestError(422, f"{name}: a point lies outside the {w} x {h} image")
        return xy["foreground"], xy["background"], z

    @staticmethod
    def _read_label(path: str, target: Target, model: OneShotModel) -> np.ndarray:
        """A label for ``target`` as (Z, H, W) values; 422 when unreadable, of another size, or with values outside
        the model's class map."""
        try:
            label = read_label_volume(path, target.volume)
        except Exception as e:  # noqa: BLE001 - any unreadable label is the client's to fix
            raise RequestError(422, f"label cannot be read: {e}") from e
        if label.shape != tuple(target.shape):
            raise RequestError(422, f"label is {label.shape} (slices, rows, columns), the image {tuple(target.shape)}")
        extra = sorted(set(np.unique(label).tolist()) - {0, *model.class_values})
        if extra:
            known = dict(zip(model.class_names, model.class_values))
            raise RequestError(422, f"label has values {extra} outside the class map {known}")
        return label
