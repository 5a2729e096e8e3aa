"""The supervised classifier: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.classifier.config import ClassifierConfig
from medvq.models.registry import Method, lazy_in

ref = lazy_in(__package__)
MAP_NAMES = ("gradcam", "rollout", "gradient_rollout")


def map_names_for(config: ClassifierConfig) -> tuple[str, ...]:
    """Attention rollout needs attention weights: a ViT gives every map, a CNN Grad-CAM only."""
    return MAP_NAMES if config.arch == "vit" else ("gradcam",)


METHOD = Method(
    summary="Supervised ViT / ResNet / EfficientNet-Lite0 classifier (binary or 4-class); Grad-CAM and attention-rollout maps, P(abnormal) score.",
    order=2,
    config=ClassifierConfig,
    map_names=MAP_NAMES,
    normal_only=False,
    maps_for=map_names_for,
    resolve_config=ref("training:resolve_classifier_config"),
    targets=ref("training:training_targets"),
    primary_map="p_abnormal",
    metrics=("classification",),
    explains=True,
)
