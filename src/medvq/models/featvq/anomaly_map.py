"""Feature-space VQ's anomaly maps.

``quantization_distance``: ||f - e_k*||^2, each patch feature's squared distance to its nearest code (fp32),
on the patch grid (stride 4 by default), upsampled bilinearly to the image. ``nll``: -log p(k*_i | context)
of each position's code under the code prior, from one forward pass, upsampled the same way. The Detector
smooths and calibrates both like every map; ``quantization_distance+nll`` is calibrated next to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvq.maps import MapOutput, check_map_names, evaluating
from medvq.models.featvq.model import FeatVQ
from medvq.models.featvq.method import MAP_NAMES, COMBINATIONS  # noqa: F401 (declared with the method)



def _to_image(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, 1, H, W), bilinear."""
    return F.interpolate(grid_map[:, None].float(), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def compute_maps(model: FeatVQ, images: torch.Tensor, names: tuple[str, ...] | list[str] = MAP_NAMES) -> MapOutput:
    """(B, C, S, S) images in [0, 1] -> the requested maps (B, 1, S, S) fp32 and the code grid (B, h, w)."""
    check_map_names(names, MAP_NAMES, "feature-space VQ")
    with evaluating(model):  # no EMA step of the codebook, no dropout in the prior
        out = model(images)
        size = tuple(images.shape[-2:])
        maps: dict[str, torch.Tensor] = {}
        if "quantization_distance" in names:
            maps["quantization_distance"] = _to_image(out.distances, size)
        if "nll" in names:
            maps["nll"] = _to_image(model.code_nll(out.codes), size)
    return MapOutput(maps=maps, codes=out.codes)
