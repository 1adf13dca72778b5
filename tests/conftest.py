import hashlib
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))


def shared_dataset(name: str) -> str:
    """Path of a dataset in ../shared/data; skips when absent, unless CI requires it (ONESHOT_REQUIRE_DATA=1)."""
    path = os.path.join(DATA, name)
    if not os.path.isfile(os.path.join(path, "dataset.json")):
        if os.environ.get("ONESHOT_REQUIRE_DATA") == "1":
            pytest.fail(f"{path} is required in CI but missing")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def lite_medsam():
    from bundle.sam import LiteMedSAM

    return LiteMedSAM()


def disk(size: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean (H, W) disk with centre (row, col)."""
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def sam_hash(sam) -> str:
    """SHA-256 of every tensor of a SAM backend's model: equal before and after means its weights did not change."""
    h = hashlib.sha256()
    for name, tensor in sorted(sam.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
