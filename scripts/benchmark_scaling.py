"""How time and memory grow with the cohort: the default config on N = 10, 40, 160, 600 targets.

    python scripts/benchmark_scaling.py --dataset_dir ../shared/data/hc18 --sizes 10 40 160 600
        [--set key=value ...] [--markdown docs/benchmarks.md]

Reference = first case by sorted image name. A dataset has fewer cases than the largest N, so the cohort is made of
its cases after the reference, then the same cases flipped left-right, top-bottom and both (images and labels,
written to a temporary folder, never into the repository); the first N of that list are the targets. Each N runs in
its own process, so its peak memory (resident set size) is its own. Prints (and with ``--markdown`` writes) one
table: N, mean Dice, seconds per image, peak MB, and the seconds of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

import cv2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchmark import _isolated, _machine, _value, run_bundle, write_markdown  # noqa: E402

FLIPS = [("", None), ("_lr", 1), ("_tb", 0), ("_lrtb", -1)]


def flipped_cohort(dataset_dir: str, size: int, out_dir: str) -> str:
    """A datalist in ``out_dir`` with the dataset's reference and ``size`` targets: its cases after the reference,
    then flipped copies of them (written to ``out_dir``)."""
    with open(os.path.join(dataset_dir, "dataset.json")) as f:
        spec = json.load(f)
    items = sorted((i for i in spec["training"] if i.get("label")), key=lambda i: os.path.basename(i["image"]))

    def absolute(v: str) -> str:
        return os.path.abspath(os.path.join(dataset_dir, v))

    reference, cases = items[0], items[1:]
    targets = []
    for suffix, code in FLIPS:
        for case in cases:
            if len(targets) == size:
                break
            if code is None:
                targets.append({k: absolute(case[k]) for k in ("image", "label")})
                continue
            entry = {}
            for k in ("image", "label"):
                src = absolute(case[k])
                stem, ext = os.path.splitext(os.path.basename(src))
                dst = os.path.join(out_dir, k + "s", f"{stem}{suffix}{ext}")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if not os.path.exists(dst):
                    cv2.imwrite(dst, cv2.flip(cv2.imread(src, cv2.IMREAD_UNCHANGED), code))
                entry[k] = dst
            targets.append(entry)
    if len(targets) < size:
        raise ValueError(f"{dataset_dir}: {len(cases)} cases give at most {4 * len(cases)} targets, not {size}")
    datalist = os.path.join(out_dir, f"n{size}")
    os.makedirs(datalist, exist_ok=True)
    ref = {k: absolute(reference[k]) for k in ("image", "label")}
    with open(os.path.join(datalist, "dataset.json"), "w") as f:
        json.dump({"labels": spec.get("labels", {}), "training": [ref, *targets]}, f, indent=1)
    return datalist


def table(results: dict[int, dict]) -> str:
    stages = sorted({k for s in results.values() for k in s["seconds_by_stage"]})
    head = "| targets | mean Dice | s / image | peak MB | " + " | ".join(s.removesuffix("_s") for s in stages) + " |"
    lines = [head, "|" + "---|" * (4 + len(stages))]
    for n, s in results.items():
        per_stage = " | ".join(f"{s['seconds_by_stage'].get(k, 0.0):.0f}" for k in stages)
        lines.append(
            f"| {n} | {s['dice_mean']:.1f} | {s['seconds_per_image']:.2f} | {s['peak_memory_mb']:.0f} | {per_stage} |"
        )
    return "\n".join(lines)


def peak_table(results: dict[int, dict]) -> str:
    """Peak MB of the run when each stage last ended (runs from before this was recorded: left out)."""
    results = {n: s for n, s in results.items() if s.get("peak_memory_mb_by_stage")}
    if not results:
        return ""
    stages = sorted({k for s in results.values() for k in s["peak_memory_mb_by_stage"]})
    head = "| targets | " + " | ".join(f"peak MB after {s.removesuffix('_s')}" for s in stages) + " |"
    lines = [head, "|" + "---|" * (1 + len(stages))]
    for n, s in results.items():
        lines.append(f"| {n} | " + " | ".join(f"{s['peak_memory_mb_by_stage'].get(k, 0):.0f}" for k in stages) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 40, 160, 600])
    p.add_argument("--set", nargs="*", default=[], help="config overrides for the bundle, key=value (JSON values)")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    out_root = args.output_dir or tempfile.mkdtemp(prefix="scaling_")
    command = "python scripts/benchmark_scaling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results = {}
    for n in args.sizes:
        data = flipped_cohort(args.dataset_dir, n, os.path.join(out_root, "cohort"))
        out = os.path.join(out_root, f"bundle_{n}")
        results[n] = _isolated(run_bundle, data, 0, {"progress": False, **overrides}, out)
        print(table(results), peak_table(results), sep="\n\n", flush=True)
    if args.markdown:
        name = os.path.basename(os.path.normpath(args.dataset_dir))
        note = f"(default config; cohort: {name}'s cases after the reference, then flipped copies; {_machine()})"
        tables = table(results) + "\n\n" + peak_table(results)
        write_markdown(args.markdown, f"scaling, {name}", command, tables + "\n\n" + note)
    return results


if __name__ == "__main__":
    main()
