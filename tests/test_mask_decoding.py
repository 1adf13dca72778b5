import numpy as np
import pytest
import torch

from bundle.mask_decoding import decode_masks
from tests.conftest import disk


@pytest.fixture(scope="module")
def scene(lite_medsam):
    image = np.random.default_rng(0).normal(60, 10, (160, 220)).astype(np.float32)
    image[disk((160, 220), (70, 140), 30)] = 200.0
    return lite_medsam.encode(image)


def _prompts(sam, embedding, kind: str):
    boxes = torch.tensor([[100.0, 30.0, 180.0, 110.0], [20.0, 20.0, 90.0, 140.0], [110.0, 40.0, 170.0, 100.0]])
    if kind == "boxes":
        return sam.encode_prompts(embedding, boxes=boxes)
    if kind == "boxes and masks":
        prob = torch.zeros(3, 160, 220)
        prob[0, 40:100, 110:170], prob[1, 30:130, 30:80], prob[2, 60:80, 120:160] = 1, 1, 1
        return sam.encode_prompts(embedding, boxes=boxes, mask_logits=sam.mask_prompt(prob, (160, 220)))
    points = torch.tensor([[[140.0, 70.0], [40.0, 40.0]], [[60.0, 80.0], [150.0, 60.0]], [[140.0, 70.0], [0, 0]]])
    return sam.encode_prompts(embedding, points=points, point_labels=torch.tensor([[1, 0], [1, 0], [1, -1]]))


@pytest.mark.parametrize("kind", ["boxes", "boxes and masks", "points"])
@pytest.mark.parametrize("multimask", [False, True])
def test_the_shared_image_decoding_gives_sams_own_logits(lite_medsam, scene, kind, multimask):
    sparse, dense = _prompts(lite_medsam, scene, kind)
    decoder = lite_medsam.model.mask_decoder
    with torch.no_grad():
        expected = decoder(scene.features, lite_medsam.dense_pe, sparse, dense, multimask)
        got = decode_masks(decoder, scene.features, lite_medsam.dense_pe, sparse, dense, multimask)
        one = decode_masks(decoder, scene.features, lite_medsam.dense_pe, sparse[1:2], dense[1:2], multimask)
    assert got[0].shape == expected[0].shape == (3, 3 if multimask else 1, 256, 256)
    assert got[1].shape == expected[1].shape
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one[0], expected[0][1:2], rtol=1e-4, atol=2e-4)  # a row does not depend on the others
    with pytest.raises(ValueError, match="one image"):
        decode_masks(decoder, scene.features.expand(2, -1, -1, -1), lite_medsam.dense_pe, sparse, dense, multimask)


def test_shifted_mask_tokens_match_sam_with_those_tokens_and_carry_gradients(lite_medsam, scene):
    sparse, dense = _prompts(lite_medsam, scene, "boxes")
    decoder = lite_medsam.model.mask_decoder
    shift = torch.randn(decoder.mask_tokens.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    tokens = (decoder.mask_tokens.weight + shift).requires_grad_(True)
    with torch.no_grad():
        args = (scene.features, lite_medsam.dense_pe, sparse, dense, False)
        expected = torch.func.functional_call(decoder, {"mask_tokens.weight": tokens.detach()}, args)
        plain = decoder(*args)
    low_res, iou = decode_masks(decoder, *args, mask_tokens=tokens)
    torch.testing.assert_close(low_res.detach(), expected[0], rtol=1e-4, atol=2e-4)
    assert (low_res.detach() - plain[0]).abs().max() > 1e-2  # the shift changes the masks
    low_res.sigmoid().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert decoder.mask_tokens.weight.grad is None
