"""Patch features of a frozen ImageNet EfficientNet-Lite0: the settings every patch-comparing method shares.

PatchCore and feature-space VQ take the same features: outputs of mid-level stages (2 and 3 by default,
stride 4 and 8), each averaged over a k x k neighbourhood, deeper grids upsampled to the finest, concatenated
(``efficientnet_lite0.patch_embedding``). Their configs extend ``PatchFeatureConfig``, so the fields, their
defaults and checks exist once.
"""

from __future__ import annotations

from pathlib import Path
import torch

from medvq.models.backbones.config import PatchFeatureConfig
from medvq.models.backbones.efficientnet_lite0 import LiteFeatures, patch_embedding
from medvq.models.backbones.weights import load_lite0_weights


class PatchFeatures(LiteFeatures):
    """The frozen EfficientNet-Lite0 stages of a ``PatchFeatureConfig``; ``embed`` gives the patch features.

    A subclass rather than a wrapper, so the network's parameters keep the names of the ImageNet file under the
    holder's ``features.`` (as PatchCore runs have always stored them).
    """

    def __init__(self, config: PatchFeatureConfig):
        super().__init__(config.in_channels, config.feature_stages)
        self.patch_size = config.patch_size
        self.normalisation_stats = config.normalisation_stats
        self.pretrained, self.in_channels = config.pretrained, config.in_channels
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PatchFeatures":
        """Frozen: BatchNorm layers always use their ImageNet running statistics."""
        return super().train(False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> locally aggregated patch features (B, D, S/g, S/g), fp32 (g = grid_stride)."""
        return patch_embedding(self(images.float()), self.patch_size)

    def load_imagenet(self, source: str | None = None) -> Path:
        """EfficientNet-Lite0 weights ('imagenet' or a file; default: the config's ``pretrained``); returns the file."""
        mean, std = self.normalisation_stats
        return load_lite0_weights(self, source or self.pretrained, mean, std, self.in_channels)[0]
