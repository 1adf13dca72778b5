"""Several processes on one job (bundle/distributed.py, configs/multi_gpu_inference.yaml) with gloo on the CPU."""

import csv
import json
import os
import subprocess
import sys

import ignite.distributed as idist
import numpy as np
import torch
from PIL import Image

from tests.conftest import ROOT

MULTI = "['configs/inference.yaml','configs/multi_gpu_inference.yaml']"


def _spawn(fn, *args) -> None:
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(fn, *args)


def _trainer(init_seed: int = 0):
    from bundle.engine import WarpTrainer
    from bundle.losses import WarpingLoss
    from bundle.networks import WarpNet
    from bundle.transforms import reference_augmentation

    torch.manual_seed(init_seed)
    network = WarpNet(in_channels=1, channels=[8, 16, 32])
    trainer = WarpTrainer(
        network, WarpingLoss(), reference_augmentation(size=48), lr=5e-4, batch_size=4, progress=False
    )
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(2, 48, 48)
    label[1, 14:30, 12:28] = 1
    label[0] = 1 - label[1]
    trainer.setup(torch.rand(1, 48, 48, generator=g), label, torch.rand(6, 1, 48, 48, generator=g))
    return trainer


def _train(local_rank: int, steps: int, path: str) -> None:
    torch.set_num_threads(1)
    trainer = _trainer(init_seed=idist.get_rank())  # rank 1 must start from rank 0's weights all the same
    loss = trainer.fit(steps)
    weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
    torch.save({"weights": weights, "loss": loss}, f"{path}.rank{idist.get_rank()}")


def test_data_parallel_warp_training_matches_one_process(tmp_path):
    """Two processes split each batch (targets and augmented views) and sum gradients: the same steps as one."""
    torch.set_num_threads(1)
    trainer = _trainer()
    loss = trainer.fit(2)
    weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
    two = str(tmp_path / "two")
    _spawn(_train, 2, two)
    rank0, rank1 = torch.load(two + ".rank0"), torch.load(two + ".rank1")
    assert torch.equal(rank0["weights"], rank1["weights"])  # one model in both processes
    # without the gradient sum each process would follow its half batch: a difference of the order of the lr (5e-4)
    assert (rank0["weights"] - weights).abs().max() < 2e-5
    assert abs(rank0["loss"] - loss) < 1e-4 and rank0["loss"] == rank1["loss"]  # the global batch's loss


def _map(local_rank: int, path: str) -> None:
    from bundle.sources.base import Cohort

    calls = []

    def fn(key, image):
        calls.append(key)
        return key, idist.get_rank(), torch.from_numpy(image).sum()

    items = [(f"k{i}", np.full((4, 4), i, np.float32)) for i in range(5)]
    cohort = Cohort(items, store=None)
    everything = cohort.map(fn)
    subset = cohort.map(fn, indices=[0, 2, 4])
    result = {"all": [[k, r, float(s)] for k, r, s in everything], "subset": [[k, r] for k, r, _ in subset]}
    with open(f"{path}.rank{idist.get_rank()}", "w") as f:
        json.dump({**result, "calls": calls}, f)


def test_cohort_map_gives_each_item_to_its_owner_and_gathers_in_order(tmp_path):
    path = str(tmp_path / "map")
    _spawn(_map, path)
    results = []
    for r in (0, 1):
        with open(f"{path}.rank{r}") as f:
            results.append(json.load(f))
    calls = [result.pop("calls") for result in results]
    assert results[0] == results[1]  # the same list on every process
    assert results[0]["all"] == [[f"k{i}", i % 2, 16.0 * i] for i in range(5)]  # in order, by its owner
    # a subset keeps each item's owner from its position in the whole cohort
    assert results[0]["subset"] == [["k0", 0], ["k2", 0], ["k4", 0]]
    assert calls[0] == ["k0", "k2", "k4", "k0", "k2", "k4"] and calls[1] == ["k1", "k3"]  # each item computed once


def _bundle(out, *command, config="configs/inference.yaml"):
    args = ["--config_file", config, "--output_dir", str(out), "--num_images", "4", "--progress", "false"]
    proc = subprocess.run([*command, "-m", "monai.bundle", "run", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = _bundle(tmp_path / "two", torchrun, "--nproc_per_node", "2", config=MULTI)
    one = _bundle(tmp_path / "one", sys.executable)
    assert two["num_images"] == one["num_images"] == 4 and two["num_scored"] == 4
    assert sorted(os.listdir(tmp_path / "two" / "predictions")) == sorted(os.listdir(tmp_path / "one" / "predictions"))
    assert (tmp_path / "two" / "model.pt").exists() and (tmp_path / "two" / "report.html").exists()
    # the label maps of the two runs agree (floating-point order differs; 0.96 measured on the 8-image demo)
    agreement = []
    for name in os.listdir(tmp_path / "one" / "predictions"):
        a = np.asarray(Image.open(tmp_path / "one" / "predictions" / name))
        b = np.asarray(Image.open(tmp_path / "two" / "predictions" / name))
        for c in np.unique(a[a > 0]):
            agreement.append(2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()))
    assert len(agreement) == 12 and np.mean(agreement) > 0.93, agreement
    assert abs(two["dice_mean"] - one["dice_mean"]) < 2.0
    # the review signals of the images rank 1 segmented reached rank 0's qc.csv
    with open(tmp_path / "two" / "qc.csv") as f:
        rows = list(csv.DictReader(f))
    sam_rows = [r for r in rows if r["source"] != "registration" and r["found"] == "True"]
    assert len({r["id"] for r in sam_rows}) == 4 and all(r["sam_iou"] for r in sam_rows)
