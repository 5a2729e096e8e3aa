"""The input check every image model shares: a clear error instead of a shape mismatch deep inside a network."""

from __future__ import annotations

import torch


def check_images(x: torch.Tensor, in_channels: int, stride: int) -> None:
    """Raise ``ValueError`` unless ``x`` is (B, in_channels, H, W) with H and W multiples of ``stride``."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected images of shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[-1] % stride or x.shape[-2] % stride:
        raise ValueError(
            f"image size {tuple(x.shape[-2:])} is not a multiple of the model stride {stride}; resize the input (data.image_size) to a multiple of it"
        )
