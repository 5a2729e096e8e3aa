"""Feature-space VQ declares itself: config, maps, how it is built and trained, what it can do (see ``medvq.models.registry``)."""

from medvq.models.featvq.config import FeatVQConfig
from medvq.models.registry import Method, lazy_in

ref = lazy_in(__package__)
MAP_NAMES = ("quantization_distance", "nll")
COMBINATIONS = ("quantization_distance+nll",)

METHOD = Method(
    name="featvq",
    summary="Feature-space VQ: a codebook of ImageNet EfficientNet-Lite0 patch features of normal scans and a bidirectional prior over its codes; quantisation-distance and NLL maps.",
    order=5,
    config=FeatVQConfig,
    map_names=MAP_NAMES,
    build_model=ref("model:FeatVQ"),
    compute_maps=ref("anomaly_map:featvq_maps"),
    training_module=ref("lightning:FeatVQModule.from_run_config"),
    streams_training=True,
    combinations=COMBINATIONS,
    onnx_export=lambda model: False,  # the library quantizer's traced reshape keeps the batch size it saw
)
