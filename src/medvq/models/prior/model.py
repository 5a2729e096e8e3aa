"""Latent priors over a frozen VQ-VAE's code maps: the whole network in one file.

Both kinds predict, at every latent position (i, j), a distribution over the K codes of a frozen VQ-VAE;
the target is the code k*(i, j) the VQ-VAE itself picks for the image. Trained on normal images only, the
negative log-likelihood -log p(k*(i, j) | context) is an anomaly map.

- ``fusion``: a frozen image encoder (ImageNet EfficientNet-Lite0 stages, or the ViT of a trained
  classifier run) -> spatial features resampled to the latent grid (area when shrinking, bilinear when
  enlarging) -> a small trainable convolutional net -> logits at every position. The seed's variant
  (``fusion_features: cls``: one global vector -> linear -> transposed convolutions) is kept for comparison.
- ``autoregressive``: a causal transformer over the raster-ordered code map (nanoGPT-style). Input at
  position t is a learned start token (t = 0) or code t-1, plus the learned position embedding of t; the
  output at t predicts code t. A single teacher-forced pass gives every position's likelihood; sampling
  reuses cached keys and values, one token per step.

The frozen parts (VQ-VAE, encoder) stay in eval mode whatever ``train()`` is called with and never get
gradients; their weights are saved with the prior, so a prior run loads on its own. Knows nothing of
files, CLIs or Lightning.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medvq.maps.nll import code_nll
from medvq.models.classifier.model import Classifier
from medvq.models.backbones.config import STAGE_CHANNELS
from medvq.models.backbones.efficientnet_lite0 import LiteFeatures
from medvq.models.prior.config import LITE0, PriorConfig
from medvq.models.vqvae.model import VQVAE

def code_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) logits -> log-probabilities over codes, fp32."""
    return F.log_softmax(logits.float(), dim=1)


def prior_loss(logits: torch.Tensor, codes: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over every position; the class (code) axis is dim 1, as F.cross_entropy expects.
    The one loss of training and validation."""
    return F.cross_entropy(logits.float(), codes.long(), label_smoothing=label_smoothing)


# --- frozen encoder for the fusion prior ----------------------------------------------------------------
class FrozenEncoder(nn.Module):
    """Images (B, 1, S, S) in [0, 1] -> feature maps [(B, C_i, h_i, w_i)] and a global vector (B, C_g)."""

    def __init__(self, c: PriorConfig):
        super().__init__()
        self.kind = "lite" if c.encoder == LITE0 else "vit"
        if self.kind == "lite":
            self.features = LiteFeatures(1, c.encoder_stages)  # ImageNet normalisation folded into the stem when loaded
            self.channels = [STAGE_CHANNELS[s - 1] for s in c.encoder_stages]
            self.global_dim = self.channels[-1]
        else:
            if c.encoder_config is None or c.encoder_config.arch != "vit":
                raise ValueError("a vit-run encoder needs the ViT classifier's config (encoder_config with arch vit)")
            self.vit = Classifier(c.encoder_config)
            self.channels = [c.encoder_config.embed_dim]
            self.global_dim = c.encoder_config.embed_dim
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.kind == "lite":
            maps = self.features(x)
            return maps, maps[-1].mean(dim=(2, 3))
        net = self.vit.net
        self.vit.check_input(x)
        tokens, grid = net.patch_embed(x)  # (B, h*w, D)
        t = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + net.position_embedding(grid)
        for block in net.blocks:
            t, _ = block(t)
        t = net.norm(t)  # (B, 1 + h*w, D)
        patches = t[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)  # (B, D, h, w) patch tokens on their grid
        return [patches], t[:, 0]


def resample(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w): area averaging when shrinking, bilinear when enlarging."""
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    if features.shape[-2] >= grid[0] and features.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(features, grid)
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


class ConvBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.GELU(), nn.Dropout2d(dropout),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class FusionHead(nn.Module):
    """Trainable part of the fusion prior: encoder features -> code logits (B, K, h, w)."""

    SEED_SIDE = 4  # cls mode: the linear layer makes a (width, 4, 4) map

    def __init__(self, c: PriorConfig, in_channels: list[int], global_dim: int):
        super().__init__()
        self.mode = c.fusion_features
        width, k = c.fusion_channels, c.codebook_size
        if self.mode == "spatial":
            self.inp = nn.Sequential(nn.Conv2d(sum(in_channels), width, 1), nn.GELU())
        else:  # the seed's variant: global vector -> linear -> (width, 4, 4) -> stride-2 transposed convolutions -> latent grid
            if not c.latent_grid:
                raise ValueError("fusion_features 'cls' needs latent_grid (h, w)")
            steps = max(0, math.ceil(math.log2(max(c.latent_grid) / self.SEED_SIDE)))
            self.linear = nn.Linear(global_dim, width * self.SEED_SIDE**2)
            self.up = nn.Sequential(*[m for _ in range(steps) for m in (nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU())])
        self.blocks = nn.Sequential(*[ConvBlock(width, c.dropout) for _ in range(c.fusion_blocks)])
        self.out = nn.Sequential(nn.GELU(), nn.Conv2d(width, k, 1))
        self.width = width
        nn.init.zeros_(self.out[1].weight)  # start from the uniform distribution over codes (loss = log K)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, features: list[torch.Tensor], global_vector: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.mode == "spatial":
            x = self.inp(torch.cat([resample(f.float(), grid) for f in features], dim=1))  # (B, width, h, w)
        else:
            x = self.linear(global_vector.float()).view(-1, self.width, self.SEED_SIDE, self.SEED_SIDE)
            x = resample(self.up(x), grid)  # (B, width, h, w)
        return self.out(self.blocks(x))


# --- autoregressive transformer ------------------------------------------------------------------------
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, d_h)
        if past is not None:  # cached keys/values of earlier positions: the new tokens see all of them
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        causal = past is None and t > 1
        if past is not None and t > 1:
            raise ValueError("with a cache, feed one token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y)), (k, v)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, past=None):
        a, kv = self.attn(self.ln1(x), past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class CodeTransformer(nn.Module):
    """Causal transformer over raster-ordered code maps of a fixed latent grid."""

    def __init__(self, c: PriorConfig):
        super().__init__()
        if not c.latent_grid or len(c.latent_grid) != 2:
            raise ValueError("an autoregressive prior needs latent_grid (h, w)")
        self.grid = (int(c.latent_grid[0]), int(c.latent_grid[1]))
        self.length = self.grid[0] * self.grid[1]
        self.codebook_size = c.codebook_size
        self.start = c.codebook_size  # token id of the learned start token
        self.tok_emb = nn.Embedding(c.codebook_size + 1, c.embed_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.length, c.embed_dim))  # row t: input position t (row 0: the start token)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([TransformerBlock(c.embed_dim, c.heads, c.dropout) for _ in range(c.layers)])
        self.ln_f = nn.LayerNorm(c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.codebook_size)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(
                f"code maps of shape (B, {self.grid[0]}, {self.grid[1]}) expected, got {tuple(codes.shape)}: "
                "the autoregressive prior covers the latent grid of its training image size"
            )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: code maps (B, h, w) -> logits (B, K, h, w); logits at t see codes 0..t-1 only."""
        self.check_codes(codes)
        b = codes.shape[0]
        seq = codes.reshape(b, self.length).long()  # raster order
        inp = torch.cat([torch.full((b, 1), self.start, dtype=torch.long, device=codes.device), seq[:, :-1]], dim=1)  # (B, T)
        x = self.drop(self.tok_emb(inp) + self.pos_emb)  # (B, T, D)
        for block in self.blocks:
            x, _ = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, K)
        return logits.transpose(1, 2).reshape(b, self.codebook_size, *self.grid)

    def step(self, token: torch.Tensor, position: int, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """One token (B,) at input position t with the cache of positions < t -> logits (B, K) for code t, new cache."""
        x = self.tok_emb(token[:, None]) + self.pos_emb[:, position : position + 1]
        new: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache is not None else None)
            new.append(kv)
        return self.head(self.ln_f(x))[:, 0], new

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Draw n code maps (n, h, w), one token per step with cached keys and values.

        ``generator``: one for the batch, or one per image (then each image's draw does not depend on the
        batch it is drawn in)."""
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        device = self.pos_emb.device
        token = torch.full((n,), self.start, dtype=torch.long, device=device)
        cache: KVCache | None = None
        out = torch.empty(n, self.length, dtype=torch.long, device=device)
        for t in range(self.length):
            logits, cache = self.step(token, t, cache)
            logits = logits.float() / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if isinstance(generator, list):
                probs = probs.cpu()
                token = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generator)]).to(device)
            else:
                token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
            out[:, t] = token
            if on_step is not None:
                on_step(t + 1)
        return out.view(n, *self.grid)


# --- the prior ----------------------------------------------------------------------------------------------
class LatentPrior(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        if config.vqvae_config is None:
            raise ValueError("the prior has no frozen VQ-VAE: train it with --vqvae RUNDIR (vqvae_config is filled in from that run)")
        self.config = config
        self.vqvae = VQVAE(config.vqvae_config)
        self.vqvae.requires_grad_(False)
        if config.kind == "fusion":
            self.encoder: FrozenEncoder | None = FrozenEncoder(config)
            self.head: nn.Module = FusionHead(config, self.encoder.channels, self.encoder.global_dim)
        else:
            self.encoder = None
            self.head = CodeTransformer(config)
        self.train(True)

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.vqvae, self.encoder) if m is not None]

    def train(self, mode: bool = True) -> "LatentPrior":
        """Only the head trains: the VQ-VAE and the encoder stay in eval mode (no dropout, BatchNorm running statistics)."""
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad]

    @torch.no_grad()
    def codes(self, images: torch.Tensor):
        """Images (B, 1, S, S) in [0, 1] -> the frozen VQ-VAE's quantizer output (indices (B, h, w), latents, ...)."""
        return self.vqvae.quantize(self.vqvae.encode(images))

    def logits(self, images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, h, w) for the code maps ``codes`` (B, h, w) of ``images``, in one pass."""
        if self.config.kind == "autoregressive":
            return self.head(codes)
        with torch.no_grad():
            features, global_vector = self.encoder(images)
        return self.head(features, global_vector, tuple(codes.shape[-2:]))

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, codes) of a batch; the same function for training and validation."""
        codes = self.codes(images).indices
        logits = self.logits(images, codes)
        return prior_loss(logits, codes, self.config.label_smoothing), logits, codes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> NLL of the VQ-VAE's codes (B, h, w) under the prior."""
        codes = self.codes(images).indices
        return code_nll(self.logits(images, codes), codes)

    @torch.no_grad()
    def sample(self, n: int, **kwargs) -> torch.Tensor:
        if self.config.kind != "autoregressive":
            raise ValueError("a fusion prior predicts codes from an image and cannot draw new ones; sample from an autoregressive prior")
        return self.head.sample(n, **kwargs)

    @property
    def sample_length(self) -> int:
        """Tokens drawn per image (one step each)."""
        return self.head.length

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code maps (B, h, w) -> images (B, 1, S, S), by the frozen VQ-VAE."""
        return self.vqvae.decode_codes(codes)


def build_model(config: PriorConfig) -> LatentPrior:
    """The network of a config: this folder's entry point for the registry (``Method.build_model``)."""
    return LatentPrior(config)
