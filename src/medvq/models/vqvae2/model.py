"""VQ-VAE-2 (Razavi, van den Oord & Vinyals 2019): a two-level hierarchy of codes in one file.

    x ──encoder_bottom──> h_b (bottom grid) ──encoder_top──> top latents z_t (top grid)
    z_t ──quantizer_top──> e_t ──decoder_top──> decoded top (bottom grid)
    [h_b, decoded top] ──1x1 conv──> bottom latents z_b ──quantizer_bottom──> e_b
    [upsampled e_t, e_b] ──decoder──> x̂

The top codes hold the coarse layout; the bottom quantizer sees the decoded top next to the bottom
features, so the bottom codes only have to add what the top level did not explain. Both levels use the
shared EMA vector quantizer (``medvq.models.quantizer``). Inputs are single-channel images in [0, 1],
the same in training and inference. With ``perceptual_map`` the model also holds the VQ-VAE's frozen
ImageNet features for the ``perceptual`` map. Knows nothing of files, CLIs or Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvq.models.quantizer import QuantizerOutput, VectorQuantizer
from medvq.models.vqvae.config import VQVAEConfig
from medvq.models.vqvae.model import perceptual_features, residual_stack
from medvq.models.vqvae2.config import VQVAE2Config
from medvq.models.inputs import check_images


@dataclass
class VQVAE2Output:
    reconstruction: torch.Tensor  # (B, C, H, W)
    loss: torch.Tensor  # total: reconstruction MSE + commitment of both levels
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor  # top + bottom
    top: QuantizerOutput  # indices (B, H/s, W/s), s = config.stride
    bottom: QuantizerOutput  # indices (B, H/sb, W/sb), sb = config.bottom_stride


def downsampler(in_channels: int, width: int, layers: int, c: VQVAE2Config) -> nn.Sequential:
    """``layers`` stride-2 convolutions (widths growing to ``width``), then a residual stack. (B, in, H, W) -> (B, width, H/2^layers, W/2^layers)."""
    modules: list[nn.Module] = []
    previous = in_channels
    for i in range(layers):
        w = max(width // 2 ** (layers - 1 - i), 8)
        modules += [nn.Conv2d(previous, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        previous = w
    modules += [nn.Conv2d(previous, width, 3, padding=1), residual_stack(width, c.residual_channels, c.residual_layers, c.dropout)]
    return nn.Sequential(*modules)


def upsample_by_two(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """(B, in, h, w) -> (B, out, 2h, 2w): a transposed convolution, or a nearest-neighbour resize then a 3x3 convolution
    (each output pixel then sees the same kernel, so flat inputs give flat outputs; Odena et al. 2016)."""
    if mode == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1))
    return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)


def upsampler(in_channels: int, out_channels: int, layers: int, c: VQVAE2Config) -> nn.Sequential:
    """Residual stack, then ``layers`` stride-2 upsampling steps. (B, in, h, w) -> (B, out, h*2^layers, w*2^layers)."""
    h = c.hidden_channels
    modules: list[nn.Module] = [nn.Conv2d(in_channels, h, 3, padding=1), residual_stack(h, c.residual_channels, c.residual_layers, c.dropout)]
    previous = h
    for i in range(layers):
        last = i == layers - 1
        w = out_channels if last else max(h // 2 ** (i + 1), 8)
        modules.append(upsample_by_two(previous, w, c.upsampling))
        if not last:
            modules += [nn.BatchNorm2d(w), nn.ReLU()]
        previous = w
    return nn.Sequential(*modules)


class VQVAE2(nn.Module):
    def __init__(self, config: VQVAE2Config):
        super().__init__()
        self.config = c = config
        h, d = c.hidden_channels, c.embedding_dim
        self.encoder_bottom = downsampler(c.in_channels, h, c.bottom_downsample_layers, c)
        self.encoder_top = downsampler(h, h, c.top_downsample_layers, c)
        self.pre_quantize_top = nn.Conv2d(h, d, 1)
        self.quantizer_top = VectorQuantizer.from_config(c, dim=d, codebook_size=c.codebook_size_top)
        self.decoder_top = upsampler(d, d, c.top_downsample_layers, c)
        self.pre_quantize_bottom = nn.Conv2d(h + d, d, 1)
        self.quantizer_bottom = VectorQuantizer.from_config(c, dim=d, codebook_size=c.codebook_size_bottom)
        ups: list[nn.Module] = []
        for i in range(c.top_downsample_layers):
            ups.append(upsample_by_two(d, d, c.upsampling))
            if i < c.top_downsample_layers - 1:
                ups.append(nn.ReLU())
        self.upsample_top = nn.Sequential(*ups)
        self.decoder = upsampler(2 * d, c.in_channels, c.bottom_downsample_layers, c)
        self.features = perceptual_features(c)

    @property
    def stride(self) -> int:
        return self.config.stride

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.config.in_channels, self.stride)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> bottom features (B, hidden, H/sb, W/sb) and top latents (B, D, H/s, W/s)."""
        self.check_input(x)
        bottom_features = self.encoder_bottom(x)
        return bottom_features, self.pre_quantize_top(self.encoder_top(bottom_features))

    def quantize(self, bottom_features: torch.Tensor, top_latents: torch.Tensor) -> tuple[QuantizerOutput, QuantizerOutput]:
        """Quantize the top, then the bottom conditioned on the decoded top. -> (top, bottom)."""
        top = self.quantizer_top(top_latents)
        decoded_top = self.decoder_top(top.quantized)  # (B, D, H/sb, W/sb)
        bottom_latents = self.pre_quantize_bottom(torch.cat([bottom_features, decoded_top.to(bottom_features.dtype)], dim=1))
        return top, self.quantizer_bottom(bottom_latents)

    def decode(self, top_quantized: torch.Tensor, bottom_quantized: torch.Tensor) -> torch.Tensor:
        """Codebook vectors (B, D, H/s, W/s) and (B, D, H/sb, W/sb) -> images (B, C, H, W)."""
        up = self.upsample_top(top_quantized)  # (B, D, H/sb, W/sb)
        return self.decoder(torch.cat([up, bottom_quantized.to(up.dtype)], dim=1))

    def decode_codes(self, top_indices: torch.Tensor, bottom_indices: torch.Tensor) -> torch.Tensor:
        """Code maps (B, H/s, W/s) and (B, H/sb, W/sb) -> images (B, C, H, W)."""
        return self.decode(self.quantizer_top.lookup(top_indices), self.quantizer_bottom.lookup(bottom_indices))

    def forward(self, x: torch.Tensor) -> VQVAE2Output:
        top, bottom = self.quantize(*self.encode(x))
        reconstruction = self.decode(top.quantized, bottom.quantized)
        reconstruction_loss = F.mse_loss(reconstruction.float(), x.float())
        commitment = top.loss + bottom.loss
        return VQVAE2Output(
            reconstruction=reconstruction,
            loss=reconstruction_loss + commitment,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=commitment,
            top=top,
            bottom=bottom,
        )


# --- code budget ------------------------------------------------------------------------------
def code_bits(config: VQVAE2Config | VQVAEConfig, image_size: int) -> float:
    """Bits in the code maps of one image_size x image_size image: sum over levels of positions * log2(K)."""
    if isinstance(config, VQVAE2Config):
        bottom = (image_size // config.bottom_stride) ** 2 * math.log2(config.codebook_size_bottom)
        return bottom + (image_size // config.stride) ** 2 * math.log2(config.codebook_size_top)
    return (image_size // config.stride) ** 2 * math.log2(config.codebook_size)


def equal_budget_vqvae(config: VQVAE2Config) -> VQVAEConfig:
    """The single-level VQ-VAE with the bottom level's grid and the same code bits per image.

    Same widths and depths; the codebook grows to K = K_bottom * K_top ** (1 / 4**top_downsample_layers),
    rounded, which carries the top level's bits on the bottom grid (512 and 512 codes -> 2435 codes).
    """
    size = config.codebook_size_bottom * config.codebook_size_top ** (1 / 4**config.top_downsample_layers)
    shared = config.model_dump(include=set(VQVAEConfig.model_fields))  # widths, depths, codebook settings, dropout
    return VQVAEConfig(**shared, downsample_layers=config.bottom_downsample_layers, codebook_size=int(round(size)))


def build_model(config: VQVAE2Config) -> VQVAE2:
    """The network of a config: this folder's entry point for the registry (``Method.build_model``)."""
    return VQVAE2(config)
