"""The VQ-VAE's anomaly maps: reconstruction residual, alignment loss map (ALM) and the perceptual residual."""

from __future__ import annotations

import torch

from medvq.maps import MapOutput, check_map_names, evaluating
from medvq.maps.alm import alignment_loss_map
from medvq.maps.residual import perceptual_map, residual_map
from medvq.models.vqvae.model import VQVAE
from medvq.models.vqvae.method import MAP_NAMES, map_names_for  # noqa: F401 (declared with the method)


@torch.no_grad()
def compute_maps(model: VQVAE, images: torch.Tensor, names: tuple[str, ...] | list[str] | None = None) -> MapOutput:
    """Run the model in eval mode on (B, C, H, W) images in [0, 1] and compute the requested maps (default: all it has)."""
    available = map_names_for(model.config)
    names = available if names is None else names
    check_map_names(names, available, "a VQ-VAE" if "perceptual" in available else "a VQ-VAE trained without the perceptual map")
    with evaluating(model):
        q = model.quantize(model.encode(images))
        reconstruction = model.decode(q.quantized).float()
    maps: dict[str, torch.Tensor] = {}
    if "residual" in names:
        maps["residual"] = residual_map(images, reconstruction)
    if "alm" in names:
        maps["alm"] = alignment_loss_map(q.latents, model.quantizer.codebook, q.indices, size=tuple(images.shape[-2:]))
    if "perceptual" in names:
        maps["perceptual"] = perceptual_map(model.features.embed, images, reconstruction)
    return MapOutput(maps=maps, reconstruction=reconstruction, codes=q.indices)
