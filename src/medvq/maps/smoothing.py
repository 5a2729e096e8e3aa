"""Map smoothing: a separable Gaussian blur with reflect padding, applied to every map the same way."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kernel(sigma: float, radius: int, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=like.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(like.dtype)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) -> same shape. sigma in pixels; 0 returns the input."""
    if sigma <= 0:
        return maps
    b, c, h, w = maps.shape
    out = maps.reshape(b * c, 1, h, w)
    radius = max(1, math.ceil(3 * sigma))
    rw, rh = min(radius, w - 1), min(radius, h - 1)  # reflect padding needs pad < size
    if rw > 0:
        out = F.conv2d(F.pad(out, (rw, rw, 0, 0), mode="reflect"), _kernel(sigma, rw, out).view(1, 1, 1, -1))
    if rh > 0:
        out = F.conv2d(F.pad(out, (0, 0, rh, rh), mode="reflect"), _kernel(sigma, rh, out).view(1, 1, -1, 1))
    return out.reshape(b, c, h, w)
