"""VQ-VAE (van den Oord et al. 2017): the whole network in one file.

Encoder (strided convolutions + residual stack) -> shared EMA vector quantizer -> decoder mirrored.
Inputs are single-channel images in [0, 1] (see ``medvq.data.preprocess``); the same range is used in
training and inference. With ``perceptual_map`` the model also holds the frozen ImageNet EfficientNet-Lite0
stages that the ``perceptual`` map compares scan and reconstruction in (``features``; never trained).
Knows nothing of files, CLIs or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvq.models.backbones.config import PatchFeatureConfig
from medvq.models.backbones.patch_features import PatchFeatures
from medvq.models.quantizer import QuantizerOutput, VectorQuantizer
from medvq.models.vqvae.config import VQAutoencoderConfig, VQVAEConfig
from medvq.models.inputs import check_images


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W)
    loss: torch.Tensor  # total: reconstruction MSE + commitment
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor
    quantizer: QuantizerOutput


def perceptual_features(config: VQAutoencoderConfig) -> PatchFeatures | None:
    """The frozen network of the ``perceptual`` map (PatchCore's default features), or None without the map.
    Held as ``features``, as PatchCore holds it, so the out-of-distribution guard can pool its stages."""
    return PatchFeatures(PatchFeatureConfig(in_channels=config.in_channels)) if config.perceptual_map else None


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def residual_stack(channels: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(channels, hidden, dropout) for _ in range(layers)], nn.ReLU())


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        h = c.hidden_channels
        widths = [max(h // 2 ** (c.downsample_layers - 1 - i), 8) for i in range(c.downsample_layers)]
        layers: list[nn.Module] = []
        previous = c.in_channels
        for i, width in enumerate(widths):
            layers.append(nn.Conv2d(previous, width, 4, stride=2, padding=1))
            layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            previous = width
        layers.append(nn.Conv2d(previous, h, 3, padding=1))
        layers.append(residual_stack(h, c.residual_channels, c.residual_layers, c.dropout))
        layers.append(nn.Conv2d(h, c.embedding_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, D, H/stride, W/stride)


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        h = c.hidden_channels
        layers: list[nn.Module] = [
            nn.Conv2d(c.embedding_dim, h, 3, padding=1),
            residual_stack(h, c.residual_channels, c.residual_layers, c.dropout),
        ]
        previous = h
        for i in range(c.downsample_layers):
            last = i == c.downsample_layers - 1
            width = c.in_channels if last else max(h // 2 ** (i + 1), 8)
            layers.append(nn.ConvTranspose2d(previous, width, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
            previous = width
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer.from_config(config, dim=config.embedding_dim, codebook_size=config.codebook_size)
        self.decoder = Decoder(config)
        self.features = perceptual_features(config)

    @property
    def stride(self) -> int:
        return self.config.stride

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.config.in_channels, self.stride)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> continuous latents z_e (B, D, H/s, W/s)."""
        self.check_input(x)
        return self.encoder(x)

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(latents)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized)

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code maps (B, h, w) -> images (B, C, H, W)."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        q = self.quantize(self.encode(x))
        reconstruction = self.decode(q.quantized)
        reconstruction_loss = F.mse_loss(reconstruction.float(), x.float())
        return VQVAEOutput(
            reconstruction=reconstruction,
            loss=reconstruction_loss + q.loss,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=q.loss,
            quantizer=q,
        )


def build_model(config: VQVAEConfig) -> VQVAE:
    """The network of a config: this folder's entry point for the registry (``Method.build_model``)."""
    return VQVAE(config)
