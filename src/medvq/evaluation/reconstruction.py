"""Reconstruction quality as plain functions: SSIM, PSNR and MSE per image (torchmetrics), and their summary.

Model inputs lie in [0, 1] in training and inference alike, so ``data_range`` is 1.0: SSIM's stability
constants and PSNR's peak are set by the range the intensities really have. Passing images outside
[0, data_range] is an error rather than a silently wrong SSIM. Reconstructions are clipped to the same
range before comparison (what a viewer would display). SSIM uses an 11-pixel Gaussian window (sigma 1.5),
the standard of Wang et al. 2004.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

DATA_RANGE = 1.0


def _check(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape != reconstructions.shape or images.ndim != 4:
        raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} must both be (B, C, H, W)")
    images = images.float()
    low, high = float(images.min()), float(images.max())
    if low < -1e-4 or high > data_range + 1e-4:
        raise ValueError(f"images span [{low:.3g}, {high:.3g}], outside the data range [0, {data_range:g}] the metrics assume")
    return reconstructions.float().clamp(0.0, data_range), images


def ssim_per_image(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B,) SSIM of each image (mean over its SSIM map), in fp32 under any autocast."""
    preds, target = _check(reconstructions, images, data_range)
    with torch.autocast(device_type=preds.device.type, enabled=False):
        return structural_similarity_index_measure(preds, target, data_range=data_range, reduction="none").reshape(-1)


def psnr_per_image(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B,) PSNR in dB (inf for a perfect reconstruction)."""
    preds, target = _check(reconstructions, images, data_range)
    with torch.autocast(device_type=preds.device.type, enabled=False):
        return peak_signal_noise_ratio(preds, target, data_range=data_range, reduction="none", dim=(1, 2, 3)).reshape(-1)


def mse_per_image(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B,) mean squared error."""
    preds, target = _check(reconstructions, images, data_range)
    return (preds - target).pow(2).flatten(1).mean(dim=1)


def reconstruction_metrics(
    reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Per-image ``ssim``, ``psnr`` and ``mse`` arrays (N,), computed in batches."""
    out: dict[str, list[torch.Tensor]] = {"ssim": [], "psnr": [], "mse": []}
    for start in range(0, len(images), batch_size):
        r, x = reconstructions[start : start + batch_size], images[start : start + batch_size]
        out["ssim"].append(ssim_per_image(r, x, data_range))
        out["psnr"].append(psnr_per_image(r, x, data_range))
        out["mse"].append(mse_per_image(r, x, data_range))
    return {k: torch.cat(v).double().numpy() if v else np.zeros(0) for k, v in out.items()}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def summarize(per_image: dict[str, np.ndarray], groups: list[str] | None = None) -> dict:
    """Means and standard deviations (JSON-ready), overall and, given ``groups`` (one label per image), per group."""

    def stats(keep: np.ndarray) -> dict:
        row: dict = {"n_images": int(keep.sum())}
        for name, values in per_image.items():
            v = values[keep]
            finite = v[np.isfinite(v)]
            row[name] = _finite(np.mean(v)) if len(v) else None
            row[f"{name}_std"] = _finite(np.std(finite)) if len(finite) else None
        return row

    n = len(next(iter(per_image.values())))
    result = {"data_range": DATA_RANGE, **stats(np.ones(n, bool))}
    if groups is not None and len(set(groups)) > 1:
        labels = np.array(groups)
        result["by_class"] = {g: stats(labels == g) for g in sorted(set(groups))}
    return result


def spread_indices(values: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices spread evenly from the lowest to the highest value (a gallery from worst to best)."""
    if len(values) == 0 or n <= 0:
        return []
    order = np.argsort(values, kind="stable")
    picks = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
    return order[picks].tolist()
