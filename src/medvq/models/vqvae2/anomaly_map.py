"""The VQ-VAE-2's anomaly maps: reconstruction residual, one alignment loss map per code level and the perceptual residual."""

from __future__ import annotations

import torch

from medvq.maps import MapOutput, check_map_names, evaluating
from medvq.maps.alm import alignment_loss_map
from medvq.maps.residual import perceptual_map, residual_map
from medvq.models.vqvae2.model import VQVAE2
from medvq.models.vqvae2.method import MAP_NAMES, map_names_for  # noqa: F401 (declared with the method)


@torch.no_grad()
def compute_maps(model: VQVAE2, images: torch.Tensor, names: tuple[str, ...] | list[str] | None = None) -> MapOutput:
    """Run the model in eval mode on (B, C, H, W) images in [0, 1] and compute the requested maps (default: all it has).

    ``codes`` are the bottom code maps; ``extras['top_codes']`` the top ones.
    """
    available = map_names_for(model.config)
    names = available if names is None else names
    check_map_names(names, available, "a VQ-VAE-2" if "perceptual" in available else "a VQ-VAE-2 trained without the perceptual map")
    with evaluating(model):
        top, bottom = model.quantize(*model.encode(images))
        reconstruction = model.decode(top.quantized, bottom.quantized).float()
    size = tuple(images.shape[-2:])
    maps: dict[str, torch.Tensor] = {}
    if "residual" in names:
        maps["residual"] = residual_map(images, reconstruction)
    if "alm_top" in names:
        maps["alm_top"] = alignment_loss_map(top.latents, model.quantizer_top.codebook, top.indices, size=size)
    if "alm_bottom" in names:
        maps["alm_bottom"] = alignment_loss_map(bottom.latents, model.quantizer_bottom.codebook, bottom.indices, size=size)
    if "perceptual" in names:
        maps["perceptual"] = perceptual_map(model.features.embed, images, reconstruction)
    return MapOutput(maps=maps, reconstruction=reconstruction, codes=bottom.indices, extras={"top_codes": top.indices})
