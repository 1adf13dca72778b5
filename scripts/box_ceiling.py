"""What box prompting can reach on a dataset: SAM's Dice per class given each structure's TRUE box.

    python scripts/box_ceiling.py --dataset_dir ../shared/data/camus [--split confirmation] [--num_images 40]

Per target of the split and per class present, SAM decodes the class's bounding box (single mask) on the image's
embedding; each class is scored on its own mask (no rule between overlapping classes), and the summary gives the mean
Dice per class and overall. No box the bundle derives from a reference is better placed than the true box, so this
bounds box prompting (not the bundle: it also prompts with the warped mask, and its registered label needs no SAM).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

from benchmark import CONFIRMATION, split_dir  # noqa: E402

from bundle.dataset import load_datalist  # noqa: E402
from bundle.io import read_image, read_label, to_class_index  # noqa: E402
from bundle.metrics import class_scores, summarize  # noqa: E402
from bundle.reference import check_reference  # noqa: E402
from bundle.sam import LiteMedSAM  # noqa: E402


def true_boxes(truth: np.ndarray, num_classes: int) -> tuple[list[int], torch.Tensor]:
    """The classes present in a (H, W) label map and their boxes (n, 4) as (x0, y0, x1, y1)."""
    present, boxes = [], []
    for c in range(1, num_classes + 1):
        ys, xs = np.nonzero(truth == c)
        if len(ys):
            present.append(c)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return present, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def ceiling(dataset_dir: str, num_images: int = 40, split: str = "tuning") -> dict:
    """Mean Dice per class of SAM's masks from the true boxes over the split's targets (``summarize``'s dict)."""
    start, count = (0, num_images) if split == "tuning" else (num_images, CONFIRMATION)
    with tempfile.TemporaryDirectory() as tmp:
        reference, targets, names = load_datalist(split_dir(dataset_dir, 0, start, count, tmp))
        _, class_values = check_reference(reference, sorted(names) or None)
        sam, rows = LiteMedSAM(), []
        for case in tqdm(targets, desc="true boxes", leave=False):
            image = read_image(case.image_path)[0]
            truth = to_class_index(read_label(case.label_path), class_values)
            present, boxes = true_boxes(truth, len(class_values))
            masks = {}
            if present:
                logits = sam.predict(sam.encode(image), boxes=boxes)[0][:, 0]
                masks = dict(zip(present, (logits > 0).cpu().numpy()))
            scores = {"dice": [], "iou": []}
            for c in range(1, len(class_values) + 1):  # each class on its own mask: no overlap rule between classes
                one = class_scores(
                    masks.get(c, np.zeros_like(truth)).astype(np.uint8), (truth == c).astype(np.uint8), 1
                )
                scores["dice"] += one["dice"]
                scores["iou"] += one["iou"]
            rows.append(scores)
    return summarize(rows, [names.get(v, f"class_{v}") for v in class_values])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--num_images", type=int, default=40)
    parser.add_argument("--split", choices=("tuning", "confirmation"), default="tuning")
    args = parser.parse_args(argv)
    summary = ceiling(args.dataset_dir, args.num_images, args.split)
    classes = ", ".join(f"{n} {d}" for n, d in summary["per_class"].items())
    print(
        f"{os.path.basename(os.path.normpath(args.dataset_dir))}, {args.split}: true-box Dice {summary['dice_mean']}"
        f" ({classes}), missed {summary['missed_share']} %"
    )
    return summary


if __name__ == "__main__":
    main()
