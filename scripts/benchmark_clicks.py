"""Click correction benchmark: simulated annotator clicks on an adapted model's masks, Dice after each click.

    python scripts/benchmark_clicks.py --model eval/model.pt --dataset_dir ../shared/data/jsrt --first 4 --num 16

Per image and class, the model's mask is corrected ``--clicks`` times; each click goes to the pixel deepest inside the
larger error region (missed -> foreground click, leaked -> background click), and each correction is given the
previous result, as an annotator's client sends it. ``--keep_edit`` compares values of ``correct_mask``'s setting
(-1: SAM's masks only, 2: the least edit only). Prints mean Dice per class after 0..clicks clicks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.clicks import correct_mask  # noqa: E402
from bundle.dataset import load_datalist  # noqa: E402
from bundle.io import Case, read_label  # noqa: E402
from bundle.model import OneShotModel  # noqa: E402


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 200.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _click(mask: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(foreground, background) clicks, (P, 2) as (x, y): one, in the larger error region; None without error."""
    missed, leaked = truth & ~mask, mask & ~truth
    error = missed if missed.sum() >= leaked.sum() else leaked
    if not error.any():
        return None
    y, x = np.unravel_index(ndimage.distance_transform_edt(error).argmax(), error.shape)
    point, none = np.array([[x, y]], np.float32), np.zeros((0, 2), np.float32)
    return (point, none) if error is missed else (none, point)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--first", type=int, default=1, help="first image (sorted by name) to correct")
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--keep_edit", type=float, nargs="+", default=[0.9])
    args = parser.parse_args()
    from monai.bundle import ConfigParser

    torch.set_num_threads(min(os.cpu_count() or 1, 16))
    config = ConfigParser()
    config.read_config(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "infer.yaml")
    )
    config.update({"model_path": os.path.abspath(args.model), "store#max_in_memory": 4})
    store, prepare, inferer = (config.get_parsed_content(k) for k in ("store", "preprocessing", "inferer"))
    model = OneShotModel.load(args.model, store)
    reference, targets, _ = load_datalist(args.dataset_dir)
    cases = sorted([reference, *targets], key=lambda c: os.path.basename(c.image_path))[
        args.first : args.first + args.num
    ]
    sums = {k: np.zeros((model.num_classes, args.clicks + 1)) for k in args.keep_edit}
    for n, case in enumerate(cases, 1):
        truth = read_label(case.label_path)
        target = prepare(Case(case.id, case.image_path))
        key = target.keys[0]
        image = target.images[key]
        label, _ = inferer.slice_label(model, key, image, store)
        embedding = store.embedding(key, image)
        for c, value in enumerate(model.class_values):
            true = truth == value
            for keep in args.keep_edit:
                mask = label == c + 1
                sums[keep][c, 0] += _dice(mask, true)
                for k in range(1, args.clicks + 1):
                    click = _click(mask, true)
                    if click is not None:
                        mask, _ = correct_mask(store.sam, embedding, mask, *click, keep_edit=keep)
                    sums[keep][c, k] += _dice(mask, true)
        print(f"{n}/{len(cases)} {case.id}", flush=True)
    table = {
        str(keep): {name: np.round(s[c] / len(cases), 1).tolist() for c, name in enumerate(model.class_names)}
        for keep, s in sums.items()
    }
    print(json.dumps({"images": len(cases), "clicks": args.clicks, "mean_dice_after_k_clicks": table}, indent=1))


if __name__ == "__main__":
    main()
