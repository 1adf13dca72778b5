import numpy as np
import torch

from bundle.alignment import Frame, from_reference, label_frame, probability_frame, to_reference
from tests.conftest import disk


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_label_frame_is_centre_and_size_of_the_mask():
    mask = disk((80, 100), (30, 60), 10)  # centre row 30, column 60
    frame = label_frame(mask)
    assert abs(frame.x - 60) < 0.5 and abs(frame.y - 30) < 0.5
    assert abs(frame.size - np.sqrt(mask.sum())) < 1e-6
    assert label_frame(np.zeros((8, 8), bool)) is None


def test_probability_frame_takes_the_most_probable_region():
    prob = np.zeros((80, 100), np.float32)
    prob[disk((80, 100), (20, 20), 6)] = 0.6  # small, barely above threshold
    big = disk((80, 100), (50, 70), 12)
    prob[big] = 0.9
    frame = probability_frame(prob)
    assert abs(frame.x - 70) < 0.5 and abs(frame.y - 50) < 0.5
    assert abs(frame.size - np.sqrt(big.sum())) < 1e-6
    assert probability_frame(np.full((8, 8), 0.4, np.float32)) is None


def test_a_moved_and_resized_structure_lands_on_the_reference_and_back():
    ref_shape, size = (90, 80), (100, 120)
    ref_mask = disk(ref_shape, (50, 40), 8)
    target_mask = disk(size, (30, 85), 14)  # elsewhere and larger, in an image of another shape
    target = np.where(target_mask, 1.0, 0.0).astype(np.float32)
    frame, reference = label_frame(target_mask), label_frame(ref_mask)
    aligned = to_reference(target, frame, reference, ref_shape)
    assert aligned.shape == ref_shape
    assert _dice(aligned > 0.5, ref_mask) > 0.9
    back = from_reference(torch.from_numpy(ref_mask.astype(np.float32))[None], frame, reference, size)
    assert back.shape == (1, *size)
    assert _dice(back[0].numpy() > 0.5, target_mask) > 0.9


def test_identity_frames_change_nothing():
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    same = Frame(20.0, 15.0, 10.0)
    assert np.allclose(to_reference(image, same, same, image.shape), image, atol=1e-5)
