"""The search source: SAM on a grid of boxes, each class served by the candidate most like the reference's structure."""

import os

import numpy as np
import torch
from monai.bundle import ConfigParser

from bundle.candidates import appearance, box_grid, candidate_scores
from bundle.decoder import SamDecoder
from bundle.sources import Cohort, SearchSource, load_source, save_source
from bundle.store import EmbeddingStore, Reference
from tests.conftest import disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_box_grid_covers_the_image_at_every_side():
    boxes = box_grid((100, 200), sides=(0.25, 0.5, 1.0), overlap=1.0)
    assert len(boxes) == 4 * 4 + 2 * 2 + 1
    assert boxes[-1].tolist() == [0, 0, 200, 100]
    assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= 200
    assert boxes[:, [1, 3]].min() >= 0 and boxes[:, [1, 3]].max() <= 100
    widths = np.unique(np.round(boxes[:, 2] - boxes[:, 0]))
    assert set(widths.tolist()) == {50.0, 100.0, 200.0}
    # every pixel lies in a box of the smallest side
    small = boxes[:16]
    assert small[:, 0].min() == 0 and small[:, 2].max() == 200 and small[:, 1].min() == 0 and small[:, 3].max() == 100


def test_candidate_scores_prefer_the_structure_and_only_weakly_its_size():
    inside, outside = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    pooled = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.9, 0.1, 0.0]])
    background = np.tile(outside, (3, 1))
    assert appearance(pooled, inside, outside)[0] > 0 > appearance(pooled, inside, outside)[1]
    # the structure at four times the reference's area beats the background at the reference's area
    scores = candidate_scores(pooled, background, np.full(3, 0.8), np.array([0.4, 0.1, 0.1]), inside, outside, 0.1)
    assert scores[0] > scores[1]
    assert scores[2] > scores[0]  # same look, the reference's size wins the tie
    # a part of a larger structure (its surroundings look like the structure too) loses to the whole
    ring = np.stack([outside, inside])
    scores = candidate_scores(pooled[[0, 0]], ring, np.full(2, 0.8), np.array([0.1, 0.1]), inside, outside, 0.1)
    assert scores[0] > scores[1]
    # with a weight, SAM's confidence counts
    two = pooled[[0, 0]]
    scores = candidate_scores(two, background[:2], np.array([0.5, 0.9]), np.full(2, 0.1), inside, outside, 0.1, 0.25)
    assert scores[1] > scores[0]
    # several views of the reference: the one a candidate resembles most counts
    views_in, views_out = np.stack([inside, np.array([0.0, 0.0, 1.0])]), np.stack([outside, outside])
    assert appearance(np.array([[0.0, 0.1, 0.9]]), views_in, views_out)[0] > 0.5


def _cohort(size=(128, 160)):
    rng = np.random.default_rng(1)

    def case(centre, radius):
        label = disk(size, centre, radius).astype(np.int64) if radius else np.zeros(size, np.int64)
        image = 40 + 10 * rng.standard_normal(size) + label * (150 + 20 * np.sin(np.arange(size[1]) / 2.0))
        return image.astype(np.float32), label

    ref = case((40, 45), 16)
    sizes = [((80, 100), 32), ((90, 40), 8), ((40, 120), 30), ((85, 110), 9), ((60, 80), 0)]
    return ref, [(f"t{i}", case(c, r)) for i, (c, r) in enumerate(sizes)]


def test_search_finds_a_structure_elsewhere_at_twice_or_half_the_size_and_reports_an_absent_one(lite_medsam):
    (ref_image, ref_label), targets = _cohort()
    store = EmbeddingStore(lite_medsam)
    source = SearchSource(SamDecoder(lite_medsam))
    state = source.fit(Reference(ref_image, ref_label, 1), Cohort([(k, i) for k, (i, _) in targets], store))
    preds = [source.predict(state, k, img, store) for k, (img, _) in targets]
    for (key, (_, truth)), pred in zip(targets[:4], preds[:4]):
        assert pred.found[0], key
        assert _dice(pred.label() == 1, truth == 1) > 0.8, key
    assert not preds[4].found[0] and not (preds[4].label() == 1).any()


def test_search_state_round_trips_through_the_saved_model(lite_medsam):
    (ref_image, ref_label), targets = _cohort()
    store = EmbeddingStore(lite_medsam)
    reference = Reference(ref_image, ref_label, 1)
    source = SearchSource(SamDecoder(lite_medsam), sides=(0.3, 0.6), size_weight=0.2)
    state = source.fit(reference, Cohort([], store))
    saved = save_source(source, state)
    loaded, loaded_state = load_source(saved, reference, store)
    assert isinstance(loaded, SearchSource) and loaded.sides == (0.3, 0.6) and loaded.size_weight == 0.2
    key, (image, _) = targets[0]
    a, b = source.predict(state, key, image, store), loaded.predict(loaded_state, key, image, store)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.found, b.found)
    # boxes decoded a few at a time (less memory) give the same masks
    small = SearchSource(SamDecoder(lite_medsam), sides=(0.3, 0.6), size_weight=0.2, chunk=5)
    assert torch.equal(small.predict(state, key, image, store).logits, a.logits)


def test_the_bundle_config_composes_the_search_strategy(lite_medsam):
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update({"bundle_root": ROOT, "strategy": "search"})
    parser["sam"] = lite_medsam
    source = parser.get_parsed_content("source")
    assert isinstance(source, SearchSource) and source.decoder.sam is lite_medsam
    assert source.prescreen == 64 and source.region_boxes and source.views
