"""PatchCore's anomaly map and image score.

``patch_distance``: each patch's Euclidean distance to its nearest memory-bank entry, on the patch grid
(stride 4 by default), upsampled bilinearly to the image (the Detector then smooths and calibrates it like every
map). ``reweighted_max``: the image score the method gives itself, the largest patch distance
re-weighted by the isolation of its nearest bank entry (``PatchCore.image_scores``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvq.maps import MapOutput, check_map_names, evaluating
from medvq.models.patchcore.model import PatchCore
from medvq.models.patchcore.method import MAP_NAMES  # noqa: F401 (declared with the method)

SCORE_NAME = "reweighted_max"


@torch.no_grad()
def compute_maps(model: PatchCore, images: torch.Tensor, names: tuple[str, ...] | list[str] = MAP_NAMES) -> MapOutput:
    """(B, C, S, S) images in [0, 1] -> patch_distance map (B, 1, S, S) fp32 and the reweighted_max score (B,)."""
    check_map_names(names, MAP_NAMES, "PatchCore")
    with evaluating(model), torch.autocast(images.device.type, enabled=False):  # distances in fp32, whatever the caller's autocast
        out = model(images.float())
    maps = {}
    if "patch_distance" in names:
        maps["patch_distance"] = F.interpolate(out.distances[:, None], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    return MapOutput(maps=maps, scores={SCORE_NAME: out.score})
