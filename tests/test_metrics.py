"""Validation metrics against hand-counted values."""

import numpy as np
import pytest

from trainables.training.metrics import RANKING_METRIC, compute_metrics, format_report


def test_metrics_by_hand_three_classes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    # class 0: tp 1, fp 1, fn 1 -> p .5 r .5 f1 .5 ; class 1: tp 2, fp 1 -> p 2/3 r 1 f1 .8
    # class 2: tp 1, fn 1 -> p 1 r .5 f1 2/3 ; macro-F1 = (.5 + .8 + 2/3) / 3
    m = compute_metrics(labels, preds[:, None], np.full(6, 0.5), ["a", "b", "c"])
    assert m.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.balanced_accuracy == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m.per_class["b"].precision == pytest.approx(2 / 3)
    assert m.per_class["c"].recall == pytest.approx(0.5)
    assert m.per_class["a"].support == 2
    assert m.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m.top5_accuracy is None  # 3 classes: top-5 is meaningless
    assert m.val_loss == pytest.approx(0.5)
    assert m.scalars()[RANKING_METRIC] == m.macro_f1


def test_majority_class_model_scores_low_macro_f1_despite_high_accuracy():
    labels = np.array([0] * 95 + [1] * 5)
    preds = np.zeros(100, dtype=int)
    m = compute_metrics(labels, preds[:, None], np.zeros(100), ["common", "rare"])
    assert m.accuracy == pytest.approx(0.95)
    assert m.macro_f1 < 0.5


def test_top5_with_many_classes():
    labels = np.array([0, 1, 2])
    topk = np.array([[9, 8, 7, 6, 0], [1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])
    m = compute_metrics(labels, topk, np.zeros(3), [str(i) for i in range(10)])
    assert m.top5_accuracy == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(1 / 3)


def test_report_lists_every_class():
    m = compute_metrics(np.array([0, 1]), np.array([[0], [0]]), np.zeros(2), ["cat", "dog"])
    text = format_report(m)
    assert "cat" in text and "dog" in text and "macro-F1" in text
