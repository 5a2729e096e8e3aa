"""PatchCore declares itself: config, maps, how it is built and fitted, what it can do (see ``medvq.models.registry``)."""

from medvq.models.patchcore.config import PatchCoreConfig
from medvq.models.registry import Method, lazy_in

ref = lazy_in(__package__)
MAP_NAMES = ("patch_distance",)

METHOD = Method(
    name="patchcore",
    summary="PatchCore memory bank of ImageNet EfficientNet-Lite0 patch features of normal scans (no gradient training); nearest-neighbour distance map.",
    order=3,
    config=PatchCoreConfig,
    map_names=MAP_NAMES,
    build_model=ref("model:PatchCore"),
    compute_maps=ref("anomaly_map:patchcore_maps"),
    fit=ref("fit:fit_patchcore"),
    streams_training=True,
    primary_map="patch_distance",
    channels_last=True,
    gray_to_rgb=True,
    onnx_export=ref("model:prepare_for_export"),
)
