"""The reference's class layout (separate parts, enclosed classes) and the per-part SAM prompts, on synthetic images."""

import numpy as np
import torch

from bundle.decoder import SamDecoder
from bundle.layout import FillBackgroundHoles, Layout, enclosing_share, keep_parts
from bundle.prediction import Prediction
from bundle.store import EmbeddingStore
from tests.conftest import disk


def _two_lungs(size=(96, 128)):
    label = np.zeros(size, np.int64)
    label[15:80, 15:55] = 1
    label[15:80, 70:115] = 1
    return label


def _ring(size=(96, 96)):
    """Class 2 (wall) around class 1 (cavity), class 3 beside them."""
    label = np.zeros(size, np.int64)
    label[disk(size, (45, 40), 22)] = 2
    label[disk(size, (45, 40), 14)] = 1
    label[disk(size, (45, 80), 8)] = 3
    return label


def test_layout_counts_parts_and_finds_the_enclosing_class():
    assert Layout.of(_two_lungs(), 1).parts == [2]
    layout = Layout.of(_ring(), 3)
    assert layout.parts == [1, 1, 1]
    assert layout.surrounds == [[], [0], []]  # the wall surrounds the cavity, nothing surrounds the side class
    share = enclosing_share(_ring(), 1, 3)
    assert share[1] > 0.9 and share[2] == 0
    assert enclosing_share(_ring(), 3, 3).max() < 0.5  # a neighbour on one side does not enclose


def test_keep_parts_keeps_as_many_parts_as_the_reference():
    label = _two_lungs()
    label[85:88, 60:63] = 1  # a speck
    kept = keep_parts(label, [2], 0.1)
    assert (kept == 1).sum() == (_two_lungs() == 1).sum()  # both lungs, not the speck
    one = keep_parts(label, [1], 0.1)
    assert (one == 1).sum() == 45 * 65  # only the largest lung


def test_nest_keeps_the_inner_class_out_of_a_filled_wall():
    truth = _ring()
    logits = torch.full((3, *truth.shape), -5.0)
    logits[1][disk(truth.shape, (45, 40), 22)] = 9.0  # SAM filled the wall into a disc, more confident than the cavity
    logits[0][truth == 1] = 3.0
    logits[2][truth == 3] = 3.0
    assert (Prediction(logits, torch.ones(3)).label() == 1).sum() == 0  # without the layout, the cavity is swallowed
    nested = Layout.of(truth, 3).nest(logits)
    assert np.array_equal(Prediction(nested, torch.ones(3)).label(), truth)


def test_fill_background_holes_never_overwrites_an_enclosed_class():
    label = _ring()
    label[45, 58] = 0  # a background hole inside the wall
    filled = FillBackgroundHoles()(torch.from_numpy(label)[None])[0].numpy()
    assert filled[45, 58] == 2 and np.array_equal(filled, _ring())


def test_decoder_prompts_each_part_of_a_two_part_class(lite_medsam):
    size = (128, 160)
    label = np.zeros(size, np.int64)
    label[disk(size, (64, 40), 22)] = 1
    label[disk(size, (64, 120), 22)] = 1
    image = np.where(label > 0, 200.0, 30.0).astype(np.float32)
    image[:, 60:100] = 110.0  # a bright band between the parts that one box over both would take in
    store = EmbeddingStore(lite_medsam)
    embedding = store.embedding("two", image)
    probs = torch.from_numpy(label == 1).float()[None]
    split = SamDecoder(lite_medsam, part_share=0.2)
    rows, owner = split.split(probs)
    assert owner == [0, 0] and (rows.sum(0) == probs[0]).all()
    parts = split.segment(embedding, probs).label() == 1
    whole = SamDecoder(lite_medsam, part_share=0.0).segment(embedding, probs).label() == 1
    dice = lambda a: 2 * (a & (label == 1)).sum() / (a.sum() + (label == 1).sum())  # noqa: E731
    assert dice(parts) > 0.9 and not parts[:, 70:90].any()  # both parts, nothing of the band between them
    assert dice(parts) > dice(whole)
