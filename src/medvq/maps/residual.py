"""Residual maps: per-pixel absolute reconstruction error |x - x_hat|, and the same comparison in a frozen
network's features (``perceptual_map``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def residual_map(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images and reconstructions -> (B, 1, H, W) mean absolute error over channels, fp32."""
    if image.shape != reconstruction.shape:
        raise ValueError(f"image {tuple(image.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape")
    return (image.float() - reconstruction.float().clamp(0, 1)).abs().mean(dim=1, keepdim=True)


def perceptual_map(embed: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of the patch features of image and reconstruction, bilinearly resized to (B, 1, H, W), fp32.

    ``embed``: (B, C, H, W) -> (B, D, h, w) features of a frozen network. The direction of a feature vector,
    not its length, is compared: a reconstruction blurs speckle and lowers every feature's magnitude alike,
    which the pixel residual counts as error everywhere (cosine separated kermany-dev's validation patients
    better than the squared feature distance, d' 3.52 against 3.11). The image is embedded last, so a hook
    on the network keeps the scan's own features (the out-of-distribution guard pools them).
    """
    if image.shape != reconstruction.shape:
        raise ValueError(f"image {tuple(image.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape")
    of_reconstruction = embed(reconstruction.float().clamp(0, 1))
    of_image = embed(image.float())
    distance = 1.0 - F.cosine_similarity(of_image, of_reconstruction, dim=1, eps=1e-6)[:, None]
    return F.interpolate(distance, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False).clamp_min_(0.0)
