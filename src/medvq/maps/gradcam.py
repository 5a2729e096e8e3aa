"""Grad-CAM (Selvaraju et al. 2017) for convolutional layers and for ViT blocks.

For activations A (B, K, h, w) of a layer and the gradients dy/dA of the explained output y (one scalar per
image), each channel is weighted by its spatially averaged gradient and the weighted sum is rectified:

    alpha_k = mean_ij dy/dA_kij,    map = ReLU(sum_k alpha_k A_k)        (B, 1, h, w)

A ViT block gives tokens (B, N, D); the prefix (CLS) tokens are dropped and the remaining N - prefix
tokens are laid back onto their patch grid (h, w), derived from the token count and the image's aspect
ratio, as (B, D, h, w). Each image's map depends only on its own gradients, so batches of any size work
(models in eval mode). Maps are float32 and upsampled bilinearly to the image size on request.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medvq.maps.rollout import patch_grid


def tokens_to_grid(
    tokens: torch.Tensor, prefix_tokens: int = 1, image_size: tuple[int, int] | None = None, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, h, w) patch-token grid (row-major patches, prefix tokens dropped)."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, D), got {tuple(tokens.shape)}")
    patches = tokens[:, prefix_tokens:]
    h, w = grid or patch_grid(patches.shape[1], image_size)
    if h * w != patches.shape[1]:
        raise ValueError(f"grid {h}x{w} does not hold {patches.shape[1]} patch tokens")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Activations and their gradients (B, K, h, w) -> Grad-CAM (B, 1, h, w), or (B, 1, *size) bilinear."""
    if activations.ndim != 4 or activations.shape != gradients.shape:
        raise ValueError(f"activations {tuple(activations.shape)} and gradients {tuple(gradients.shape)} must both be (B, K, h, w)")
    a, g = activations.float(), gradients.float()
    weights = g.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = (weights * a).sum(dim=1, keepdim=True).clamp(min=0)  # (B, 1, h, w)
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    return cam


class LayerCapture:
    """Context manager keeping the output of one submodule from the next forward pass (graph attached)."""

    def __init__(self, model: nn.Module, layer: str | nn.Module):
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n][-6:]
                raise ValueError(f"model has no layer '{layer}' (e.g. {', '.join(names)})") from None
        self.layer = layer
        self.output: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, args, output) -> None:
        self.output = output[0] if isinstance(output, tuple) else output

    def __enter__(self) -> "LayerCapture":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def layer_map(activations: torch.Tensor, gradients: torch.Tensor, *, prefix_tokens: int, image_size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM of a captured layer, tokens or feature maps alike -> (B, 1, H, W) at the image size."""
    if activations.ndim == 3:  # transformer tokens
        try:
            patch_grid(activations.shape[1] - prefix_tokens, image_size)
        except ValueError:  # a layer before the prefix tokens are added (e.g. the patch embedding) has none
            prefix_tokens = 0
        activations = tokens_to_grid(activations, prefix_tokens, image_size)
        gradients = tokens_to_grid(gradients, prefix_tokens, image_size)
    if not gradients.any():
        raise ValueError(
            "the chosen layer does not influence the explained output (all its gradients are zero); "
            "for a ViT use the input of the last block (blocks.<last>.norm1), not its output"
        )
    return grad_cam(activations, gradients, image_size)


class GradCAM:
    """Grad-CAM of one layer of any model: ``GradCAM(model, "layer4")(images, target)`` -> (B, 1, H, W).

    ``target`` maps the model's output to one scalar per image (e.g. ``lambda out: out.logits[:, 1]``).
    Gradients are taken with torch.autograd.grad, so parameter .grad fields are left untouched.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module, prefix_tokens: int = 0):
        self.model = model
        self.layer = layer
        self.prefix_tokens = prefix_tokens

    def __call__(self, images: torch.Tensor, target: Callable[[object], torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad(), LayerCapture(self.model, self.layer) as capture:
            out = self.model(images)
            score = target(out)
            if capture.output is None:
                raise ValueError("the chosen layer was not used in the forward pass")
            (grads,) = torch.autograd.grad(score.sum(), capture.output)
        return layer_map(capture.output.detach(), grads, prefix_tokens=self.prefix_tokens, image_size=tuple(images.shape[-2:]))
