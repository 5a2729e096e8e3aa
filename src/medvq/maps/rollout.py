"""Attention rollout (Abnar & Zuidema 2020), for any batch size and patch grid.

Per layer l, the heads of the attention weights A_l (B, heads, N, N) are fused into one (B, N, N) matrix:
``mean``, ``max`` or ``min`` over heads, or, with gradients, Chefer et al.'s gradient-weighted fusion
``mean_h (dy/dA_h * A_h)^+`` (only attention that raises the explained output counts). Optionally the lowest
``discard_ratio`` share of the fused entries is set to zero, per image, never the CLS->CLS entry. Then the
residual path is added and rows are renormalised:

    Â_l = (A_l + I) / 2,   Â_l <- Â_l / Â_l.sum(-1, keepdim=True),   R = Â_L ... Â_2 Â_1

and the map is the CLS row over the patch tokens, ``R[:, 0, prefix:]``, reshaped to the patch grid.
Everything runs in float32 whatever the dtype of the attention weights.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

HeadFusion = Literal["mean", "max", "min"]


def fuse_heads(attention: torch.Tensor, how: HeadFusion = "mean", gradient: torch.Tensor | None = None) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N). With ``gradient`` (same shape): mean over heads of (gradient * attention)^+."""
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be (B, heads, N, N), got {tuple(attention.shape)}")
    a = attention.float()
    if gradient is not None:
        if gradient.shape != attention.shape:
            raise ValueError(f"gradient {tuple(gradient.shape)} and attention {tuple(attention.shape)} differ in shape")
        return (gradient.float() * a).clamp(min=0).mean(dim=1)
    if how == "mean":
        return a.mean(dim=1)
    if how == "max":
        return a.amax(dim=1)
    if how == "min":
        return a.amin(dim=1)
    raise ValueError(f"head fusion must be 'mean', 'max' or 'min', got {how!r}")


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` share of the N*N entries of each image's (N, N) matrix, never entry [0, 0] (CLS->CLS)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n)
    ranking = flat.clone()
    ranking[:, 0] = float("inf")  # the CLS entry is never among the lowest
    lowest = ranking.topk(k, dim=1, largest=False).indices  # (B, k), per image
    return flat.scatter(1, lowest, 0.0).reshape(b, n, n)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    gradients: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-layer attention (B, heads, N, N), first layer first -> rollout matrix R (B, N, N), rows summing to 1."""
    if not attentions:
        raise ValueError("attention rollout needs the attention weights of at least one layer")
    if gradients is not None and len(gradients) != len(attentions):
        raise ValueError(f"{len(gradients)} gradients for {len(attentions)} attention layers")
    if attentions[0].ndim != 4:
        raise ValueError(f"attention must be (B, heads, N, N), got {tuple(attentions[0].shape)}")
    b, _, n, _ = attentions[0].shape
    eye = torch.eye(n, device=attentions[0].device, dtype=torch.float32)
    rollout = eye.expand(b, n, n)
    for i, attention in enumerate(attentions):
        if attention.shape[0] != b or attention.shape[-1] != n:
            raise ValueError(f"layer {i}: attention {tuple(attention.shape)} does not match the first layer's (B={b}, N={n})")
        fused = fuse_heads(attention, head_fusion, gradients[i] if gradients is not None else None)  # (B, N, N)
        fused = discard_lowest(fused, discard_ratio)
        a = (fused + eye) / 2  # residual connection
        a = a / a.sum(dim=-1, keepdim=True)  # each row a distribution again
        rollout = a @ rollout  # later layers multiply from the left
    return rollout


def patch_grid(n_patches: int, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(h, w) of a patch grid from its token count and the image aspect ratio (square when not given)."""
    height, width = image_size or (1, 1)
    w = max(1, round((n_patches * width / height) ** 0.5))
    h = n_patches // w
    if h * w != n_patches:
        raise ValueError(f"{n_patches} patch tokens do not form a grid with the aspect ratio of a {height}x{width} image")
    return h, w


def rollout_map(
    attentions: Sequence[torch.Tensor],
    *,
    prefix_tokens: int = 1,
    image_size: tuple[int, int] | None = None,
    grid: tuple[int, int] | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    gradients: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention rollout as a map: (B, 1, h, w) on the patch grid, or (B, 1, H, W) bilinear when image_size is given.

    The patch grid is ``grid`` if given, else derived from the token count (N - prefix_tokens) and the
    image's aspect ratio.
    """
    r = attention_rollout(attentions, head_fusion, discard_ratio, gradients)
    cls_row = r[:, 0, prefix_tokens:]  # (B, patches): how much each patch flows into the CLS token
    h, w = grid or patch_grid(cls_row.shape[1], image_size)
    if h * w != cls_row.shape[1]:
        raise ValueError(f"grid {h}x{w} does not hold {cls_row.shape[1]} patch tokens")
    m = cls_row.reshape(-1, 1, h, w)  # row-major patches, as the patch embedding flattens them
    if image_size is not None and (h, w) != tuple(image_size):
        m = F.interpolate(m, size=tuple(image_size), mode="bilinear", align_corners=False)
    return m
