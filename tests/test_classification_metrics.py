"""Classification metrics and the pointing game on hand-made inputs with known answers."""

import numpy as np
import pytest

from medvq.evaluation.classification import classification_metrics, confusion_matrix, one_vs_rest_auroc, sensitivity_specificity
from medvq.evaluation.metrics import pointing_game


def onehot_probs(predicted, n_classes, confidence=0.7):
    p = np.full((len(predicted), n_classes), (1 - confidence) / (n_classes - 1))
    p[np.arange(len(predicted)), predicted] = confidence
    return p


def test_confusion_sensitivity_specificity_by_hand():
    targets = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    cm = confusion_matrix(targets, predicted, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 3]]
    sens, spec = sensitivity_specificity(cm)
    np.testing.assert_allclose(sens, [3 / 4, 1 / 2, 3 / 4])
    np.testing.assert_allclose(spec, [5 / 6, 7 / 8, 5 / 6])
    m = classification_metrics(targets, onehot_probs(predicted, 3), ["NORMAL", "CNV", "DME"])
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 3 / 4) / 3)
    assert m["confusion_matrix"] == cm.tolist()
    assert m["sensitivity"]["CNV"] == pytest.approx(0.5) and m["specificity"]["DME"] == pytest.approx(5 / 6)
    assert set(m["auroc_one_vs_rest"]) == {"NORMAL", "CNV", "DME"} and 0 <= m["auroc_macro"] <= 1


def test_auroc_normal_vs_abnormal_and_one_vs_rest():
    targets = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.2, 0.1, 0.7]])
    m = classification_metrics(targets, p, ["NORMAL", "CNV", "DME"])
    # P(abnormal) = 1 - p0: normals 0.1, 0.2, 0.6; abnormals 0.7, 0.5, 0.8 -> 8 of 9 pairs ordered
    assert m["auroc_abnormal"] == pytest.approx(8 / 9)
    ovr = one_vs_rest_auroc(targets, p)
    assert ovr[2] == pytest.approx(1.0)  # DME has the highest p2 of all
    assert ovr[1] == pytest.approx(1.0)  # CNV p1 0.6, 0.4 above every other image's p1


def test_binary_model_reports_detection_per_class_folder_and_by_width():
    targets = np.array([0, 0, 1, 1, 1, 0])
    p = onehot_probs(np.array([0, 1, 1, 1, 0, 0]), 2)
    labels = ["NORMAL", "NORMAL", "CNV", "DME", "DME", "NORMAL"]
    m = classification_metrics(targets, p, ["NORMAL", "ABNORMAL"], groups=np.array([512, 512, 512, 512, 1024, 1024]), labels=labels)
    assert m["called_abnormal_per_label"] == {"CNV": 1.0, "DME": 0.5, "NORMAL": pytest.approx(1 / 3)}
    assert set(m["auroc_abnormal_by_width"]) == {"512"}  # 1024 has one image of each class only
    assert "auroc_one_vs_rest" not in m


def test_bad_classification_inputs():
    with pytest.raises(ValueError, match="targets must lie"):
        classification_metrics(np.array([0, 3]), onehot_probs(np.array([0, 1]), 2), ["a", "b"])
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(np.array([0, 1]), onehot_probs(np.array([0, 1]), 2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(np.array([0, 1]), np.array([[np.nan, 1], [0, 1]]), ["a", "b"])


def test_pointing_game():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 10:12, 10:12] = True  # image 2 has no lesion: skipped
    maps = np.zeros((3, 16, 16))
    maps[0, 3, 3] = 1.0  # on the lesion
    maps[1, 10, 5] = 1.0  # 5 px left of the lesion
    assert pointing_game(masks, maps) == pytest.approx(0.5)
    assert pointing_game(masks, maps, tolerance=5) == pytest.approx(1.0)
    valid = np.ones_like(masks)
    valid[0, 3, 3] = False  # the peak lies on invalid padding: the next maximum counts
    maps[0, 0, 15] = 0.5
    assert pointing_game(masks, maps, valid=valid) == pytest.approx(0.0)
    assert np.isnan(pointing_game(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))
