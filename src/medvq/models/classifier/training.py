"""What a classifier run takes from its training data: class names, class weights, integer targets.

Called by the training engine before the run's config is written, so ``config.yaml`` records the
classes in output order (normal first), the cross-entropy weights and the input size the ViT was laid
out for. Resuming a run calls it again: settled fields are checked, never recomputed.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from medvq.errors import DatasetError
from medvq.models.classifier.config import ABNORMAL, ClassifierConfig


def classes_from_labels(task: str, labels: Sequence[str], normal_class: str) -> list[str]:
    """Output classes: binary -> [normal, ABNORMAL]; 4class -> normal first, then the others sorted."""
    found = set(labels)
    if normal_class not in found:
        raise DatasetError(
            f"no {normal_class} images among the training patients (found: {', '.join(sorted(found))})",
            fix="set --normal-class to the folder name of the normal scans",
        )
    if len(found) < 2:
        raise DatasetError(f"only class {normal_class} among the training patients; a classifier needs abnormal scans too")
    return [normal_class, ABNORMAL] if task == "binary" else [normal_class, *sorted(found - {normal_class})]


def balanced_weights(targets: Sequence[int], num_classes: int, names: Sequence[str]) -> list[float]:
    """N / (C * n_c) per class: every class contributes the same total weight to the loss."""
    counts = Counter(targets)
    empty = [names[k] for k in range(num_classes) if counts[k] == 0]
    if empty:
        raise DatasetError(
            f"class(es) {', '.join(empty)} have no training images",
            fix="use --task binary, or a split (--split-seed, --val-fraction, --test-fraction) that leaves every class some training patients",
        )
    n = len(targets)
    return [round(n / (num_classes * counts[k]), 6) for k in range(num_classes)]


def resolve_classifier_config(config, train_labels: Sequence[str]):
    """Fill classes, class weights, image size and the pretrained source from the training data."""
    m: ClassifierConfig = config.model
    normal = config.data.normal_class
    classes = classes_from_labels(m.task, train_labels, normal)
    if m.classes is not None:
        unknown = set(classes) - set(m.classes) if m.task == "4class" else set()
        if m.classes[0] != normal or unknown:
            raise DatasetError(
                f"the training data has classes {classes}, the run's model {m.classes}",
                fix="train a new run for data with other classes",
            )
        classes = list(m.classes)
    update: dict = {"classes": classes, "vit_input_size": m.vit_input_size or (config.data.image_size if m.arch == "vit" else None), "pretrained": m.pretrained_source or "none"}
    resolved = ClassifierConfig.model_validate({**m.model_dump(), **update})
    if resolved.class_weights is None and resolved.class_balance == "balanced":
        targets = [resolved.target_index(label, normal) for label in train_labels]
        resolved = ClassifierConfig.model_validate({**resolved.model_dump(), "class_weights": balanced_weights(targets, resolved.num_classes, classes)})
    return config.model_copy(update={"model": resolved})


def training_targets(config, labels: Sequence[str]) -> list[int]:
    """Class names -> integer targets of the run's classifier (normal = 0)."""
    return [config.model.target_index(label, config.data.normal_class) for label in labels]
