"""Classification metrics as plain numpy functions: accuracy, balanced accuracy, per-class sensitivity and
specificity, AUROC (binary, and one-vs-rest per class), confusion matrix.

``targets`` are integer classes (N,), ``probabilities`` are (N, C) rows summing to 1, class 0 is the
normal class. Every function raises ``ValueError`` naming the problem for bad inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from medvq.evaluation.metrics import grouped_auroc


def _inputs(targets: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(targets)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"targets must be a non-empty 1-D integer array, got shape {y.shape} and dtype {y.dtype}")
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probabilities must be (N, C) with N = {y.size}, got {p.shape}")
    if p.shape[1] < 2:
        raise ValueError("probabilities need at least two classes")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or infinite values")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"targets must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64), p


def confusion_matrix(targets: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    y, yhat = np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if y.shape != yhat.shape:
        raise ValueError(f"targets {y.shape} and predictions {yhat.shape} differ in shape")
    return np.bincount(y * num_classes + yhat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def sensitivity_specificity(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class (one vs rest): sensitivity TP / (TP + FN) and specificity TN / (TN + FP); NaN where undefined."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fn), tn / (tn + fp)


def one_vs_rest_auroc(targets: Any, probabilities: Any) -> list[float]:
    """AUROC of each class's probability for that class against all others; NaN for a class absent (or alone)."""
    y, p = _inputs(targets, probabilities)
    out = []
    for k in range(p.shape[1]):
        positive = y == k
        out.append(float(roc_auc_score(positive, p[:, k])) if 0 < positive.sum() < y.size else float("nan"))
    return out


def classification_metrics(
    targets: Any,
    probabilities: Any,
    class_names: Sequence[str],
    groups: Any | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything ``medvq evaluate`` reports for a classifier.

    ``groups`` (e.g. original scan widths) adds the normal-vs-abnormal AUROC within each group. ``labels``
    (the original class folder of each image) adds, for a binary model, the share of each folder's images
    called abnormal.
    """
    y, p = _inputs(targets, probabilities)
    names = list(class_names)
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} class names for {p.shape[1]} probability columns")
    predicted = p.argmax(axis=1)
    cm = confusion_matrix(y, predicted, len(names))
    sensitivity, specificity = sensitivity_specificity(cm)
    present = cm.sum(axis=1) > 0
    p_abnormal = 1.0 - p[:, 0]
    abnormal = (y != 0).astype(int)
    both = 0 < abnormal.sum() < abnormal.size
    out: dict[str, Any] = {
        "classes": names,
        "n_images": int(y.size),
        "accuracy": float((predicted == y).mean()),
        "balanced_accuracy": float(sensitivity[present].mean()),
        "sensitivity": {n: float(v) for n, v in zip(names, sensitivity)},
        "specificity": {n: float(v) for n, v in zip(names, specificity)},
        "auroc_abnormal": float(roc_auc_score(abnormal, p_abnormal)) if both else float("nan"),
        "confusion_matrix": cm.tolist(),
    }
    if len(names) > 2:
        ovr = one_vs_rest_auroc(y, p)
        out["auroc_one_vs_rest"] = {n: v for n, v in zip(names, ovr)}
        out["auroc_macro"] = float(np.nanmean(ovr)) if not np.isnan(ovr).all() else float("nan")
    if groups is not None and both:
        out["auroc_abnormal_by_width"] = grouped_auroc(abnormal, p_abnormal, np.asarray(groups))
    if labels is not None and len(names) == 2:
        labels = list(labels)
        out["called_abnormal_per_label"] = {
            lab: float((predicted[[i for i, x in enumerate(labels) if x == lab]] != 0).mean()) for lab in sorted(set(labels))
        }
    return out
