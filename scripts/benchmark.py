"""Benchmark the bundle against classical single-atlas label propagation (elastix, ANTs SyN) on the same images.

    python scripts/benchmark.py --dataset_dir ../shared/data/{jsrt,hc18,ph2} --num_images 40
        [--split tuning|confirmation] [--methods bundle elastix ants] [--strategies warp match persam registration]
        [--set key=value ...] [--variant name:key=value,...] [--markdown docs/benchmarks.md]
    python scripts/benchmark.py --dataset_dir ... --references 0 10 20 30 40   # spread over five references
    python scripts/benchmark.py --dataset_dir ... --references 0 10 20 30 40 --within_tuning   # ... to tune on
    python scripts/benchmark.py --dataset_dir ... --methods bundle --processes 1 2   # 1 and 2 processes (torchrun)

Reference = first case by sorted image name; the tuning split is the next ``num_images`` cases, the confirmation
split the 80 cases after those (cases 41-120 after the reference). Prints one table (method, Dice per class, mean
Dice, share of images missed (mean Dice below 0.1), seconds per image, peak memory) and, with ``--markdown``, writes
it into that file under a heading for the dataset, with the command that produced it. With ``--references``, the
default config runs once per reference (the case at each index, with the ``num_images`` cases after it) and the
table gives each mean Dice and their standard deviation. With ``--within_tuning`` as well, every reference is a case
of the tuning split (reference = first case and the ``num_images`` after it) and its targets are the split's other
cases: a spread to choose settings on that never looks at the confirmation split.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
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

CONFIRMATION = 80  # cases in the confirmation split, after the tuning split's


def split_dir(dataset_dir: str, reference: int, start: int, count: int, out_dir: str) -> str:
    """A datalist folder with the case at sorted index ``reference`` as the reference and the ``count`` cases from
    ``start`` after it as targets (absolute paths into ``dataset_dir``); the reference sorts first."""
    with open(os.path.join(dataset_dir, "dataset.json")) as f:
        spec = json.load(f)
    items = [i for i in spec.get("training", []) if isinstance(i, dict) and i.get("label")]
    items.sort(key=lambda i: os.path.basename(i["image"]))
    absolute = [{k: os.path.abspath(os.path.join(dataset_dir, v)) for k, v in i.items()} for i in items]
    chosen = absolute[reference + 1 + start : reference + 1 + start + count]
    if not chosen:
        raise ValueError(f"{dataset_dir}: no cases {start}-{start + count} after case {reference}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump({"labels": spec.get("labels", {}), "training": [absolute[reference], *chosen]}, f, indent=1)
    return out_dir


def tuning_dir(dataset_dir: str, reference: int, count: int, out_dir: str) -> tuple[str, str]:
    """A datalist folder of the tuning split (the first ``count`` + 1 cases by sorted name) and the image path of its
    case at index ``reference``, which the run takes as its reference; the other ``count`` cases are its targets."""
    split_dir(dataset_dir, 0, 0, count, out_dir)
    with open(os.path.join(out_dir, "dataset.json")) as f:
        listed = json.load(f)["training"]
    if not 0 <= reference < len(listed):
        raise ValueError(f"{dataset_dir}: reference {reference} is not among the tuning split's {len(listed)} cases")
    return out_dir, listed[reference]["image"]


def _peak_mb() -> float:
    """Peak resident memory of this process or of its largest child (a torchrun process)."""
    rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return rss / 1024.0


def _machine() -> str:
    """The hardware the bundle ran on, for the table's note."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()}-core CPU"


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


def run_torchrun(processes: int, dataset_dir: str, num_images: int, overrides: dict, output_dir: str) -> dict:
    """The same pipeline in ``processes`` processes: ``torchrun`` with ``configs/multi_gpu_inference.yaml`` merged."""
    import subprocess

    configs = [os.path.join(ROOT, "configs", name) for name in ("inference.yaml", "multi_gpu_inference.yaml")]
    settings = {"bundle_root": ROOT, "dataset_dir": dataset_dir, "num_images": num_images, "output_dir": output_dir}
    settings.update({"adapted_model": os.path.join(output_dir, "model.pt"), **overrides})
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", str(processes), "-m", "monai.bundle", "run"]
    command += ["--config_file", json.dumps(configs)]
    for key, value in settings.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    subprocess.run(command, cwd=ROOT, check=True)
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)


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
    head = "| method | " + " | ".join(classes) + " | mean Dice | mean IoU | missed % | s / image | peak MB | review |"
    lines = [head, "|" + "---|" * (len(classes) + 7)]
    for method, s in results.items():
        per = " | ".join(f"{s['per_class'].get(c, float('nan')):.1f}" for c in classes)
        peak, missed = s.get("peak_memory_mb"), s.get("missed_share", math.nan)
        lines.append(
            f"| {method} | {per} | **{s['dice_mean']:.1f}** | {s['iou_mean']:.1f} | {missed:.1f} | "
            f"{s['seconds_per_image']:.2f} | " + (f"{peak:.0f} |" if peak else "- |") + f" {_review(s)} |"
        )
    return "\n".join(lines) + _REVIEW_NOTE


_REVIEW_NOTE = (
    "\n\nreview: images flagged for review (qc.csv) / images scored; failures (mean Dice below 0.5) among them, "
    "with the share of failures flagged and the share of flagged images that are failures"
)


def _review(summary: dict) -> str:
    """The review flags against the truth: 'flagged / scored; failures: share flagged, share of flagged failing'."""
    r = summary.get("review") or {}
    if "num_scored" not in r:
        return "-"

    def pct(v) -> str:
        return "-" if v is None else f"{v:.0f}%"

    return (
        f"{r['num_flagged_scored']} / {r['num_scored']} flagged; {r['num_failures']} failures: "
        f"{pct(r['failures_flagged'])} flagged, {pct(r['flagged_failing'])} of flagged fail"
    )


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
    p.add_argument("--num_images", type=int, default=40, help="cases in the tuning split")
    p.add_argument(
        "--split",
        default="tuning",
        choices=["tuning", "confirmation"],
        help=f"tuning: the num_images cases after the reference; confirmation: the {CONFIRMATION} after those",
    )
    p.add_argument(
        "--references",
        type=int,
        nargs="*",
        default=None,
        help="sorted case indices: the default config once per reference, with the num_images cases after it",
    )
    p.add_argument(
        "--within_tuning",
        action="store_true",
        help="with --references: each reference's targets are the tuning split's other cases (no confirmation case)",
    )
    p.add_argument("--methods", nargs="*", default=["bundle", "elastix", "ants"], choices=["bundle", "elastix", "ants"])
    p.add_argument(
        "--strategies",
        nargs="*",
        default=[],
        choices=sorted(_default("sources")),
        help="extra bundle rows, one per strategy",
    )
    p.add_argument(
        "--processes", type=int, nargs="*", default=[1], help="bundle rows with each number of processes (torchrun)"
    )
    p.add_argument("--set", nargs="*", default=[], help="config overrides for the bundle, key=value (JSON values)")
    p.add_argument("--variant", action="append", default=[], help="extra bundle rows: name:key=value,key=value")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--title", default=None, help="heading of the table in the markdown file (default: dataset name)")
    args = p.parse_args(argv)
    if args.within_tuning and not args.references:
        p.error("--within_tuning needs --references")
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
        if args.references:
            results = run_spread(dataset_dir, args.references, args.num_images, overrides, out, args.within_tuning)
            cases = "the tuning split's other cases" if args.within_tuning else "the cases after each reference"
            text, note = spread_table(results), f"({args.num_images} test images: {cases}; {_machine()})"
        else:
            start, count = (0, args.num_images) if args.split == "tuning" else (args.num_images, CONFIRMATION)
            data = split_dir(dataset_dir, 0, start, count, os.path.join(out, "datalist"))
            results = run_dataset(data, 0, args.methods, overrides, variants, out, args.processes)
            text, note = table(results), f"({args.split} split: cases {start + 1}-{start + count} after the reference"
            note += f"; {_machine()})"
        if args.markdown:
            title = args.title or dataset
            if args.title and len(args.dataset_dir) > 1:
                title = f"{args.title} ({dataset})"
            write_markdown(args.markdown, title, command, text + "\n\n" + note)
        everything[dataset] = results
    return everything


def run_spread(
    dataset_dir: str,
    references: list[int],
    num_images: int,
    overrides: dict,
    out_root: str,
    within_tuning: bool = False,
) -> dict:
    """The default config once per reference index, with the ``num_images`` cases after it (``within_tuning``: with
    the tuning split's other cases)."""
    results = {}
    for r in references:
        folder, settings = os.path.join(out_root, f"reference_{r}", "datalist"), {"progress": False}
        if within_tuning:
            data, settings["reference_image"] = tuning_dir(dataset_dir, r, num_images, folder)
        else:
            data = split_dir(dataset_dir, r, 0, num_images, folder)
        out = os.path.join(out_root, f"reference_{r}", "bundle")
        results[f"reference {r + 1}"] = _isolated(run_bundle, data, 0, {**settings, **overrides}, out)
        print(spread_table(results), flush=True)
    return results


def spread_table(results: dict[str, dict]) -> str:
    """Mean Dice and missed share per reference, then the mean and standard deviation of the mean Dice."""
    lines = ["| reference | mean Dice | missed % |", "|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['dice_mean']:.1f} | {s.get('missed_share', math.nan):.1f} |")
    means = np.array([s["dice_mean"] for s in results.values()])
    lines.append(
        f"| **mean +- std** | **{means.mean():.1f} +- {means.std(ddof=1) if len(means) > 1 else 0.0:.1f}** | |"
    )
    return "\n".join(lines)


def run_dataset(
    dataset_dir: str, num_images: int, methods, overrides: dict, variants, out_root: str, processes=(1,)
) -> dict:
    """Every requested method and bundle variant on one dataset; prints the table after each row. The default
    config's row once per number of ``processes``."""
    default_strategy = overrides.get("strategy", _default("strategy"))
    results: dict[str, dict] = {}
    for method in methods:
        if method == "bundle":
            for k in processes:
                settings = {"progress": False, **overrides}
                if k == 1:
                    results[f"bundle, {default_strategy} (default config)"] = _isolated(
                        run_bundle, dataset_dir, num_images, settings, os.path.join(out_root, "bundle")
                    )
                else:
                    name = f"bundle, {default_strategy} (default config, {k} processes)"
                    out = os.path.join(out_root, f"bundle_{k}_processes")
                    results[name] = _isolated(run_torchrun, k, dataset_dir, num_images, settings, out)
                print(table(results), flush=True)
            continue
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
