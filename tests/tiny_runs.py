"""Run folders as training leaves them (config.yaml, model/best.safetensors, split.json, calibration.json),
made in a second from a model as built and a few normal scans: for tests of what reads runs, not of training."""

from __future__ import annotations

from pathlib import Path

import torch

from medvq.config import build_config
from medvq.data.dataset import ScanDataset
from medvq.data.samples import Sample
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.models.registry import get_method

MODELS = {
    "vqvae": {"hidden_channels": 16, "residual_channels": 8, "residual_layers": 1, "embedding_dim": 8, "codebook_size": 16, "downsample_layers": 2, "kmeans_init": False},
    "vqvae2": {"hidden_channels": 16, "residual_channels": 8, "residual_layers": 1, "embedding_dim": 8, "codebook_size_top": 16, "codebook_size_bottom": 16, "kmeans_init": False},
    "patchcore": {"feature_stages": [2, 3]},
    "featvq": {"codebook_size": 64, "kmeans_init": False, "prior_layers": 1, "prior_dim": 16, "prior_heads": 2},
}


def make_run(method: str, root: Path, normals: list[Sample], data_root: Path | None = None, image_size: int = 64) -> RunDir:
    """A calibrated run of ``method`` (weights as built; PatchCore's bank and featvq's codebook from the normals' patches)."""
    config = build_config({"method": method, "data": {"image_size": image_size}, "model": MODELS[method]})
    torch.manual_seed(0)
    model = get_method(method).build_model(config.model).eval()
    if getattr(model, "features", None) is not None and method in ("vqvae", "vqvae2"):  # the perceptual map's frozen
        model.features.load_imagenet()  # features, which training loads from ImageNet
    detector = Detector(model, config)
    data = ScanDataset(normals, detector.preprocessor)
    if method == "patchcore":  # a bank of the normals' patches (the fit's coreset is tested in test_patchcore)
        feats = model.embed(data.images.float())
        model.set_memory_bank(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])[::7])
    if method == "featvq":  # a codebook of the normals' patch features, as its k-means initialisation would give
        feats = model.encode(data.images.float())
        patches = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        embed = model.quantizer.vq._codebook.embed  # (1, K, D), the library's buffer
        embed.copy_(patches[torch.randperm(len(patches))[: embed.shape[1]]][None])
    run = RunDir(root)
    run.create()
    run.write_config(config)
    run.save_weights(model, "best")
    if data_root is not None:
        run.write_split(data_root, {"train": [], "val": normals})
    detector.calibrate(data).save(run.calibration)
    return run
