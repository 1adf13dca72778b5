"""Feature matching on synthetic features: cycle check, hard negatives, exclusive / sparse sampling, empty sets."""

import numpy as np
import torch
import torch.nn.functional as F

from bundle.matching import (
    exclusive_sampling,
    grid_to_pixels,
    match_patches,
    match_prompts,
    patch_labels,
    sparse_sampling,
)


def test_cycle_check_keeps_only_matches_that_come_back_to_the_foreground():
    # reference: patches 0,1 foreground (features e0, e1), 2,3 background (e2, e3)
    ref = torch.eye(8)[[0, 1, 2, 3]]
    fg = torch.tensor([True, True, False, False])
    bg = ~fg
    # target: patch 0 looks like e0 (true positive); patch 1 is closest to e1 from the reference side but is itself
    # closer to background patch 2 (fails the backward check); patch 2 looks like e3 (negative)
    t1 = F.normalize(torch.eye(8)[1] * 0.6 + torch.eye(8)[2] * 0.8, dim=0)
    tgt = torch.stack([torch.eye(8)[0], t1, torch.eye(8)[3]])
    m = match_patches(ref, tgt, fg, bg, num_hard=0)
    assert m.positives.tolist() == [0]
    assert sorted(m.negatives.tolist()) == [1, 2]


def test_hard_negatives_are_least_like_the_foreground_and_never_positives():
    ref = torch.eye(8)[[0, 1, 2]]
    fg = torch.tensor([True, False, False])
    tgt = F.normalize(torch.stack([torch.eye(8)[0], torch.eye(8)[1], torch.eye(8)[0] * 0.5 + torch.eye(8)[2]]), dim=1)
    m = match_patches(ref, tgt, fg, ~fg, num_hard=2)
    assert 0 in m.positives.tolist()
    assert 0 not in m.hard_negatives.tolist()
    assert m.hard_negatives.tolist()[0] == 1  # orthogonal to the foreground feature: the hardest negative


def test_empty_sets_give_empty_matches():
    ref = torch.eye(8)[:3]
    none = torch.zeros(3, dtype=torch.bool)
    m = match_patches(ref, torch.eye(8)[:4], none, none)
    assert len(m.positives) == len(m.negatives) == len(m.hard_negatives) == 0
    m = match_patches(ref, torch.zeros(0, 8), torch.ones(3, dtype=torch.bool), none)
    assert len(m.positives) == 0


def test_patch_labels_leave_boundary_patches_out():
    mask = torch.zeros(8, 8)
    mask[0:4, 0:4] = 1  # exactly patch (0, 0) of a 2x2 grid
    mask[4:6, 4:8] = 1  # half of patch (1, 1)
    fg, bg = patch_labels(mask, (2, 2))
    assert fg.tolist() == [True, False, False, False]
    assert bg.tolist() == [False, True, True, False]


def test_exclusive_sampling_drops_negatives_near_positives():
    pos = np.array([[10.0, 10.0]])
    neg = np.array([[12.0, 10.0], [40.0, 40.0]])
    assert exclusive_sampling(pos, neg, radius=5).tolist() == [[40.0, 40.0]]
    assert exclusive_sampling(np.zeros((0, 2)), neg, radius=5).shape == (2, 2)
    assert exclusive_sampling(pos, np.zeros((0, 2)), radius=5).shape == (0, 2)


def test_sparse_sampling_keeps_one_point_per_group_farthest_from_the_others():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [50.0, 50.0]])
    others = np.array([[-10.0, 0.0]])
    out = sparse_sampling(pts, others, radius=5)
    assert len(out) == 2
    assert [2.0, 0.0] in out.tolist()  # the group's representative is the point farthest from the negatives
    assert [50.0, 50.0] in out.tolist()
    assert len(sparse_sampling(pts, others, radius=5, limit=1)) == 1
    assert sparse_sampling(np.zeros((0, 2)), others, radius=5).shape == (0, 2)
    assert len(sparse_sampling(pts, np.zeros((0, 2)), radius=5)) == 2


def test_grid_to_pixels_gives_patch_centres_in_x_y():
    xy = grid_to_pixels(torch.tensor([0, 5]), (2, 4), (20, 80))  # 2 rows x 4 cols of 10 x 20 px patches
    assert xy.tolist() == [[10.0, 5.0], [30.0, 15.0]]
    assert grid_to_pixels(torch.zeros(0, dtype=torch.long), (2, 4), (20, 80)).shape == (0, 2)


def _features_with_object(size, top, left, obj=8):
    """(D, size, size) features: a distinctive code inside a square object, a background code elsewhere."""
    f = torch.zeros(8, size, size)
    f[1] = 1
    f[1, top : top + obj, left : left + obj] = 0
    f[0, top : top + obj, left : left + obj] = 1
    return F.normalize(f + 0.01 * torch.rand(8, size, size, generator=torch.Generator().manual_seed(0)), dim=0)


def test_match_prompts_find_a_moved_object_and_report_an_absent_one():
    ref = _features_with_object(32, 2, 2)
    tgt = _features_with_object(32, 20, 18)  # the object moved
    masks = torch.zeros(2, 64, 64)
    masks[0, 4:20, 4:20] = 1  # class 1: the object (grid cells 2..9 at 2 px per cell)
    prompts = match_prompts(ref, masks, tgt, (64, 64), num_points=4)
    assert prompts.valid.tolist() == [True, False]  # class 2 has an empty reference mask: not found, no prompt
    pos = prompts.points[0][prompts.point_labels[0] == 1]
    neg = prompts.points[0][prompts.point_labels[0] == 0]
    assert len(pos) >= 1 and len(neg) >= 1
    assert ((pos >= torch.tensor([36.0, 40.0])) & (pos <= torch.tensor([52.0, 56.0]))).all()  # inside the object
    inside = (neg >= torch.tensor([36.0, 40.0])) & (neg <= torch.tensor([52.0, 56.0]))
    assert not inside.all(1).any()
    x0, y0, x1, y1 = prompts.boxes[0].tolist()
    assert 34 <= x0 <= 38 and 38 <= y0 <= 42 and 50 <= x1 <= 54 and 54 <= y1 <= 58
