"""Fitting PatchCore: no gradients, one pass over the training images.

ImageNet weights into the frozen backbone -> patch features of every training image, batch by batch ->
``StreamingCoreset`` -> memory bank. Memory is bounded by one coreset chunk, one batch and the bank
itself, whatever the number of training images. The training engine calls ``fit`` through
``Method.fit`` and writes the fitted model like any other (model/best.safetensors).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.console import Console

from medvq.data.dataset import ScanDataset
from medvq.models.patchcore.coreset import StreamingCoreset
from medvq.models.patchcore.model import PatchCore, PatchCoreConfig
from medvq.progress import progress_bar

def fit(
    config,
    train_set: ScanDataset,
    *,
    device: torch.device | str = "cpu",
    console: Console | None = None,
    progress: bool = False,
) -> tuple[PatchCore, dict[str, Any]]:
    """Build the memory bank from the training images of ``train_set`` (a RunConfig with a PatchCoreConfig model).

    Returns the fitted model (on the CPU) and a summary (counts and seconds per stage) for RUN/fit.json.
    """
    c: PatchCoreConfig = config.model
    device = torch.device(device)
    model = PatchCore(c)
    weights = model.features.load_imagenet()
    model.to(device)
    sampler = StreamingCoreset(
        c.feature_dim, c.coreset_ratio, c.coreset_chunk_patches, c.coreset_projection_dim, seed=config.train.seed, device=device
    )
    feature_s = coreset_s = 0.0
    batch_size = config.train.batch_size
    grid = None
    with progress_bar(range(0, len(train_set), batch_size), "memory bank" if progress else None) as starts:
        for start in starts:
            batch = train_set.batch(range(start, min(start + batch_size, len(train_set))))
            t0 = time.perf_counter()
            feats = model.embed(batch.image.to(device))  # (B, D, h, w)
            grid = tuple(feats.shape[-2:])
            patches = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (B*h*w, D)
            t1 = time.perf_counter()
            sampler.add(patches)
            t2 = time.perf_counter()
            feature_s, coreset_s = feature_s + t1 - t0, coreset_s + t2 - t1
    t0 = time.perf_counter()
    bank = sampler.finish()
    coreset_s += time.perf_counter() - t0
    model.set_memory_bank(bank)
    model.cpu()
    summary = {
        "backbone_weights": str(weights),
        "train_images": len(train_set),
        "patch_grid": list(grid or ()),
        "patches": sampler.patches_seen,
        "memory_bank": int(bank.shape[0]),
        "feature_dim": int(bank.shape[1]),
        "coreset_chunks": sampler.chunks,
        "feature_seconds": round(feature_s, 3),
        "coreset_seconds": round(coreset_s, 3),
        "memory_bank_mb": round(bank.numel() * 4 / 2**20, 2),
    }
    if console is not None:
        console.print(
            f"memory bank: {summary['memory_bank']} of {summary['patches']} patches ({c.coreset_ratio:g}) x {summary['feature_dim']} dims; "
            f"features {feature_s:.1f}s, coreset {coreset_s:.1f}s"
        )
    return model, summary
