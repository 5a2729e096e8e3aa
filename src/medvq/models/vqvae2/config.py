"""Settings of a VQ-VAE-2, without torch (read by ``medvq.config`` and the CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medvq.models.vqvae.config import VQAutoencoderConfig

class VQVAE2Config(VQAutoencoderConfig):
    """Architecture of a VQ-VAE-2; stored with every checkpoint and used to rebuild it."""

    bottom_downsample_layers: int = Field(2, ge=1, le=4, description="Stride-2 stages to the bottom code grid (image_size / 2**this).")
    top_downsample_layers: int = Field(1, ge=1, le=3, description="Further stride-2 stages from the bottom to the top code grid.")
    codebook_size_top: int = Field(512, ge=2, description="Number of top-level codebook vectors.")
    codebook_size_bottom: int = Field(512, ge=2, description="Number of bottom-level codebook vectors.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside residual blocks (training only).")
    perceptual_map: bool = Field(
        False,
        description="Also compare the scan and its reconstruction in frozen ImageNet EfficientNet-Lite0 features (the VQ-VAE's "
        "'perceptual' map). Off by default here: on kermany-dev's validation patients a trained CPU-sized VQ-VAE-2 separated them "
        "worse with it than with its pixel residual (d' 1.78 against 2.29; docs/results.md).",
    )
    upsampling: Literal["resize", "transpose"] = Field(
        "resize",
        description="Decoder upsampling: nearest-neighbour resizing followed by a 3x3 convolution (flat regions such as the background "
        "of MRI slices stay flat), or 4x4 stride-2 transposed convolutions (checkerboard patterns; what runs whose config.yaml predates this option use).",
    )

    @property
    def bottom_stride(self) -> int:
        return 2**self.bottom_downsample_layers

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this (the top grid's stride)."""
        return 2 ** (self.bottom_downsample_layers + self.top_downsample_layers)
