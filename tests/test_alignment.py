import numpy as np
import torch

from bundle.alignment import (
    Frame,
    boundary_strength,
    candidate_frames,
    from_reference,
    gradient_magnitude,
    inscribed_circle,
    label_frame,
    probability_frame,
    solidity,
    to_reference,
)
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


def _leaky_region(size: tuple[int, int] = (120, 160)) -> tuple[np.ndarray, np.ndarray]:
    """A structure (disk of radius 20 at row 40, column 50) whose probability leaks through a neck into a larger,
    thinner neighbour (a 24-pixel-high band): the fetal head and body of an ultrasound image."""
    head = disk(size, (40, 50), 20)
    prob = np.zeros(size, np.float32)
    prob[head] = 0.9
    prob[58:70, 45:55] = 0.8  # the neck
    prob[70:94, 10:150] = 0.8  # the body
    return prob, head


def test_inscribed_circle_finds_the_deepest_point():
    _, head = _leaky_region()
    x, y, radius = inscribed_circle(head)
    assert abs(x - 50) <= 1 and abs(y - 40) <= 1 and abs(radius - 20) <= 1.5


def test_candidate_frames_include_a_guess_blind_to_a_leak():
    prob, head = _leaky_region()
    reference = disk((100, 100), (50, 50), 10)  # same shape, half the size, elsewhere
    frames = candidate_frames(prob, reference, scales=(1.0, 1.2))
    assert len(frames) == 6
    truth = label_frame(head)
    region = probability_frame(prob)
    assert frames[0] == region  # the first guess is the region's own frame (the training frame)
    # the leak drags the region's frame off the structure and inflates it...
    assert region.size > 1.5 * truth.size and abs(region.y - truth.y) > 10
    # ...the deepest point sits in the structure, and sizing it by the inscribed circle recovers its size
    deepest = frames[2]
    assert abs(deepest.x - truth.x) <= 1.5 and abs(deepest.y - truth.y) <= 1.5
    assert abs(deepest.size / truth.size - 1) < 0.1
    assert frames[1].size == region.size and (frames[1].x, frames[1].y) == (deepest.x, deepest.y)
    # scales multiply the sizes and keep the centres
    for a, b in zip(frames[:3], frames[3:]):
        assert (a.x, a.y) == (b.x, b.y) and abs(b.size - 1.2 * a.size) < 1e-6


def test_candidate_frames_are_empty_without_a_region_or_a_reference():
    prob, _ = _leaky_region()
    assert candidate_frames(np.full((20, 20), 0.3, np.float32), disk((20, 20), (10, 10), 4)) == []
    assert candidate_frames(prob, np.zeros((20, 20), bool)) == []


def test_solidity_penalises_a_leaked_mask():
    prob, head = _leaky_region()
    assert solidity(head) > 0.95
    assert solidity(prob > 0.5) < 0.8
    assert solidity(np.zeros((10, 10), bool)) == 0.0
    # the largest component counts, not the gap between components
    big = disk((60, 60), (15, 15), 10)
    assert solidity(big | disk((60, 60), (45, 45), 5)) == solidity(big)


def test_boundary_strength_is_high_only_where_the_outline_follows_an_edge():
    size = (100, 120)
    structure = disk(size, (50, 60), 20)
    image = np.where(structure, 200.0, 60.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 2, size).astype(np.float32)
    gradient = gradient_magnitude(np.stack([image] * 3, -1))  # channels are averaged
    assert gradient.shape == size and abs(gradient.mean() - 1) < 1e-4
    on_edge = boundary_strength(gradient, structure)
    assert on_edge > 4  # the outline sits on the structure's edge: several times the image's mean gradient
    assert boundary_strength(gradient, disk(size, (50, 60), 30)) < 0.5  # leaked into the flat surroundings
    assert boundary_strength(gradient, disk(size, (50, 60), 10)) < 0.5  # stopped inside the structure
    assert boundary_strength(gradient, np.zeros(size, bool)) == 0.0
