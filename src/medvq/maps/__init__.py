"""Anomaly maps: one module per kind of map, shared by every method that can produce it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn


@dataclass
class MapOutput:
    """What a method returns for a batch of images (B, C, H, W)."""

    maps: dict[str, torch.Tensor]  # name -> (B, 1, H, W) fp32, unsmoothed, uncalibrated
    reconstruction: torch.Tensor | None = None  # (B, C, H, W) for reconstruction models
    codes: torch.Tensor | None = None  # (B, h, w) code indices for VQ models
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) image scores the model gives itself (e.g. P(abnormal))


def check_map_names(names: Iterable[str], available: Iterable[str], what: str, hint: str = "") -> None:
    """Raise ``ValueError`` naming the maps ``what`` (e.g. 'a VQ-VAE') cannot give, and those it can."""
    available = tuple(available)
    unknown = set(names) - set(available)
    if unknown:
        raise ValueError(f"unknown map(s) {sorted(unknown)} for {what}{hint}; available: {', '.join(available)}")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block (no dropout, running statistics), back in its own mode after, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
