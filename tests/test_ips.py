"""Pattern shifting (ProMISe's IPS) on the frozen LiteMedSAM: exact when zero, SAM untouched, learns, saved."""

import numpy as np
import pytest
import torch

from bundle.classifier import reference_views
from bundle.decoder import SamDecoder
from bundle.ips import PatternShift, fit_shift, shifted
from bundle.model import OneShotModel
from bundle.prompts import PromptGenerator
from bundle.sources import Cohort, PerSamSource, ShiftedSource
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import one_hot
from tests.conftest import disk, sam_hash

SIZE = (120, 150)


def _scene(centre: tuple[int, int], radius: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on noise whose label reaches 6 px beyond it: SAM alone outlines the disc, not the label."""
    rng = np.random.default_rng(seed)
    image = 0.2 + 0.05 * rng.standard_normal(SIZE)
    image[disk(SIZE, centre, radius)] = 0.8
    return image.astype(np.float32), disk(SIZE, centre, radius + 6).astype(np.int64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_a_zero_shift_reproduces_sams_logits_exactly(lite_medsam):
    image, label = _scene((60, 70), 20, 0)
    embedding = lite_medsam.encode(image)
    box = torch.tensor([[40.0, 30.0, 105.0, 95.0]])
    plain, plain_iou = lite_medsam.predict(embedding, boxes=box, multimask=True)
    zero = PatternShift()  # untrained: its last layer is zero
    out, iou = lite_medsam.predict(shifted(embedding, zero), boxes=box, multimask=True)
    assert torch.equal(out, plain) and torch.equal(iou, plain_iou)
    moved = torch.full((4, 256), 0.5)
    other, _ = lite_medsam.predict(
        type(embedding)(embedding.features, embedding.original_size, embedding.input_size, moved), boxes=box
    )
    assert not torch.equal(other, plain[:, :1])  # the shift does reach the decoder


def test_fitting_the_shift_improves_dice_on_new_images_and_leaves_sam_bit_identical(lite_medsam):
    image, label = _scene((60, 75), 22, 0)
    views = [(lite_medsam.encode(img), lab) for img, lab in [(image, label), *reference_views(image, label)]]
    tests = [_scene((50, 85), 18, 1), _scene((66, 64), 26, 2)]
    prompter = PromptGenerator()

    def dices(shift):
        out = []
        for img, lab in tests:
            e = shifted(lite_medsam.encode(img), shift)
            prompts = prompter(lite_medsam, e, one_hot(torch.from_numpy(lab), 1)[1:].float())
            for kwargs in ({"boxes": prompts.boxes}, prompts.rows(prompts.valid)):
                logits, _ = lite_medsam.predict(e, **kwargs)
                out.append(_dice(logits[0, 0].numpy() > 0, lab.astype(bool)))
        return np.array(out)

    before_hash = sam_hash(lite_medsam)
    before = dices(None)
    shift, log = fit_shift(PatternShift(), lite_medsam, prompter, views, 1, steps=20)
    after = dices(shift)
    assert sam_hash(lite_medsam) == before_hash
    assert all(not p.requires_grad for p in lite_medsam.model.parameters())
    assert log["steps"] == 20
    assert after.mean() > before.mean() + 0.02, (before, after)


@pytest.fixture(scope="module")
def shifted_model(lite_medsam, tmp_path_factory):
    image, label = _scene((60, 75), 22, 0)
    targets = [(f"t{i}", _scene(c, r, i + 1)[0]) for i, (c, r) in enumerate((((50, 85), 18), ((66, 64), 26)))]
    store = EmbeddingStore(lite_medsam)
    decoder = SamDecoder(lite_medsam)
    source = ShiftedSource(PerSamSource(decoder), decoder, steps=4)
    model = OneShotModel.fit(source, [(Reference(image, label, 1), [0])], Cohort(targets, store), [1], ["disc"])
    path = model.save(str(tmp_path_factory.mktemp("ips") / "model.pt"))
    return model, path, targets, store


def test_a_shifted_source_round_trips_through_the_adapted_model(shifted_model, lite_medsam):
    model, path, targets, store = shifted_model
    loaded = OneShotModel.load(path, EmbeddingStore(lite_medsam))
    source = loaded.groups[0].source
    assert isinstance(source, ShiftedSource) and source.source.kind == "persam"
    fitted_shift, loaded_shift = model.groups[0].state["shift"], loaded.groups[0].state["shift"]
    assert any(p.abs().sum() > 0 for p in fitted_shift.mlp[-1].parameters())  # it did learn something
    for a, b in zip(fitted_shift.state_dict().values(), loaded_shift.state_dict().values()):
        assert torch.equal(a, b)
    for key, img in targets:
        want = model.predict(key, img, store)
        got = loaded.predict(key, img, EmbeddingStore(lite_medsam))
        assert torch.allclose(got.logits, want.logits, atol=1e-4)
        plain = model.groups[0].source.source.predict(model.groups[0].state["inner"], key, img, store)
        assert not torch.allclose(plain.logits, want.logits, atol=1e-4)  # the shift is applied when predicting


@pytest.mark.parametrize("in_fitting", [True, False])
def test_the_shift_reaches_the_sources_fitting_only_when_asked(lite_medsam, in_fitting):
    image, label = _scene((60, 75), 22, 0)
    targets = [("t0", _scene((50, 85), 18, 1)[0])]
    seen = []

    class Probe(PerSamSource):
        def fit(self, reference, cohort, classes=None):
            seen.append(cohort.store.embedding(*cohort.items[0]).token_shift)  # what the source's own decodes get
            return super().fit(reference, cohort, classes)

    decoder = SamDecoder(lite_medsam)
    source = ShiftedSource(Probe(decoder), decoder, steps=4, in_fitting=in_fitting)
    store = EmbeddingStore(lite_medsam)
    state = source.fit(Reference(image, label, 1), Cohort(targets, store))
    assert (seen[0] is not None) == in_fitting
    shifted_pred = source.predict(state, "t0", targets[0][1], store)
    plain = source.source.predict(state["inner"], "t0", targets[0][1], store)
    assert not torch.allclose(shifted_pred.logits, plain.logits, atol=1e-4)  # predicting is shifted either way


def test_a_view_weighted_zero_is_left_out_and_unit_weights_change_nothing(lite_medsam):
    image, label = _scene((60, 75), 22, 0)
    views = [(lite_medsam.encode(img), lab) for img, lab in [(image, label), *reference_views(image, label)][:3]]
    wrong = (lite_medsam.encode(_scene((40, 40), 15, 5)[0]), np.roll(label, 30, axis=1))
    prompter = PromptGenerator()

    def fitted(views, weights=None):
        shift, _ = fit_shift(PatternShift(hidden=64), lite_medsam, prompter, views, 1, steps=6, weights=weights)
        return torch.cat([p.detach().flatten() for p in shift.parameters()])

    torch.manual_seed(0)
    plain = fitted(views)
    torch.manual_seed(0)
    assert torch.equal(fitted(views, [[1.0]] * 3), plain)
    torch.manual_seed(0)
    assert torch.equal(fitted(views + [wrong], [[1.0]] * 3 + [[0.0]]), plain)  # weight 0: never drawn
    torch.manual_seed(0)
    assert not torch.equal(fitted(views + [wrong], [[1.0]] * 3 + [[0.7]]), plain)


def test_the_shift_trains_on_the_cohorts_own_masks_when_asked(lite_medsam):
    image, label = _scene((60, 75), 22, 0)
    targets = [(f"t{i}", _scene(c, r, i + 1)[0]) for i, (c, r) in enumerate((((50, 85), 18), ((66, 64), 26)))]
    decoder, store = SamDecoder(lite_medsam), EmbeddingStore(lite_medsam)
    reference = Reference(image, label, 1)
    states = {}
    for pseudo in (0, 2):
        torch.manual_seed(0)
        source = ShiftedSource(PerSamSource(decoder), decoder, steps=4, pseudo=pseudo)
        states[pseudo] = source.fit(reference, Cohort(targets, store))
    first, more = states[0]["shift"].state_dict(), states[2]["shift"].state_dict()
    assert any(not torch.equal(first[k], more[k]) for k in first)  # trained further on the cohort's masks
    key, img = targets[0]
    a = source.predict(states[0], key, img, store)
    b = source.predict(states[2], key, img, store)
    assert a.found.all() and b.found.all()
    assert not torch.allclose(a.logits, b.logits, atol=1e-4)
