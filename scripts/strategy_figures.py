"""One picture per dataset: the reference, then one target as each strategy prompts and segments it.

    python scripts/strategy_figures.py --dataset_dir ../shared/data/hc18 --num_images 12 \\
        --output docs/figures/strategies_hc18.png

Each strategy runs with the default config on the reference + ``num_images`` targets (the cohort it adapts to)
and shares the SAM image embeddings. Panels: reference with its label; then, for the chosen target, the prompts
(yellow boxes, green + positive and red x negative points), the result (filled) and the ground truth (white).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.dataset import load_datalist  # noqa: E402
from bundle.io import read_image, read_label, to_class_index  # noqa: E402
from bundle.metrics import class_scores  # noqa: E402
from bundle.reference import check_reference  # noqa: E402
from bundle.sources import Cohort  # noqa: E402
from bundle.store import EmbeddingStore, Reference  # noqa: E402
from bundle.visualize import draw_prompts, montage, overlay, save_overlay  # noqa: E402


def _parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update({"bundle_root": ROOT, "progress": False, **overrides})
    return parser


def _source(strategy: str, store: EmbeddingStore):
    """The config's source for ``strategy``, decoding with the store's SAM backend."""
    from monai.utils import set_determinism

    parser = _parser({"strategy": strategy, "trainer#checkpoint_dir": None})
    parser["sam"] = store.sam
    set_determinism(seed=parser.get_parsed_content("seed"))
    return parser.get_parsed_content("source")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--num_images", type=int, default=12)
    p.add_argument("--target", type=int, default=0, help="which target (index after the reference) to show")
    strategies = list(_parser({})["sources"])
    p.add_argument("--strategies", nargs="*", default=strategies, choices=strategies)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    reference, cases, names = load_datalist(args.dataset_dir, args.num_images)
    (ref,), class_values = check_reference(reference, sorted(names) or None)
    targets = [(c.id, read_image(c.image_path)[0]) for c in cases]
    shown = cases[args.target]
    image = targets[args.target][1]
    truth = to_class_index(read_label(shown.label_path), class_values) if shown.label_path else None
    panels = [overlay(ref.image, ref.label, None, title=f"reference {reference.id}")]
    store = EmbeddingStore(_parser({}).get_parsed_content("sam"))  # every strategy reuses the same SAM encodings
    cohort = Cohort(targets, store)
    for strategy in args.strategies:
        source = _source(strategy, store)
        state = source.fit(Reference(ref.image, ref.label, len(class_values)), cohort)
        pred = source.predict(state, targets[args.target][0], image, store)
        label = pred.label()
        title = strategy
        if truth is not None:
            title += f"  Dice {100 * np.nanmean(class_scores(label, truth, len(class_values))['dice']):.1f}"
        pic = overlay(image, label, truth, title=title)
        if pred.prompts is not None:
            pr = pred.prompts
            keep = pr.valid.numpy()
            pic = draw_prompts(
                pic,
                None if pr.boxes is None else pr.boxes.numpy()[keep],
                None if pr.points is None else pr.points.numpy()[keep],
                None if pr.point_labels is None else pr.point_labels.numpy()[keep],
            )
        panels.append(pic)
        print(title, flush=True)
    return save_overlay(args.output, montage(panels, height=320, columns=3))


if __name__ == "__main__":
    main()
