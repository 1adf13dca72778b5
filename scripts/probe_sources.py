"""Per image and class, every source of a fitted fused model side by side with the signals a per-image choice can use.

    python scripts/probe_sources.py --run_dir /tmp/bench/jsrt/bundle --dataset_dir /tmp/bench/jsrt/datalist \
        --output probe_jsrt.csv

``run_dir`` holds a cohort run of the default config (its ``model.pt``); ``dataset_dir`` the datalist it ran on.
Writes one row per (image, class, source): Dice against the truth and the signals (SAM's predicted IoU, support =
classifier probability inside the mask minus around it, solidity, area relative to the reference's, warp
similarity). For choosing fusion rules on a tuning split; never on the images reported.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.alignment import solidity  # noqa: E402
from bundle.candidates import regions, support  # noqa: E402
from bundle.classifier import PatchClassifier  # noqa: E402
from bundle.dataset import CohortDataset  # noqa: E402
from bundle.io import read_label, to_class_index  # noqa: E402
from bundle.model import OneShotModel  # noqa: E402
from bundle.prediction import dice  # noqa: E402
from bundle.prompts import masks_to_boxes  # noqa: E402
from bundle.sam import LiteMedSAM  # noqa: E402
from bundle.sources.classifier import ClassifierSource  # noqa: E402
from bundle.sources.warp import WarpSource  # noqa: E402
from bundle.store import EmbeddingStore  # noqa: E402
from bundle.transforms import resize_label  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    store = EmbeddingStore(LiteMedSAM())
    model = OneShotModel.load(os.path.join(args.run_dir, "model.pt"), store)
    group = model.groups[0]
    source, state = group.source, group.state
    registration = WarpSource(None, None, source.primary.working_size)
    dataset = CohortDataset(args.dataset_dir)
    dataset.load()
    ref_area = np.array([(group.reference.label == c + 1).sum() for c in range(model.num_classes)], float)
    rows = []
    for i in tqdm(range(len(dataset))):
        target = dataset[i]
        key = target.keys[0]
        image = target.images[key]
        truth = to_class_index(read_label(target.case.label_path), model.class_values)
        truth = resize_label(truth, image.shape[:2]) if truth.shape != image.shape[:2] else truth
        probs = PatchClassifier.upsample(ClassifierSource.grid(state.locator, key, image, store), image.shape[:2])
        similarity = source.primary.similarity(state.primary, image)
        preds = {
            "warp": source.primary.predict(state.primary, key, image, store),
            "registration": registration.predict(state.primary, key, image, store),
            "classifier": source.locator.predict(state.locator, key, image, store),
        }
        if state.fallback is not None:
            preds["aligned"] = source.fallback.predict(state.fallback, key, image, store)
        candidates = []
        embedding = store.embedding(key, image)
        for c in range(model.num_classes):
            found = regions(probs[c + 1].numpy())
            if found:
                boxes, _ = masks_to_boxes(np.stack(found))
                out, score = store.sam.predict(embedding, boxes=boxes, multimask=True)
                for r in range(len(found)):
                    for k in range(out.shape[1]):
                        candidates.append((f"candidate{r}_{k}", c, (out[r, k] > 0).cpu().numpy(), float(score[r, k])))
        for name, c, m, iou in candidates:
            rows.append(
                {
                    "id": target.case.id,
                    "class": model.class_names[c],
                    "source": name,
                    "dice": round(dice(m, truth == c + 1), 4),
                    "iou": round(iou, 4),
                    "support": round(support(probs[c + 1].numpy(), m), 4),
                    "solidity": round(solidity(m), 4),
                    "area": round(float(m.sum() / max(ref_area[c], 1)), 4),
                    "similarity": round(float(similarity[c]), 4),
                }
            )
        for name, pred in preds.items():
            masks = pred.masks()
            for c in range(model.num_classes):
                m = masks[c]
                rows.append(
                    {
                        "id": target.case.id,
                        "class": model.class_names[c],
                        "source": name,
                        "dice": round(dice(m, truth == c + 1), 4),
                        "iou": round(float(pred.iou[c]), 4),
                        "support": round(support(probs[c + 1].numpy(), m), 4),
                        "solidity": round(solidity(m), 4),
                        "area": round(float(m.sum() / max(ref_area[c], 1)), 4),
                        "similarity": round(float(similarity[c]), 4),
                    }
                )
    with open(args.output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    with torch.no_grad():
        main()
