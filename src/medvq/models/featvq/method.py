"""Feature-space VQ: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.featvq.config import FeatVQConfig
from medvq.models.registry import Method

MAP_NAMES = ("quantization_distance", "nll")
COMBINATIONS = ("quantization_distance+nll",)

METHOD = Method(
    summary="Feature-space VQ: a codebook of ImageNet EfficientNet-Lite0 patch features of normal scans and a bidirectional prior over its codes; quantisation-distance and NLL maps.",
    order=5,
    config=FeatVQConfig,
    map_names=MAP_NAMES,
    streams_training=True,
    combinations=COMBINATIONS,
    stored_model_defaults={"prior_vocabulary": 0},  # runs from before code groups: every code its own
    onnx_export=lambda model: False,  # the library quantizer's traced reshape keeps the batch size it saw
)
