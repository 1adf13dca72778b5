"""Click correction with the real LiteMedSAM on a synthetic image: a click fixes what it points at, not the rest."""

import numpy as np

from bundle.clicks import clicks_honoured, correct_mask, disk_edit, local_edit
from tests.conftest import disk, sam_hash


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _scene():
    """A bright disk (the structure) and a bright square far from it on a dark, noisy background."""
    rng = np.random.default_rng(0)
    structure = disk((256, 256), (128, 100), 45)
    other = np.zeros((256, 256), bool)
    other[40:80, 180:220] = True
    image = 30.0 + 10.0 * rng.standard_normal((256, 256))
    image[structure | other] += 150.0
    return image.astype(np.float32), structure


def test_pure_helpers_change_only_what_the_clicks_point_at():
    previous = disk((64, 64), (32, 20), 10) | disk((64, 64), (32, 44), 6)  # a structure and a leak beside it
    fg, none = np.array([[5.0, 5.0]]), np.zeros((0, 2))
    assert clicks_honoured(previous, np.array([[20.0, 32.0]]), np.array([[44.0, 32.0]])) == 1
    # a background click in the leak removes the leak (the part the candidate leaves out around it) and nothing else
    removed = local_edit(disk((64, 64), (32, 20), 10), previous, none, np.array([[44.0, 32.0]]))
    assert np.array_equal(removed, disk((64, 64), (32, 20), 10))
    # the least edit: a disk as large as fits in the leak around the click; the structure untouched
    least = disk_edit(previous, none, np.array([[44.0, 32.0]]), radius=20)
    assert not least[32, 44] and np.array_equal(least[:, :30], previous[:, :30])
    grown = disk_edit(previous, fg, none, radius=3)
    assert grown[5, 5] and grown.sum() > previous.sum() and np.array_equal(grown[20:], previous[20:])


def test_clicks_correct_a_leak_and_a_miss_with_sam_unchanged(lite_medsam):
    image, structure = _scene()
    embedding = lite_medsam.encode(image)
    before = sam_hash(lite_medsam)
    leak = np.zeros_like(structure)
    leak[40:80, 180:220] = True  # the mask ran onto the other bright object
    mask, _ = correct_mask(lite_medsam, embedding, structure | leak, np.zeros((0, 2)), np.array([[200.0, 60.0]]))
    # the leak shrinks around the click (at most a disk of 5% of the image per click), the structure is kept
    assert not mask[60, 200] and (mask & leak).sum() < 0.75 * leak.sum()
    assert (mask & structure).sum() > 0.98 * structure.sum()
    missed = structure & ~disk((256, 256), (128, 130), 25)  # a bite out of its right side
    mask, _ = correct_mask(lite_medsam, embedding, missed, np.array([[135.0, 128.0]]), np.zeros((0, 2)))
    assert mask[128, 135] and _dice(mask, structure) > _dice(missed, structure) + 0.03
    assert sam_hash(lite_medsam) == before
