"""Alignment loss map (ALM): how far each encoder latent lies from the code it was snapped to.

ALM[i, j] = mean_d (z_e[d, i, j] - e_{k*(i, j)}[d])^2, computed in fp32 on the latent grid and
upsampled (bilinear) to the image size. A normal-only codebook has no code near the latents of a lesion,
so lesions light up even where the decoder would reconstruct them plausibly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss_map(
    latents: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """latents (B, D, h, w), codebook (K, D), indices (B, h, w) -> (B, 1, H, W) (or (B, 1, h, w) without size)."""
    if latents.ndim != 4 or indices.shape != (latents.shape[0], *latents.shape[2:]):
        raise ValueError(f"latents {tuple(latents.shape)} and indices {tuple(indices.shape)} do not match")
    codes = codebook.float()[indices.long()].permute(0, 3, 1, 2)  # (B, D, h, w): channels back first
    alm = (latents.float() - codes).pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(alm.shape[-2:]) != tuple(size):
        alm = F.interpolate(alm, size=size, mode="bilinear", align_corners=False)
    return alm
