"""The choice source: per image and class, the primary source's mask or the search's, whichever the search's scorer
rates clearly higher."""

import os
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from bundle.decoder import SamDecoder
from bundle.layout import on_other_classes
from bundle.prediction import Prediction, own_places
from bundle.sources import ChoiceSource, Cohort, FusedSource, SearchSource, Source, load_source, save_source
from bundle.sources.base import register
from bundle.sources.choice import sample_positions
from bundle.store import EmbeddingStore, Reference
from tests.conftest import disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (128, 160)


@register("fixed_atlas")
class FixedAtlas(Source):
    """The reference's label where the reference has it (an identity registration): right only where the structure
    did not move."""

    kind = "fixed_atlas"

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(reference.label.copy())

    def predict(self, state: torch.Tensor, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        logits = torch.where(state == 1, 10.0, -10.0)[None].float()
        return Prediction(logits, torch.ones(1))

    def state_dict(self, state: torch.Tensor) -> dict[str, Any]:
        return {"label": state.clone()}

    @classmethod
    def from_state(cls, state, reference, store, device):
        return cls(), state["label"]


def _case(rng, centre, radius):
    label = disk(SIZE, centre, radius).astype(np.int64)
    image = 40 + 10 * rng.standard_normal(SIZE) + label * (150 + 20 * np.sin(np.arange(SIZE[1]) / 2.0))
    return image.astype(np.float32), label


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_the_search_replaces_the_primary_only_where_it_lost_the_structure(lite_medsam):
    rng = np.random.default_rng(3)
    ref_image, ref_label = _case(rng, (40, 45), 16)
    # the structure where the reference has it (the atlas is right), then moved and twice / half the size
    targets = [(f"t{i}", _case(rng, c, r)) for i, (c, r) in enumerate([((41, 46), 16), ((85, 105), 30), ((90, 40), 8)])]
    store = EmbeddingStore(lite_medsam)
    reference = Reference(ref_image, ref_label, 1)
    source = ChoiceSource(FixedAtlas(), SearchSource(SamDecoder(lite_medsam)), margin=0.1)
    state = source.fit(reference, Cohort([(k, i) for k, (i, _) in targets], store))
    preds = {k: source.predict(state, k, image, store) for k, (image, _) in targets}
    assert preds["t0"].sources is None  # kept: the atlas's own mask, untouched
    assert torch.equal(preds["t0"].logits, torch.where(torch.from_numpy(ref_label) == 1, 10.0, -10.0)[None])
    for key, (_, truth) in targets[1:]:
        assert preds[key].sources == ["search"], key
        assert _dice(preds[key].label() == 1, truth == 1) > 0.8, key
        assert _dice(preds[key].label() == 1, ref_label == 1) < 0.2, key

    # the scorer itself: the true disc rates above the reference's (empty) place, an empty mask is not rated, and a
    # mask outside the candidates' area limits is still rated (a primary's mask of a lesion that fills the view must
    # not lose to any search mask by default)
    image, truth = targets[1][1]
    feats = store.features("t1", image).float()
    masks = np.stack([truth == 1, ref_label == 1, np.zeros(SIZE, bool), np.ones(SIZE, bool)])[:, None]
    rated = [source.search.rate(state.search, m, torch.ones(1), feats)[0] for m in masks]
    assert rated[0] > rated[1] + 0.1 and rated[2] == -np.inf
    assert np.isfinite(rated[3]) and source.search.max_area < 1.0 and rated[3] < rated[0]

    # the fitted state round-trips with the same masks
    loaded, loaded_state = load_source(save_source(source, state), reference, store)
    assert isinstance(loaded, ChoiceSource) and loaded.margin == 0.1
    again = loaded.predict(loaded_state, "t2", targets[2][1][0], store)
    assert torch.equal(again.logits, preds["t2"].logits)


def test_the_default_config_is_the_gated_choice(lite_medsam):
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    parser.update({"bundle_root": ROOT})
    parser["sam"] = lite_medsam
    assert parser["strategy"] == "choice"
    source = parser.get_parsed_content("source")
    assert isinstance(source, ChoiceSource) and isinstance(source.primary, FusedSource)
    assert isinstance(source.search, SearchSource) and source.search.decoder.sam is lite_medsam
    # the default: per image only where the search won by more than the scorer's errors (0.15) on a tenth of a sample of
    # 16 images, and two at least (docs/benchmarks.md)
    assert (source.margin, source.gate, source.gate_margin, source.sample) == (0.05, 0.1, 0.15, 16)


def test_a_search_mask_on_another_classs_place_does_not_replace_its_class():
    left, right, elsewhere = disk(SIZE, (60, 40), 15), disk(SIZE, (60, 120), 15), disk(SIZE, (20, 80), 10)
    kept = np.stack([left, right])  # the primary's two classes, e.g. right and left lung
    # class 0's candidate lies on class 1's structure (they look alike); class 1's candidate is its own
    assert on_other_classes(np.stack([right, right]), kept).tolist() == [True, False]
    assert on_other_classes(np.stack([elsewhere, left | right]), kept).tolist() == [False, False]
    assert on_other_classes(np.stack([left & ~left, right]), kept).tolist() == [False, False]  # empty candidate
    assert on_other_classes(np.stack([right]), np.stack([left])).tolist() == [False]  # one class: nothing else to take
    # the switch both sources use: class 0's incoming mask on class 1's place is not taken, class 1's own is
    incoming = Prediction(torch.where(torch.from_numpy(np.stack([right, right])), 5.0, -5.0), torch.ones(2))
    kept_pred = Prediction(torch.where(torch.from_numpy(kept), 5.0, -5.0), torch.ones(2))
    assert own_places(torch.tensor([True, True]), incoming, kept_pred).tolist() == [False, True]
    assert own_places(torch.tensor([False, True]), incoming, kept_pred).tolist() == [False, True]


def test_with_a_gate_only_a_cohort_where_the_search_often_wins_clearly_is_chosen_per_image(lite_medsam):
    rng = np.random.default_rng(5)
    ref_image, ref_label = _case(rng, (40, 45), 16)
    reference = Reference(ref_image, ref_label, 1)
    store = EmbeddingStore(lite_medsam)
    # the structure stays where the reference has it: the search never clearly beats the atlas, which serves every image
    still = [(f"s{i}", _case(rng, c, r)) for i, (c, r) in enumerate([((41, 46), 16), ((39, 44), 16), ((42, 45), 15)])]
    # ... moves and is twice or half the size in most images: the search wins those clearly, and its masks are taken
    moved = [(f"m{i}", _case(rng, c, r)) for i, (c, r) in enumerate([((41, 46), 16), ((85, 105), 30), ((90, 40), 8)])]
    # a sample of two: the still cohort shows no win in it and is decided; the moved one shows one, within one of the
    # bar (two), so the third image is measured too before deciding
    source = ChoiceSource(FixedAtlas(), SearchSource(SamDecoder(lite_medsam)), margin=0.05, gate=0.25, sample=2)
    for targets, per_image, share in ((still, False, 0.0), (moved, True, 2 / 3)):
        state = source.fit(reference, Cohort([(k, i) for k, (i, _) in targets], store))
        assert state.open.tolist() == [per_image] and state.wins == [round(share, 3)], state.wins
        assert state.sampled == (3 if per_image else 2)
        # the sample's predictions serve the cohort run: the primary's always, the search's only where chosen per image
        assert len(state.compared) == state.sampled
        assert all((other is not None) == per_image for _, other, _ in state.compared.values())
        preds = {k: source.predict(state, k, image, store) for k, (image, _) in targets}
        switched = [k for k, p in preds.items() if p.sources == ["search"]]
        assert switched == (["m1", "m2"] if per_image else []), switched
        for key, (_, truth) in targets:
            assert _dice(preds[key].label() == 1, truth == 1) > 0.8, key
    loaded, loaded_state = load_source(save_source(source, state), reference, store)
    assert loaded.gate == 0.25 and loaded_state.open.tolist() == [True] and loaded_state.wins == state.wins
    assert loaded_state.sampled == 3
    # the cohort run reused the gate's predictions of its sample; the saved model, without them, gives the same masks
    assert set(state.compared) == {"m0", "m1", "m2"} and not loaded_state.compared
    for key, (image, _) in moved:
        assert torch.equal(loaded.predict(loaded_state, key, image, store).logits, preds[key].logits), key
    # one clear win is not enough, however small the cohort: a single scorer error must not open the gate; the primary's
    # kept predictions of the closed gate's sample are the ones it would make again
    few = source.fit(reference, Cohort([(k, i) for k, (i, _) in moved[:2]], store))
    assert few.wins == [0.5] and few.open.tolist() == [False] and set(few.compared) == {"m0", "m1"}
    for key, (image, _) in moved[:2]:
        kept = source.predict(few, key, image, store)
        assert kept is few.compared[key][0]  # not decoded again
        assert torch.equal(kept.logits, source.primary.predict(few.primary, key, image, store).logits), key


def test_the_gates_samples_spread_over_the_whole_cohort_and_the_second_lies_between_the_first():
    first, second = sample_positions(40, 16)
    assert len(first) == 16 and first[0] == 0 and first[-1] >= 36  # not only the cohort's first 32 images
    assert len(second) == 16 and not set(first) & set(second) and max(second) < 40
    assert all(a < b < c for a, b, c in zip(first, second, first[1:]))  # halfway between neighbours
    assert sample_positions(80, 16)[0] == list(range(0, 80, 5))
    assert sample_positions(12, 16) == (list(range(12)), [])  # a small cohort is measured whole, once
    first, second = sample_positions(20, 16)
    assert sorted(first + second) == list(range(20))
