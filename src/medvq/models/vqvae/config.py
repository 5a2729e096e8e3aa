"""Settings of a VQ-VAE, without torch (read by ``medvq.config`` and the CLI)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

class VQAutoencoderConfig(BaseModel):
    """What the VQ-VAE and the VQ-VAE-2 share (their first fields): the convolutional encoder and decoder, the
    settings of their quantizers (one, or one per level), which ``VectorQuantizer.from_config`` reads, and the
    perceptual map's frozen features."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    in_channels: int = Field(1, ge=1, description="Image channels.")
    hidden_channels: int = Field(128, ge=8, description="Width of the encoders and decoders.", json_schema_extra={"aliases": ["n-hiddens"]})
    residual_channels: int = Field(64, ge=4, description="Width inside residual blocks.", json_schema_extra={"aliases": ["n-residual-hiddens"]})
    residual_layers: int = Field(2, ge=0, description="Residual blocks in every encoder and decoder.", json_schema_extra={"aliases": ["n-residual-layers"]})
    embedding_dim: int = Field(64, ge=1, description="Dimension of the codebook vectors (of both levels in a VQ-VAE-2).")
    beta: float = Field(0.25, ge=0, description="Commitment weight on ||z_e - sg[e]||^2 (at each level).")
    ema_decay: float = Field(
        0.9, gt=0, lt=1, description="EMA decay of codebook updates (0.9 keeps the whole codebook in use in short CPU runs; 0.99 collapsed to a few codes)."
    )
    kmeans_init: bool = Field(True, description="Initialise each codebook by k-means on the first batch.")
    dead_code_threshold: float = Field(1.0, ge=0, description="Restart codes whose EMA usage falls below this (0 = never).")
    rotation_trick: bool = Field(False, description="Rotation-trick gradients through the quantizers instead of straight-through.")
    perceptual_map: bool = Field(
        True,
        description="Also compare the scan and its reconstruction in frozen ImageNet EfficientNet-Lite0 features (stages 2 + 3, as "
        "PatchCore's): the 'perceptual' map, 1 - cosine similarity per 4 x 4 patch. With the VQ-VAE it separated kermany-dev's "
        "validation patients far better than the pixel residual (d' 3.52 against 2.22), at two passes of that network per scan.",
    )


class VQVAEConfig(VQAutoencoderConfig):
    """Architecture of a VQ-VAE; stored with every checkpoint and used to rebuild it."""

    downsample_layers: int = Field(
        3,
        ge=1,
        le=5,
        description="Stride-2 stages: latent grid = image_size / 2**downsample_layers. 3 (16x16 codes at 128 px) was chosen over 2 "
        "on the validation patients of kermany-dev: image AUROC of the residual 0.91 against 0.83.",
    )
    codebook_size: int = Field(256, ge=2, description="Number of codebook vectors.", json_schema_extra={"aliases": ["n-embeddings"]})
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout inside residual blocks (training only).")

    @property
    def stride(self) -> int:
        return 2**self.downsample_layers
