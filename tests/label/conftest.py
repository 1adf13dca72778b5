"""Fixtures of the MONAI Label tests (run in .venv-label by scripts/test_label.sh; the main suite skips them)."""

import os

import pytest

from tests.conftest import ROOT, shared_dataset


@pytest.fixture(scope="session")
def jsrt() -> str:
    return shared_dataset("jsrt")


@pytest.fixture(scope="session")
def adapted_model(tmp_path_factory, jsrt) -> str:
    """A fitted model from a short fused adaptation on the first JSRT cases (fast settings), in a temporary folder.

    ONESHOT_LABEL_MODEL names an adapted model made by this fixture before, to skip the adaptation while developing.
    """
    if os.environ.get("ONESHOT_LABEL_MODEL"):
        return os.environ["ONESHOT_LABEL_MODEL"]
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    out = tmp_path_factory.mktemp("adaptation")
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update(
        {
            "bundle_root": ROOT,
            "dataset_dir": jsrt,
            "num_images": 3,
            "output_dir": str(out / "cohort"),
            "adapted_model": str(out / "model.pt"),
            "progress": False,
            "num_overlays": 0,
            "working_size": 96,
            "self_training": 1,
            "trainer#initial_epochs": 20,
            "trainer#min_iterations": 60,
        }
    )
    set_determinism(seed=0)
    parser.get_parsed_content("workflow").run()
    return str(out / "model.pt")
