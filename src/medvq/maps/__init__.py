"""Anomaly maps: one module per kind of map, shared by every method that can produce it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MapOutput:
    """What a method returns for a batch of images (B, C, H, W)."""

    maps: dict[str, torch.Tensor]  # name -> (B, 1, H, W) fp32, unsmoothed, uncalibrated
    reconstruction: torch.Tensor | None = None  # (B, C, H, W) for reconstruction models
    codes: torch.Tensor | None = None  # (B, h, w) code indices for VQ models
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) image scores the model gives itself (e.g. P(abnormal))
