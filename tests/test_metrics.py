import math

import numpy as np

from bundle.metrics import class_scores, summarize


def test_dice_and_iou_per_class():
    truth = np.zeros((10, 10), np.int64)
    truth[:5] = 1
    truth[5:, :5] = 2
    pred = truth.copy()
    pred[5:, :5] = 0
    pred[5:, 5:] = 2  # class 2 fully misplaced
    s = class_scores(pred, truth, 3)
    assert s["dice"][0] == 1.0 and s["dice"][1] == 0.0 and math.isnan(s["dice"][2])
    single = (truth == 1).astype(np.int64)
    half = single.copy()
    half[:5, 5:] = 0
    s = class_scores(half, single, 1)
    assert abs(s["dice"][0] - 2 * 25 / (25 + 50)) < 1e-6 and abs(s["iou"][0] - 0.5) < 1e-6


def test_false_positive_on_absent_class_counts_as_zero():
    truth = np.zeros((4, 4), np.int64)
    pred = truth.copy()
    pred[0, 0] = 1
    assert class_scores(pred, truth, 1)["dice"] == [0.0]


def test_summary_averages_images_then_classes():
    rows = [{"dice": [1.0, 0.5], "iou": [1.0, 0.3]}, {"dice": [0.0, float("nan")], "iou": [0.0, float("nan")]}]
    s = summarize(rows, ["a", "b"])
    assert s["per_class"] == {"a": 50.0, "b": 50.0} and s["dice_mean"] == 50.0
