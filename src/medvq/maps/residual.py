"""Residual map: per-pixel absolute reconstruction error |x - x_hat|."""

from __future__ import annotations

import torch


def residual_map(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images and reconstructions -> (B, 1, H, W) mean absolute error over channels, fp32."""
    if image.shape != reconstruction.shape:
        raise ValueError(f"image {tuple(image.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape")
    return (image.float() - reconstruction.float().clamp(0, 1)).abs().mean(dim=1, keepdim=True)
