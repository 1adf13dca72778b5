"""Runs: the cohort run (fit the sources on the reference and the cohort, then apply the fitted model to every
target) and the adapted run (apply a saved model to new images). Both read and prepare targets through the
``dataset``, segment and write through the ``evaluator`` and summarise the same way."""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from typing import Any

import ignite.distributed as idist
import torch

from bundle.dataset import CohortDataset, ImageDataset, Target
from bundle.distributed import is_main
from bundle.engine import WarpTrainer
from bundle.evaluator import OneShotEvaluator, output_paths
from bundle.job import fingerprint
from bundle.metrics import summarize
from bundle.model import OneShotModel, load_model_file
from bundle.reference import check_reference, reference_names
from bundle.report import write_json, write_report
from bundle.sources import Cohort, Source
from bundle.sources.base import SliceItems
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import shrink

__all__ = ["OneShotSegmentation", "AdaptedSegmentation"]

logger = logging.getLogger(__name__)


class _Run:
    """Reading targets, applying a model and the summary, shared by both runs."""

    dataset: CohortDataset | ImageDataset
    evaluator: OneShotEvaluator
    output_dir: str
    fail_on_errors: bool

    def _read(self, done: bool = False) -> tuple[list[Target], list[dict[str, str]]]:
        targets, errors = [], []
        for i in range(len(self.dataset)):
            target = self.dataset[i]
            if target.error:
                logger.warning("skipping %s: %s", target.case.image_path, target.error)
                errors.append({"id": target.case.id, "image": target.case.image_path, "error": target.error})
                continue
            target.done = done and all(os.path.exists(p) for p in output_paths(self.output_dir, target))
            targets.append(target)
        if not targets:
            raise RuntimeError(f"no readable target image ({len(errors)} failed)")
        return targets, errors

    def _apply(
        self,
        model: OneShotModel,
        store: EmbeddingStore,
        targets: list[Target],
        errors: list[dict],
        start: float,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        applying = time.time()
        self.evaluator.evaluate(model, store, targets, errors)
        store.clock.add("prompting_and_sam_decoding_s", applying)  # the fitted model applied, outputs written
        if not is_main():
            return {}  # rank 0 writes the tables, the summary and the report
        state = self.evaluator.state
        total = time.time() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        if torch.cuda.is_available():
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
        rows = getattr(state, "rows", [])
        summary = {
            **summarize(rows, model.class_names),
            "num_images": len(targets),
            "num_scored": len(rows),
            "num_failed": len(self.evaluator.errors),
            "output_dir": os.path.abspath(self.output_dir),
            "seconds_total": round(total, 2),
            "seconds_per_image": round(total / max(len(targets), 1), 3),
            "peak_memory_mb": round(peak, 1),
            # each stage's own seconds; other_s: reading, preparing and whatever no stage timed
            "seconds_by_stage": {**store.clock.seconds, "other_s": round(total - sum(store.clock.seconds.values()), 2)},
            "peak_memory_mb_by_stage": dict(store.clock.peak_mb),
            "not_found": getattr(state, "not_found", []),
            "review": getattr(state, "review_summary", {}),
            "strategy_decisions": model.decisions(),
            **extra,
        }
        write_json(os.path.join(self.output_dir, "summary.json"), summary)
        write_report(self.output_dir, summary, getattr(state, "qc_rows", []))
        _print(summary)
        failed = self.evaluator.errors
        if failed and self.fail_on_errors:
            total = len(errors) + len(targets)
            raise SystemExit(f"{len(failed)} of {total} targets failed: see {self.output_dir}/errors.csv")
        return summary


class OneShotSegmentation(_Run):
    """Segments every target of a dataset from its one labelled reference and writes the results.

    Args:
        dataset: the cohort (``CohortDataset``, its transform the ``PrepareTarget`` input pipeline).
        source: the prompt source to fit (e.g. ``FusedSource``).
        store: the run's embedding store (SAM backend, matching features).
        evaluator: applies the fitted model to every target and writes the outputs.
        output_dir: where predictions, tables, summary, overlays and checkpoints go.
        reference_slice: the slice of a labelled reference volume to use (default: per class, its largest).
        resume: reuse the checkpoints and finished predictions of an earlier run of the same job in ``output_dir``.
        trainer: the warping trainer whose round checkpoints make a killed run resumable (None: none).
        adapted_model: where to save the fitted model for ``configs/infer.yaml`` (None: not saved).
        overwrite_model: allow replacing an adapted model outside ``output_dir`` that another job wrote.
        job: the parsed config (``bundle.job.parsed_config``): with the inputs, what identifies this job.
        fail_on_errors: exit with status 1 (after writing everything) when any target failed.
        progress: progress bars.
    """

    def __init__(
        self,
        dataset: CohortDataset,
        source: Source,
        store: EmbeddingStore,
        evaluator: OneShotEvaluator,
        output_dir: str,
        reference_slice: int | None = None,
        resume: bool = True,
        trainer: WarpTrainer | None = None,
        adapted_model: str | None = None,
        overwrite_model: bool = False,
        job: dict[str, Any] | None = None,
        fail_on_errors: bool = True,
        progress: bool = False,
    ):
        self.dataset, self.source, self.store, self.evaluator = dataset, source, store, evaluator
        self.output_dir, self.reference_slice, self.resume, self.trainer = output_dir, reference_slice, resume, trainer
        self.adapted_model, self.overwrite_model, self.job = adapted_model, overwrite_model, job
        self.fail_on_errors, self.progress = fail_on_errors, progress

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.dataset.prepare.clear()  # prepared slices kept on disk for the run (preprocessing#slice_dir)

    def _run(self) -> dict[str, Any]:
        start = time.time()
        os.makedirs(self.output_dir, exist_ok=True)
        with idist.one_rank_first():  # the demo data is written once
            reference, names = self.dataset.load()
        names = {**reference_names(reference), **names}
        prepare = self.dataset.prepare
        slices, class_values = check_reference(
            reference, sorted(names) or None, prepare.slice_axis, self.reference_slice, prepare.window
        )
        class_names = [names.get(v, f"class_{v}") for v in class_values]
        logger.info(
            "reference %s (label %s); results go to %s", reference.image_path, reference.label_path, self.output_dir
        )
        job = fingerprint(self.job, reference, self.dataset.data)
        self._check_model_path(job)
        targets, errors = self._read(done=self._prepare_resume(job))
        if any(t.done for t in targets):
            logger.info("resuming: %d of %d targets already finished", sum(t.done for t in targets), len(targets))
        references = [
            (
                Reference(
                    shrink(s.image, prepare.max_size),
                    shrink(s.label, prepare.max_size, nearest=True),
                    len(s.classes),
                    "" if len(slices) == 1 else f"_slice{s.slice_index}",
                ),
                s.classes,
            )
            for s in slices
        ]
        items = SliceItems([(k, t.images) for t in targets for k in t.keys if k is not None])
        cohort = Cohort(items, self.store, self.progress)
        preparation = {
            "window": prepare.window and list(prepare.window),
            "max_size": prepare.max_size,
            "precision": getattr(self.store.sam, "precision", None),  # SAM's arithmetic: masks differ a little by it
        }
        model = OneShotModel.fit(self.source, references, cohort, class_values, class_names, preparation)
        if self.adapted_model and is_main():
            model.save(self.adapted_model, job=job)
            logger.info("adapted model saved to %s (configs/infer.yaml --model_path)", self.adapted_model)
        reference_files = {"image": reference.image_path, "label": reference.label_path}
        extra = {"reference": reference_files, "source": self.source.kind}
        return self._apply(model, self.store, targets, errors, start, extra)

    def _check_model_path(self, job: str) -> None:
        """Refuse, before any work, to replace an adapted model outside ``output_dir`` that another job wrote."""
        path = self.adapted_model
        if not path or not os.path.isfile(path) or self.overwrite_model:
            return
        if os.path.abspath(path).startswith(os.path.abspath(self.output_dir) + os.sep):
            return  # part of this output directory, which follows its own job
        try:
            same = load_model_file(path).get("job") == job
        except ValueError:
            same = False
        if not same:
            raise FileExistsError(
                f"{path} holds an adapted model of another job; set overwrite_model true to replace it, or choose "
                "another adapted_model path"
            )

    def _prepare_resume(self, job: str) -> bool:
        """True when ``output_dir`` holds an unfinished or finished run of this very job; else start afresh there."""
        path = os.path.join(self.output_dir, "run_state.json")
        same = False
        if self.resume and os.path.exists(path):
            with open(path) as f:
                same = json.load(f).get("fingerprint") == job
        idist.barrier()  # every process has read the state before rank 0 replaces it
        if not same and is_main():
            if os.path.exists(path):
                logger.info("%s holds a different job (settings or inputs changed): starting afresh", self.output_dir)
            if self.trainer is not None:
                self.trainer.clear_checkpoints()
            write_json(path, {"fingerprint": job})
        if is_main():
            self.store.bind(job)
        idist.barrier()
        if self.trainer is not None:
            self.trainer.resumable = same
        return same


class AdaptedSegmentation(_Run):
    """Segments new images with a saved model (``configs/infer.yaml``): no reference files, no retraining.

    Args:
        dataset: the images (``ImageDataset``).
        model_path: the file a cohort run saved.
        store: embedding store with the SAM backend (and matching features) the cohort run used.
        evaluator: applies the model and writes the outputs.
        output_dir: where ``predictions/``, tables and ``summary.json`` go.
        device: where the fitted networks run.
        fail_on_errors: exit with status 1 (after writing everything) when any image failed.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        model_path: str,
        store: EmbeddingStore,
        evaluator: OneShotEvaluator,
        output_dir: str,
        device: str | torch.device = "cpu",
        fail_on_errors: bool = False,
    ):
        self.dataset, self.model_path, self.store, self.evaluator = dataset, model_path, store, evaluator
        self.output_dir, self.device, self.fail_on_errors = output_dir, device, fail_on_errors

    def run(self) -> dict[str, Any]:
        start = time.time()
        os.makedirs(self.output_dir, exist_ok=True)
        model = OneShotModel.load(self.model_path, self.store, self.device)
        self.dataset.load()
        targets, errors = self._read()
        return self._apply(model, self.store, targets, errors, start, {"model": os.path.abspath(self.model_path)})


def _print(summary: dict[str, Any]) -> None:
    lines = [f"one-shot segmentation of {summary['num_images']} images ({summary['num_failed']} failed)"]
    for name, dice in summary["per_class"].items():
        lines.append(f"  {name:<20s} Dice {dice:6.2f}  IoU {summary['per_class_iou'][name]:6.2f}")
    if summary["num_scored"]:
        lines.append(f"  {'mean':<20s} Dice {summary['dice_mean']:6.2f}  IoU {summary['iou_mean']:6.2f}")
    lines.append(
        f"  {summary['seconds_total']:.1f} s in all, {summary['seconds_per_image']:.2f} s per image, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB"
    )
    review = summary.get("review") or {}
    if "num_to_review" in review:
        lines.append(f"  {review['num_to_review']} images to review (least confident first in qc.csv and overlays/)")
    lines.append(f"  results in {summary['output_dir']} (report.html)")
    print("\n".join(lines), flush=True)
