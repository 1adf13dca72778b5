"""Adapt once, infer many: a full cohort run saves its fitted model, then configs/infer.yaml segments new images.

    python scripts/benchmark_adapted.py --dataset_dir ../shared/data/jsrt --num_images 40 --num_new 40
        [--set key=value ...] [--markdown docs/benchmarks.md]

Reference = first case by sorted image name; the full run (configs/inference.yaml) segments the next
``num_images`` cases and saves what it learned; the adapted model then segments the ``num_new`` cases after those,
which the adaptation never saw, one image at a time. Each step runs in its own process. Prints (and with
``--markdown`` writes) one table: Dice per class, mean Dice, seconds per image (the full run: everything, training
included; the adapted model: per new image, from the read image to its post-processed label, plus its one-off
loading time).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchmark import _isolated, _value, run_bundle, write_markdown  # noqa: E402


def run_adapted(model_path: str, dataset_dir: str, first_image: int, num_images: int, output_dir: str) -> dict:
    """configs/infer.yaml with the adapted model on a slice of the dataset's images (sorted by name)."""
    from monai.bundle import ConfigParser

    start = time.time()
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "infer.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "model_path": model_path,
            "dataset_dir": dataset_dir,
            "first_image": first_image,
            "num_images": num_images,
            "output_dir": output_dir,
        }
    )
    workflow = parser.get_parsed_content("workflow")
    loaded = time.time() - start
    summary = workflow.run()
    summary["load_seconds"] = round(loaded, 2)
    return summary


def table(full: dict, adapted: dict, num_images: int, num_new: int) -> str:
    classes = list(full["per_class"])
    lines = [
        "| run | images | " + " | ".join(classes) + " | mean Dice | s / image |",
        "|" + "---|" * (len(classes) + 4),
    ]
    per = " | ".join(f"{full['per_class'][c]:.1f}" for c in classes)
    lines.append(
        f"| full run (configs/inference.yaml, adapts and segments) | 1-{num_images} | {per} | "
        f"**{full['dice_mean']:.1f}** | {full['seconds_per_image']:.2f} |"
    )
    per = " | ".join(f"{adapted['per_class'][c]:.1f}" for c in classes)
    lines.append(
        f"| adapted model (configs/infer.yaml, model.pt) | {num_images + 1}-{num_images + num_new} (new) | "
        f"{per} | **{adapted['dice_mean']:.1f}** | {adapted['seconds_per_image']:.2f} "
        f"(+ {adapted['load_seconds']:.1f} s loading, once) |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--num_images", type=int, default=40, help="images the full run adapts on and segments")
    p.add_argument("--num_new", type=int, default=40, help="new images the adapted model segments")
    p.add_argument("--set", nargs="*", default=[], help="config overrides for the full run, key=value (JSON values)")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    out = args.output_dir or tempfile.mkdtemp(prefix="bench_adapted_")
    model = os.path.join(out, "full", "model.pt")
    full = _isolated(
        run_bundle,
        args.dataset_dir,
        args.num_images,
        {"progress": False, **overrides, "adapted_model": model},
        os.path.join(out, "full"),
    )
    adapted = _isolated(
        run_adapted, model, args.dataset_dir, args.num_images + 1, args.num_new, os.path.join(out, "adapted")
    )
    text = table(full, adapted, args.num_images, args.num_new)
    print(text, flush=True)
    if args.markdown:
        command = "python scripts/benchmark_adapted.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        dataset = os.path.basename(os.path.normpath(args.dataset_dir))
        note = (
            "\n\n(reference = first case; 2-core CPU; the adapted model's time is per new image, from the read image "
            "to its post-processed label; the full run's covers everything, training included)"
        )
        write_markdown(args.markdown, f"{dataset}, adapt once, infer many", command, text + note)
    return {"full": full, "adapted": adapted}


if __name__ == "__main__":
    main()
