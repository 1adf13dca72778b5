"""Sources on synthetic cohorts: each fits on a reference and a cohort and predicts one image at a time."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.alignment import gradient_magnitude
from bundle.classifier import PatchClassifier
from bundle.decoder import SamDecoder
from bundle.engine import WarpTrainer
from bundle.losses import WarpingLoss
from bundle.networks import WarpNet
from bundle.prediction import Prediction, combine
from bundle.prompts import PromptGenerator
from bundle.sources import (
    AlignedSource,
    ClassifierSource,
    Cohort,
    FusedSource,
    MatchSource,
    PerSamSource,
    WarpSource,
    fused,
)
from bundle.sources.aligned import aligned_score, best_candidate
from bundle.sources.warp import WarpState, registered
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import one_hot, reference_augmentation
from tests.conftest import disk


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _cohort(size=(72, 96)):
    def case(shift):
        label = np.zeros(size, np.int64)
        label[disk(size, (30 + shift, 30 + shift), 12)] = 1
        label[disk(size, (36 + shift, 66 + shift), 10)] = 2
        image = np.where(label > 0, 180.0, 40.0) + np.where(label == 2, 50.0, 0.0)
        return image.astype(np.float32), label

    ref_image, ref_label = case(0)
    targets = [(f"t{i}", case(s)) for i, s in enumerate((2, 4, 5))]
    return ref_image, ref_label, targets


def _moving_cohort(size=(96, 128)):
    """A bright textured disk that moves and changes size from image to image (where warping struggles)."""
    rng = np.random.default_rng(0)

    def case(centre, radius):
        label = disk(size, centre, radius).astype(np.int64)
        image = 40 + 10 * rng.standard_normal(size) + label * (150 + 20 * np.sin(np.arange(size[1]) / 2.0))
        return image.astype(np.float32), label

    ref_image, ref_label = case((30, 35), 14)
    targets = [(f"t{i}", case(c, r)) for i, (c, r) in enumerate([((65, 95), 18), ((40, 90), 10), ((62, 30), 16)])]
    return ref_image, ref_label, targets


def _trainer(**kwargs):
    return WarpTrainer(WarpNet(), WarpingLoss(), reference_augmentation(64), progress=False, **kwargs)


def _setup(sam, ref_image, ref_label, targets, num_classes):
    store = EmbeddingStore(sam)
    return Reference(ref_image, ref_label, num_classes), Cohort([(k, img) for k, (img, _) in targets], store), store


def test_every_image_is_encoded_once_across_rounds(lite_medsam, monkeypatch):
    ref_image, ref_label, targets = _cohort()
    calls = []
    original = lite_medsam.encode
    monkeypatch.setattr(lite_medsam, "encode", lambda image: calls.append(image.shape) or original(image))
    trainer = _trainer(batch_size=3, min_iterations=5)
    source = WarpSource(trainer, SamDecoder(lite_medsam, PromptGenerator(num_points=2), refine=1), 64, rounds=1)
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 2)
    state = source.fit(reference, cohort)
    preds = [source.predict(state, k, img, store) for k, (img, _) in targets]
    assert len(calls) == 1 + len(targets)  # reference (for prototypes) + each target, once for all rounds
    assert trainer.round == 2
    for (_, (_, truth)), pred in zip(targets, preds):
        label = pred.label()
        assert label.shape == truth.shape and set(np.unique(label)) <= {0, 1, 2}
        for c in (1, 2):
            assert _dice(label == c, truth == c) > 0.4, c  # found in the right place (points + refinement on)


def test_registration_needs_no_sam_encoding(lite_medsam, monkeypatch):
    ref_image, ref_label, targets = _cohort()
    monkeypatch.setattr(lite_medsam, "encode", lambda image: pytest.fail("SAM must not run"))
    source = WarpSource(_trainer(min_iterations=3), None, 64)
    assert source.kind == "registration"
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 2)
    state = source.fit(reference, cohort)
    assert [source.predict(state, k, img, store).label().shape for k, (img, _) in targets] == [(72, 96)] * 3


@pytest.mark.parametrize("kind", ["match", "persam"])
def test_feature_sources_find_a_moving_object(lite_medsam, kind):
    ref_image, ref_label, targets = _moving_cohort()
    decoder = SamDecoder(lite_medsam)
    source = MatchSource(decoder) if kind == "match" else PerSamSource(decoder)
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 1)
    state = source.fit(reference, cohort)
    for key, (image, truth) in targets:
        pred = source.predict(state, key, image, store)
        assert pred.found.tolist() == [True]
        points, labels = pred.prompts.points[0].round().long(), pred.prompts.point_labels[0]
        pos, neg = points[labels == 1], points[labels == 0]
        assert len(pos) >= 1 and len(neg) >= 1
        assert truth[pos[:, 1], pos[:, 0]].all()  # (x, y) points land inside the moved object...
        assert not truth[neg[:, 1], neg[:, 0]].any()  # ...and negatives outside it
        assert pred.label().shape == truth.shape and (pred.label() == 1).any()


def test_match_reports_a_class_without_reference_pixels_as_not_found(lite_medsam):
    ref_image, ref_label, targets = _moving_cohort()
    source = MatchSource(SamDecoder(lite_medsam))
    # class 2 is declared but has no reference pixel: no positive match can exist for it
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 2)
    state = source.fit(reference, cohort)
    for key, (image, _) in targets:
        pred = source.predict(state, key, image, store)
        assert pred.found.tolist() == [True, False]
        assert not (pred.label() == 2).any()


def _fused(sam, **kwargs):
    trainer = _trainer(batch_size=3, min_iterations=10)
    decoder = SamDecoder(sam)
    locator = ClassifierSource(decoder, PatchClassifier(iterations=100), self_training=1)
    aligned = AlignedSource(locator, trainer, decoder, 64)
    return FusedSource(WarpSource(trainer, decoder, 64), locator, aligned, **kwargs)


def test_fused_aligns_by_the_classifier_where_the_object_moves(lite_medsam):
    ref_image, ref_label, targets = _moving_cohort()
    source = _fused(lite_medsam)
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 1)
    state = source.fit(reference, cohort)
    assert [d.source for d in state.decisions] == ["aligned"], state.decisions
    assert state.fallback is not None and state.fallback.warp is not None
    # the aligned network is its own copy: it differs from the plain warp's network
    plain, aligned = state.primary.network.state_dict(), state.fallback.warp.network.state_dict()
    assert any(not torch.equal(plain[k], aligned[k]) for k in plain)
    preds = [source.predict(state, k, img, store) for k, (img, _) in targets]
    assert np.mean([_dice(p.label() == 1, t == 1) for (_, (_, t)), p in zip(targets, preds)]) > 0.8


def test_a_wider_guess_replaces_the_located_frames_best_only_by_more_than_the_margin():
    # candidates: two of the located region's own sizes, then three much smaller or larger guesses
    assert best_candidate([0.8, 0.9, 0.95, 0.3, 0.2], narrow=2, margin=0.08) == 1  # 0.05 higher: not enough
    assert best_candidate([0.8, 0.9, 0.3, 1.0, 0.2], narrow=2, margin=0.08) == 3  # 0.1 higher: the wider guess
    assert best_candidate([0.8, 0.9, 0.3, 1.0, 0.2], narrow=2, margin=0.0) == 3
    assert best_candidate([0.9, 0.9], narrow=2, margin=0.08) == 0  # no wider guesses; ties keep the first
    assert best_candidate([0.2, 0.9, 5.0], narrow=3, margin=0.08) == 2


def test_the_default_config_guesses_smaller_frames_than_the_located_region(lite_medsam):
    config = ConfigParser()
    config.read_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "inference.yaml"))
    config.update({"bundle_root": os.path.dirname(os.path.dirname(__file__))})
    config["sam"] = lite_medsam
    source = config.get_parsed_content("aligned_source")
    assert source.scales[0] == 1.0  # fitting aligns each image by the first guess: the region's own frame
    # larger guesses lost Kvasir's polyps to wrong, larger masks the score preferred
    assert min(source.wide_scales) <= 0.7 and max(source.wide_scales) < 1.0 and source.wide_margin > 0


@pytest.mark.parametrize("strategy, ips", [("warp", False), ("classifier", True), ("aligned", False)])
def test_the_config_picks_the_strategys_source_and_names_the_choices_for_an_unknown_one(lite_medsam, strategy, ips):
    config = ConfigParser()
    config.read_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "inference.yaml"))
    config.update({"bundle_root": os.path.dirname(os.path.dirname(__file__)), "strategy": strategy, "ips": ips})
    config["sam"] = lite_medsam
    if strategy == "aligned":  # the fused source's fallback, fitted on the classes the warp lost: not a strategy
        with pytest.raises(RuntimeError) as error:
            config.get_parsed_content("source")
        assert isinstance(error.value.__cause__, ValueError)
        assert "unknown strategy 'aligned'" in str(error.value.__cause__)
        assert "choice, classifier, fused, match, persam, promise, registration, search, warp" in str(
            error.value.__cause__
        )
        return
    source = config.get_parsed_content("source")
    expected = {"warp": WarpSource, "classifier": ClassifierSource}[strategy]
    assert isinstance(source.source if ips else source, expected)
    assert type(source).__name__ == ("ShiftedSource" if ips else expected.__name__)


def test_fused_decides_per_class_by_cohort_agreement(lite_medsam):
    def pred(masks):
        return Prediction(torch.where(torch.from_numpy(np.stack(masks)), 5.0, -5.0), torch.ones(len(masks)))

    a, b, far = disk((40, 40), (12, 12), 6), disk((40, 40), (13, 12), 6), disk((40, 40), (30, 30), 6)
    warped = [pred([a, a]), pred([a, a])]
    located = [pred([b, far]), pred([b, far])]  # class 1 agrees with the warp, class 2 does not
    agreement = torch.tensor([[_dice(a, b) for a, b in zip(w.masks(), m.masks())] for w, m in zip(warped, located)])
    decisions = _fused(lite_medsam).decide(agreement, None)
    assert [d.source for d in decisions] == ["warp", "aligned"]
    assert decisions[0].agreement > 0.73 > decisions[1].agreement
    use = torch.tensor([d.source == "warp" for d in decisions])
    for w, m in zip(warped, located):
        fused = combine(use, w, m)
        assert _dice(fused.label() == 1, a) == 1.0 and _dice(fused.label() == 2, far) == 1.0
    # the warp's own similarity keeps it even where the classifier disagrees
    kept = _fused(lite_medsam).decide(agreement, torch.tensor([[0.9, 0.9], [0.9, 0.9]]))
    assert [d.source for d in kept] == ["warp", "warp"]


def _mask_pred(masks, iou):
    return Prediction(torch.where(torch.from_numpy(np.stack(masks)), 5.0, -5.0), torch.tensor(iou))


def test_aligned_score_prefers_a_compact_confident_mask_over_a_leaked_one():
    size = (80, 100)
    head = disk(size, (30, 40), 15)
    leaked = head.copy()
    leaked[44:70, 10:90] = True  # the mask ran into the neighbouring tissue
    both = torch.tensor([True, True])
    # same SAM confidence: the leak loses; much lower confidence outweighs compactness
    assert aligned_score(_mask_pred([head, head], [0.9, 0.9]), both) > aligned_score(
        _mask_pred([leaked, head], [0.9, 0.9]), both
    )
    assert aligned_score(_mask_pred([head, head], [0.3, 0.3]), both) < aligned_score(
        _mask_pred([leaked, leaked], [0.95, 0.95]), both
    )
    # only the aligned classes count, and a class with nothing found scores nothing
    only_first = torch.tensor([True, False])
    assert aligned_score(_mask_pred([head, leaked], [0.9, 0.1]), only_first) == pytest.approx(
        0.9 * aligned_score(_mask_pred([head], [1.0]), torch.tensor([True])), rel=1e-6
    )
    empty = np.zeros(size, bool)
    assert aligned_score(_mask_pred([empty, empty], [0.9, 0.9]), both) == 0.0


def test_aligned_score_with_the_image_prefers_the_mask_on_the_structures_edge():
    size = (80, 100)
    structure = disk(size, (40, 50), 15)
    gradient = gradient_magnitude(np.where(structure, 200.0, 60.0).astype(np.float32))  # bright structure, dark fluid
    one = torch.tensor([True])
    # structure + fluid is as convex and SAM is more confident about it: only the outline tells them apart
    with_fluid, alone = _mask_pred([disk(size, (40, 50), 28)], [0.9]), _mask_pred([structure], [0.85])
    assert aligned_score(with_fluid, one) > aligned_score(alone, one)
    assert aligned_score(alone, one, gradient) > aligned_score(with_fluid, one, gradient)


def test_warp_similarity_is_high_where_the_warp_found_the_structure():
    torch.manual_seed(0)
    ref = torch.from_numpy(disk((64, 64), (28, 30), 12)).float()[None]
    rng = torch.Generator().manual_seed(0)
    textured = ref + 0.3 * torch.rand(ref.shape, generator=rng)  # the reference's disk, textured
    source = WarpSource(None, None, 64)
    state = WarpState(WarpNet().eval(), textured, one_hot(ref[0].long(), 1))  # an untrained net: the identity warp
    same = textured[0].numpy() * 255
    noise = torch.rand((64, 64), generator=rng).numpy() * 255  # an image without the structure
    assert source.similarity(state, same)[0] > 0.99
    assert source.similarity(state, noise)[0] < 0.3


def test_a_reference_has_its_own_embedding_slot(lite_medsam):
    """Two references (e.g. two slices of a labelled volume) never share a cached embedding or features."""
    ref_image, ref_label, _ = _cohort()
    store = EmbeddingStore(lite_medsam)
    first = Reference(ref_image, ref_label, 2)
    second = Reference(np.ascontiguousarray(ref_image[::-1]), np.ascontiguousarray(ref_label[::-1]), 2)
    a, b = store.reference_embedding(first), store.reference_embedding(second)
    assert not torch.equal(a.features, b.features)
    assert store.reference_embedding(first) is a  # cached within its own slot
    assert not torch.equal(store.reference_features(first), store.reference_features(second))


def test_store_keeps_embeddings_on_disk_beyond_its_memory_budget(lite_medsam, tmp_path, monkeypatch):
    _, _, targets = _cohort()
    store = EmbeddingStore(lite_medsam, directory=str(tmp_path / "emb"), max_in_memory=1)
    first = {k: store.embedding(k, img).features.clone() for k, (img, _) in targets}
    assert len(list((tmp_path / "emb").iterdir())) == len(targets)
    monkeypatch.setattr(lite_medsam, "encode", lambda image: pytest.fail("must come from disk"))
    for k, (img, _) in targets:
        assert torch.equal(store.embedding(k, img).features, first[k])


def test_fused_serves_a_class_sam_is_unsure_of_with_the_warped_label(lite_medsam, monkeypatch):
    ref_image, ref_label, targets = _cohort()
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 2)
    key, (image, truth) = targets[0]
    # the locator supports the warped label more than SAM's masks (as on echocardiography)
    monkeypatch.setattr(fused, "_supports", lambda probs, pred: torch.full((2,), 0.9 if pred.iou.eq(1).all() else 0.1))
    unsure = _fused(lite_medsam, sam_confidence=1.01)  # above any predicted IoU: SAM is unsure of every class
    state = unsure.fit(reference, cohort)
    assert all(d.registration and d.source == "registration" for d in state.decisions), state.decisions
    assert all(0 < d.sam_iou <= 1 for d in state.decisions)
    expected = registered(unsure.primary.warped(state.primary, image), image.shape[:2])
    assert torch.equal(unsure.predict(state, key, image, store).logits, expected.logits)
    # SAM is kept where it is confident, or where its masks are the better supported
    for confidence, label_support in ((0.1, 0.9), (1.01, 0.05)):
        monkeypatch.setattr(
            fused,
            "_supports",
            lambda probs, pred, s=label_support: torch.full((2,), s if pred.iou.eq(1).all() else 0.1),
        )
        source = _fused(lite_medsam, sam_confidence=confidence)
        kept = source.fit(reference, cohort)
        assert not any(d.registration for d in kept.decisions), (confidence, kept.decisions)
        assert _dice(source.predict(kept, key, image, store).label() == 1, truth == 1) > 0.8


def test_fused_serves_a_wall_sam_is_unsure_of_with_the_warped_label_even_where_sam_is_better_supported(
    lite_medsam, monkeypatch
):
    size = (72, 96)

    def case(shift):
        label = np.zeros(size, np.int64)
        label[disk(size, (36 + shift, 44 + shift), 20)] = 2  # the wall ...
        label[disk(size, (36 + shift, 44 + shift), 11)] = 1  # ... around its cavity
        image = np.choose(label, [40.0, 90.0, 200.0])
        return image.astype(np.float32), label

    ref_image, ref_label = case(0)
    targets = [(f"t{i}", case(s)) for i, s in enumerate((2, 4, 5))]
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 2)
    # the locator supports SAM's masks more than the warped label for every class
    monkeypatch.setattr(fused, "_supports", lambda probs, pred: torch.full((2,), 0.1 if pred.iou.eq(1).all() else 0.9))
    state = _fused(lite_medsam, sam_confidence=1.01).fit(reference, cohort)
    assert [d.registration for d in state.decisions] == [False, True], state.decisions
    assert state.decisions[1].source == "registration" and state.decisions[0].source != "registration"


def test_fused_finds_a_structure_twice_or_half_the_reference_size_and_reports_an_absent_one(lite_medsam):
    size = (128, 160)
    rng = np.random.default_rng(1)

    def case(centre, radius):
        label = disk(size, centre, radius).astype(np.int64) if radius else np.zeros(size, np.int64)
        image = 40 + 10 * rng.standard_normal(size) + label * (150 + 20 * np.sin(np.arange(size[1]) / 2.0))
        return image.astype(np.float32), label

    ref_image, ref_label = case((40, 45), 16)
    sizes = [((80, 100), 32), ((90, 40), 8), ((40, 120), 30), ((85, 110), 9), ((60, 80), 0)]
    targets = [(f"t{i}", case(c, r)) for i, (c, r) in enumerate(sizes)]
    source = _fused(lite_medsam, absent_margin=0.1)
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 1)
    state = source.fit(reference, cohort)
    preds = [source.predict(state, k, img, store) for k, (img, _) in targets]
    for (key, (_, truth)), pred in zip(targets[:4], preds[:4]):
        assert _dice(pred.label() == 1, truth == 1) > 0.8, (key, state.decisions)
    assert not preds[4].found[0] or not (preds[4].label() == 1).any()


def test_fused_takes_the_locators_mask_in_the_one_image_where_the_cohorts_warp_lost_the_structure(lite_medsam):
    size = (128, 160)
    rng = np.random.default_rng(2)

    def case(centre, radius=14):
        label = disk(size, centre, radius).astype(np.int64)
        image = 40 + 10 * rng.standard_normal(size) + label * (150 + 20 * np.sin(np.arange(size[1]) / 2.0))
        return image.astype(np.float32), label

    ref_image, ref_label = case((40, 45))
    centres = [(41, 46), (42, 44), (39, 47), (40, 43), (95, 125)]  # the last one moved far away
    targets = [(f"t{i}", case(c)) for i, c in enumerate(centres)]
    source = _fused(lite_medsam)
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 1)
    state = source.fit(reference, cohort)
    assert [d.source for d in state.decisions] == ["warp"], state.decisions  # the cohort keeps the warp
    preds = [source.predict(state, k, img, store) for k, (img, _) in targets]
    assert [p.sources for p in preds] == [["warp"]] * 4 + [["classifier"]], [p.sources for p in preds]
    for (key, (_, truth)), pred in zip(targets, preds):
        assert _dice(pred.label() == 1, truth == 1) > 0.8, key
    source.switch_margin = None  # the cohort's choice alone loses the moved structure
    key, (image, truth) = targets[-1]
    assert _dice(source.predict(state, key, image, store).label() == 1, truth == 1) < 0.5


class _GivenMasks(ClassifierSource):
    """A locator whose SAM masks are given, whatever the image."""

    def __init__(self, pred: Prediction):
        self.pred = pred

    def predict(self, state, key, image, store, probs=None) -> Prediction:
        return self.pred


def test_the_per_image_switch_does_not_take_a_locators_mask_lying_on_another_class():
    size = (64, 96)
    a, b, stray = disk(size, (32, 24), 10), disk(size, (32, 72), 10), disk(size, (8, 48), 4)

    def logits(*masks):
        return torch.stack([torch.where(torch.from_numpy(m), 10.0, -10.0) for m in masks])

    warp = Prediction(logits(stray, b), torch.ones(2))  # the warp lost class 1 (structure a) in this image
    probs = torch.full((3, *size), 0.05)
    probs[1][torch.from_numpy(a | b)] = 0.9  # the classifier takes both look-alike structures for class 1
    probs[2][torch.from_numpy(b)] = 0.9
    state = SimpleNamespace(use_primary=torch.tensor([True, True]), use_registration=torch.tensor([False, False]))
    for located, expected in ((a, ["classifier", "warp"]), (b, ["warp", "warp"])):
        source = _GivenMasks(Prediction(logits(located, b), torch.ones(2)))
        fused_source = FusedSource(None, source, None, switch_margin=0.25)
        state.locator = None
        pred, sources = fused_source.switch(state, warp, ["warp", "warp"], probs, "t", None, None)
        assert sources == expected
        # class 1 on its own structure where the locator found it there; else the warp's masks stay as they were
        assert (pred.label() == 1).sum() == (a.sum() if located is a else stray.sum())
        assert ((pred.label() == 2) == b).all()


def test_store_on_disk_belongs_to_one_job(tmp_path):
    directory = tmp_path / "emb"
    store = EmbeddingStore(None, directory=str(directory))
    store.bind("job-a")
    stale = directory / ("0" * 40 + ".pt")
    stale.write_bytes(b"an embedding of job a")
    (directory / "notes.txt").write_text("not the store's")
    store.bind("job-a")  # a rerun of the same job keeps them
    assert stale.exists()
    EmbeddingStore(None, directory=str(directory)).bind("job-b")  # another job never reuses them
    assert not stale.exists() and (directory / "notes.txt").exists()


def test_classifier_self_trains_on_a_bounded_sample_of_the_cohort(lite_medsam, monkeypatch):
    ref_image, ref_label, targets = _cohort()
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 2)
    decoder = SamDecoder(lite_medsam, PromptGenerator())
    source = ClassifierSource(decoder, PatchClassifier(iterations=20), self_training=2, max_pseudo=2)
    seen = []
    predict = source.predict
    monkeypatch.setattr(source, "predict", lambda state, key, *a, **k: seen.append(key) or predict(state, key, *a, **k))
    source.fit(reference, cohort)
    assert seen == ["t0", "t2", "t0", "t2"]  # two rounds over the first and last of three images


def test_the_classifier_source_outlines_every_part_of_a_class_in_two_parts(lite_medsam):
    size = (96, 128)
    rng = np.random.default_rng(3)

    def case(dx):
        label = (disk(size, (48, 30 + dx), 14) | disk(size, (48, 96 + dx), 14)).astype(np.int64)  # one class, 2 parts
        image = 40 + 8 * rng.standard_normal(size) + 160 * label
        return image.astype(np.float32), label

    ref_image, ref_label = case(0)
    targets = [(f"t{i}", case(dx)) for i, dx in enumerate((2, -2, 3))]
    reference, cohort, store = _setup(lite_medsam, ref_image, ref_label, targets, 1)
    assert reference.parts == [2]
    source = ClassifierSource(SamDecoder(lite_medsam), PatchClassifier(iterations=100), self_training=0)
    state = source.fit(reference, cohort)
    for key, (image, truth) in targets:
        pred = source.predict(state, key, image, store)
        assert _dice(pred.label() == 1, truth == 1) > 0.8, key  # both discs, not the most probable one alone
    state.parts = None  # as before: one box on the most probable region
    one = source.predict(state, "t0", targets[0][1][0], store)
    assert _dice(one.label() == 1, targets[0][1][1] == 1) < 0.7


def test_store_keeps_matching_features_within_its_memory_budget(lite_medsam, tmp_path):
    _, _, targets = _cohort()
    calls = []

    def encoder(image):
        calls.append(1)
        return torch.from_numpy(np.ascontiguousarray(image[None, ::8, ::8])).float()

    for directory in (str(tmp_path / "emb"), None):
        calls.clear()
        store = EmbeddingStore(lite_medsam, features=encoder, directory=directory, max_in_memory=1)
        first = {k: store.features(k, img).clone() for k, (img, _) in targets}
        assert len(store._features) == 1 and len(calls) == len(targets)
        for k, (img, _) in targets:
            assert torch.equal(store.features(k, img), first[k])
        # read back from disk, or without a directory computed again: memory does not grow with the cohort
        assert len(calls) == (len(targets) if directory else 2 * len(targets))
