"""Benchmark the bundle against classical single-atlas label propagation (elastix, ANTs SyN) on the same images.

    python scripts/benchmark.py --dataset_dir ../shared/data/{jsrt,hc18,ph2} --num_images 40
        [--methods bundle elastix ants] [--strategies warp match persam registration]
        [--set key=value ...] [--variant name:key=value,...] [--markdown docs/benchmarks.md]

Reference = first labelled case by sorted image name; the next ``num_images`` cases are the test set. Prints one
table (method, Dice per class, mean Dice, mean IoU, seconds per image, peak memory) and, with ``--markdown``,
writes it into that file under a heading for the dataset, with the command that produced it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import shlex
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.dataset import load_datalist  # noqa: E402
from bundle.io import read_image, read_label, to_class_index  # noqa: E402
from bundle.metrics import class_scores, summarize  # noqa: E402
from bundle.reference import check_reference  # noqa: E402
from bundle.transforms import normalize_intensity  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_bundle(dataset_dir: str, num_images: int, overrides: dict, output_dir: str) -> dict:
    """The bundle's own pipeline, configured as ``configs/inference.yaml`` plus ``overrides``."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update({"bundle_root": ROOT, "dataset_dir": dataset_dir, "num_images": num_images, "output_dir": output_dir})
    parser.update({"adapted_model": os.path.join(output_dir, "model.pt"), **overrides})
    set_determinism(seed=parser.get_parsed_content("seed"))
    summary = parser.get_parsed_content("workflow").run()
    return summary


def _default(key: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    return parser[key]


def _propagate(name: str, fixed: np.ndarray, moving: np.ndarray, label: np.ndarray) -> np.ndarray:
    if name == "elastix":
        import itk

        f, m = itk.image_from_array(fixed.astype(np.float32)), itk.image_from_array(moving.astype(np.float32))
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("affine"))
        bspline = params.GetDefaultParameterMap("bspline")
        params.AddParameterMap(bspline)
        result, transform = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
        transform.SetParameter("FinalBSplineInterpolationOrder", "0")
        for i in range(transform.GetNumberOfParameterMaps()):
            transform.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
        warped = itk.transformix_filter(itk.image_from_array(label.astype(np.float32)), transform)
        return np.rint(itk.array_from_image(warped)).astype(np.int64)
    if name == "ants":
        import ants

        f, m = ants.from_numpy(fixed.astype(np.float32)), ants.from_numpy(moving.astype(np.float32))
        reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN")
        lab = ants.from_numpy(label.astype(np.float32))
        warped = ants.apply_transforms(
            fixed=f, moving=lab, transformlist=reg["fwdtransforms"], interpolator="genericLabel"
        )
        return np.rint(warped.numpy()).astype(np.int64)
    raise ValueError(f"unknown method {name}")


def run_classical(name: str, dataset_dir: str, num_images: int) -> dict:
    """Single-atlas label propagation: register the reference to each target, warp its label (nearest)."""
    reference, targets, names = load_datalist(dataset_dir, num_images)
    (ref,), class_values = check_reference(reference, sorted(names) or None)
    moving, ref_label = normalize_intensity(ref.image), ref.label  # class indices 1..C
    _warm_up(name)
    start, rows = time.time(), []
    for case in tqdm(targets, desc=name, leave=False):
        fixed = normalize_intensity(read_image(case.image_path)[0])
        if fixed.shape != moving.shape:  # classical tools here work on a common grid
            import cv2

            mov = cv2.resize(moving, fixed.shape[::-1], interpolation=cv2.INTER_LINEAR)
            lab = cv2.resize(ref_label.astype(np.uint8), fixed.shape[::-1], interpolation=cv2.INTER_NEAREST)
        else:
            mov, lab = moving, ref_label
        pred = _propagate(name, fixed, mov, lab)
        if case.label_path:
            truth = to_class_index(read_label(case.label_path), class_values)
            rows.append(class_scores(pred, truth, len(class_values)))
    seconds = time.time() - start
    summary = summarize(rows, [names.get(v, f"class_{v}") for v in class_values])
    summary.update(seconds_per_image=round(seconds / max(len(targets), 1), 3), num_images=len(targets))
    return summary


def _warm_up(name: str) -> None:
    """Load the peer's libraries before the clock starts (ITK loads its modules lazily on first use)."""
    if name == "elastix":
        import itk

        itk.ParameterObject.New()
    elif name == "ants":
        import ants  # noqa: F401


def _isolated(fn, *args) -> dict:
    """Run one method in a fresh process so that its time and peak memory are its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, *args).result()


def _measured(fn, *args) -> dict:
    summary = fn(*args)
    summary["peak_memory_mb"] = round(_peak_mb(), 1)
    return summary


def table(results: dict[str, dict]) -> str:
    classes = list(next(iter(results.values()))["per_class"])
    head = "| method | " + " | ".join(classes) + " | mean Dice | mean IoU | s / image | peak MB |"
    lines = [head, "|" + "---|" * (len(classes) + 5)]
    for method, s in results.items():
        per = " | ".join(f"{s['per_class'].get(c, float('nan')):.1f}" for c in classes)
        peak = s.get("peak_memory_mb")
        lines.append(
            f"| {method} | {per} | **{s['dice_mean']:.1f}** | {s['iou_mean']:.1f} | {s['seconds_per_image']:.2f} | "
            + (f"{peak:.0f} |" if peak else "- |")
        )
    return "\n".join(lines)


def write_markdown(path: str, dataset: str, command: str, text: str) -> None:
    start, end = f"<!-- {dataset}:start -->", f"<!-- {dataset}:end -->"
    block = f"{start}\n### {dataset}\n\n```\n{command}\n```\n\n{text}\n{end}"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", nargs="+", required=True, help="one or more dataset folders")
    p.add_argument("--num_images", type=int, default=40)
    p.add_argument("--methods", nargs="*", default=["bundle", "elastix", "ants"], choices=["bundle", "elastix", "ants"])
    p.add_argument(
        "--strategies",
        nargs="*",
        default=[],
        choices=sorted(_default("sources")),
        help="extra bundle rows, one per strategy",
    )
    p.add_argument("--set", nargs="*", default=[], help="config overrides for the bundle, key=value (JSON values)")
    p.add_argument("--variant", action="append", default=[], help="extra bundle rows: name:key=value,key=value")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--title", default=None, help="heading of the table in the markdown file (default: dataset name)")
    args = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    out_root = args.output_dir or tempfile.mkdtemp(prefix="bench_")
    variants = [(f"{s}", {"strategy": s}) for s in args.strategies]
    for variant in args.variant:  # parse every variant before any work, so a typo costs nothing
        name, sep, spec = variant.partition(":")
        pairs = [kv.split("=", 1) for kv in spec.split(",") if kv]
        if not sep or not name or any(len(kv) != 2 for kv in pairs):
            p.error(f"--variant {variant!r}: expected name:key=value[,key=value] (no ':' in the name)")
        variants.append((name, {k: _value(v) for k, v in pairs}))
    command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    everything = {}
    for dataset_dir in args.dataset_dir:
        dataset = os.path.basename(os.path.normpath(dataset_dir))
        out = os.path.join(out_root, dataset)
        results = run_dataset(dataset_dir, args.num_images, args.methods, overrides, variants, out)
        if args.markdown:
            title = args.title or dataset
            if args.title and len(args.dataset_dir) > 1:
                title = f"{args.title} ({dataset})"
            note = f"\n\n({args.num_images} test images; 2-core CPU)"
            write_markdown(args.markdown, title, command, table(results) + note)
        everything[dataset] = results
    return everything


def run_dataset(dataset_dir: str, num_images: int, methods, overrides: dict, variants, out_root: str) -> dict:
    """Every requested method and bundle variant on one dataset; prints the table after each row."""
    default_strategy = overrides.get("strategy", _default("strategy"))
    results: dict[str, dict] = {}
    for method in methods:
        if method == "bundle":
            results[f"bundle, {default_strategy} (default config)"] = _isolated(
                run_bundle, dataset_dir, num_images, {"progress": False, **overrides}, os.path.join(out_root, "bundle")
            )
        else:
            results[method] = _isolated(run_classical, method, dataset_dir, num_images)
        print(table(results), flush=True)
    for name, extra in variants:
        results[f"bundle, {name}"] = _isolated(
            run_bundle,
            dataset_dir,
            num_images,
            {"progress": False, **overrides, **extra},
            os.path.join(out_root, "".join(ch if ch.isalnum() else "_" for ch in name)),
        )
        print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
