"""PatchCore: what its declaration says beyond the folder's standard files (see ``medvq.models.registry``)."""

from medvq.models.patchcore.config import PatchCoreConfig
from medvq.models.registry import Method, lazy_in

ref = lazy_in(__package__)
MAP_NAMES = ("patch_distance",)

METHOD = Method(
    summary="PatchCore memory bank of ImageNet EfficientNet-Lite0 patch features of normal scans (no gradient training); nearest-neighbour distance map.",
    order=3,
    config=PatchCoreConfig,
    map_names=MAP_NAMES,
    streams_training=True,
    primary_map="patch_distance",
    channels_last=True,
    gray_to_rgb=True,
    onnx_export=ref("model:prepare_for_export"),
)
