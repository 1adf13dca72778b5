import numpy as np
import pytest
import torch

from bundle.prompts import PromptGenerator, class_prototypes, mask_to_box, select_points, similarity_map
from tests.conftest import disk


def test_box_is_x_then_y():
    mask = np.zeros((40, 60), bool)
    mask[5:10, 30:50] = True  # rows 5-9, columns 30-49
    np.testing.assert_array_equal(mask_to_box(mask), [30, 5, 49, 9])
    assert mask_to_box(np.zeros((4, 4), bool)) is None


def test_select_points_one_per_subregion_and_ranked():
    region = np.zeros((10, 10), bool)
    region[2:8, 2:8] = True
    sim = np.zeros((10, 10))
    sim[3, 4], sim[6, 5] = 1.0, 0.9
    pts = select_points(region, sim, 2, highest=True)
    assert pts.shape == (2, 2)
    assert (4, 3) in {tuple(p) for p in pts.astype(int).tolist()}  # (x, y) of the best pixel in the first half
    assert select_points(np.zeros((5, 5), bool), sim[:5, :5], 3, True).shape == (0, 2)
    one = np.zeros((5, 5), bool)
    one[1, 3] = True
    np.testing.assert_array_equal(select_points(one, np.zeros((5, 5)), 5, False), [[3, 1]])


@pytest.fixture(scope="module")
def embedded(lite_medsam):
    image = np.zeros((96, 128), np.float32)
    image[disk((96, 128), (40, 70), 20)] = 1.0
    return lite_medsam, lite_medsam.encode(image), image


def test_generator_handles_empty_and_one_pixel_masks(embedded):
    sam, emb, image = embedded
    probs = torch.zeros(3, 96, 128)
    probs[0] = torch.from_numpy(disk((96, 128), (40, 70), 20)).float()
    probs[2, 10, 20] = 1.0  # one pixel; class 1 stays empty
    protos = class_prototypes(emb, probs, sam.img_size)
    prompts = PromptGenerator(num_points=3)(sam, emb, probs, protos)
    assert prompts.valid.tolist() == [True, False, True]
    np.testing.assert_array_equal(prompts.boxes[2].numpy(), [20, 10, 20, 10])
    assert prompts.mask_logits.shape == (3, 1, 256, 256)
    assert (prompts.point_labels[1] == -1).all()  # no point for the empty class
    assert (prompts.point_labels[0] == 1).sum() == 3 and (prompts.point_labels[0] == 0).sum() == 3
    pos = prompts.points[0][prompts.point_labels[0] == 1].long()
    assert probs[0][pos[:, 1], pos[:, 0]].all()  # positives inside the mask, (x, y) order
    neg = prompts.points[0][prompts.point_labels[0] == 0].long()
    inner = torch.from_numpy(disk((96, 128), (40, 70), 16))
    assert not inner[neg[:, 1], neg[:, 0]].any()  # negatives in the band, not deep inside
    pos2 = prompts.points[2][prompts.point_labels[2] == 1]
    np.testing.assert_array_equal(pos2.numpy(), [[20, 10]])


def test_mask_prompt_is_padded_bottom_right(embedded):
    sam, emb, _ = embedded
    probs = torch.ones(1, 96, 128)
    logits = sam.mask_prompt(probs, (96, 128))
    # 96x128 scaled to 192x256 in the 256 frame: rows >= 192 are padding
    assert logits[0, 0, :190].min() > 0 and logits[0, 0, 194:].max() < 0


def test_similarity_is_higher_inside_the_object(embedded):
    sam, emb, _ = embedded
    mask = torch.from_numpy(disk((96, 128), (40, 70), 20)).float()[None]
    sim = similarity_map(emb, class_prototypes(emb, mask, sam.img_size), sam.img_size)[0]
    assert sim.shape == (96, 128)
    assert sim[mask[0] > 0].mean() > sim[mask[0] == 0].mean()


def test_generator_needs_some_prompt():
    with pytest.raises(ValueError):
        PromptGenerator(use_box=False, use_mask=False, num_points=0)
