"""Variants of the VQ-VAE's perceptual map on one trained run: which features, which comparison.

    python benchmarks/perceptual_variants.py runs/vqvae --parts val          # choose on the validation patients
    python benchmarks/perceptual_variants.py runs/vqvae --parts val,test     # and look at the test patients

For the run's validation (normal + abnormal) or test scans: image AUROC, d' and per-class AUROC of the
run's own maps and of scan-vs-reconstruction comparisons in frozen ImageNet EfficientNet-Lite0 features,
for several stage sets and local aggregations (``s23p1``: stages 2 + 3, no aggregation, the map's
definition), each as the squared feature distance (``feat_``) and as 1 - cosine similarity (``cos_``).
Maps are smoothed and reduced (top 1 %) as the run's calibration does; its standardisation is one affine
map per map, which changes no ranking, so it is left out. One thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from medvq.data.dataset import ScanDataset
from medvq.data.sample import Sample
from medvq.detector import Detector
from medvq.maps.smoothing import gaussian_smooth
from medvq.models.backbones.config import PatchFeatureConfig
from medvq.models.backbones.patch_features import PatchFeatures
from medvq.scoring.reduce import reduce_map

VARIANTS = (((2, 3), 3), ((1, 2), 3), ((2,), 3), ((2, 3), 1), ((3,), 3))  # (stages, local aggregation)
SPLIT_PARTS = {"val": ("val", "val_abnormal"), "test": ("test",)}


def feature_networks() -> dict[str, PatchFeatures]:
    networks = {}
    for stages, patch in VARIANTS:
        net = PatchFeatures(PatchFeatureConfig(feature_stages=list(stages), patch_size=patch))
        net.load_imagenet()
        networks[f"s{''.join(map(str, stages))}p{patch}"] = net
    return networks


def variant_maps(detector: Detector, networks: dict[str, PatchFeatures], images: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """The run's raw maps and every variant, (B, S, S) each, smoothed as the run smooths."""
    prediction = detector.predict(images, valid)
    reconstruction = prediction.reconstruction.clamp(0, 1)
    size, sigma = tuple(images.shape[-2:]), detector.smoothing_sigma
    up = lambda m: gaussian_smooth(F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0], sigma)
    maps = {name: m.squeeze(1) for name, m in prediction.raw_maps.items()}
    for name, net in networks.items():
        of_image, of_reconstruction = net.embed(images), net.embed(reconstruction)
        maps[f"feat_{name}"] = up(((of_image - of_reconstruction) ** 2).sum(1, keepdim=True))
        maps[f"cos_{name}"] = up(1 - F.cosine_similarity(of_image, of_reconstruction, dim=1)[:, None])
    return maps


def d_prime(normal: np.ndarray, abnormal: np.ndarray) -> float:
    return float((abnormal.mean() - normal.mean()) / np.sqrt(0.5 * (normal.var() + abnormal.var())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--parts", default="val", help="comma-separated: val, test")
    args = ap.parse_args()
    torch.set_num_threads(1)
    detector = Detector.load(args.run)
    split = json.loads((args.run / "split.json").read_text())["splits"]
    networks = feature_networks()
    for part in args.parts.split(","):
        samples = [Sample(path=Path(s["path"]), label=s["label"], patient_id=s["patient_id"]) for name in SPLIT_PARTS[part] for s in split[name]]
        abnormal = np.array([s.label != "NORMAL" for s in samples])
        data = ScanDataset(samples, detector.preprocessor, load_masks=False)
        scores: dict[str, list[np.ndarray]] = {}
        for batch in data.batches(16):
            for name, m in variant_maps(detector, networks, batch.image.float(), batch.valid).items():
                scores.setdefault(name, []).append(reduce_map(m.numpy(), "topk", detector.config.score.topk_fraction, batch.valid[:, 0].numpy()))
        print(f"== {part}: {abnormal.sum()} abnormal / {(~abnormal).sum()} normal scans")
        for name, parts in scores.items():
            s = np.concatenate(parts)
            per_class = []
            for label in ("CNV", "DME", "DRUSEN"):
                of_class = np.array([x.label == label for x in samples])
                if of_class.any():
                    per_class.append(f"{label} {roc_auc_score(of_class[~abnormal | of_class], s[~abnormal | of_class]):.3f}")
            print(f"{name:14s} AUROC {roc_auc_score(abnormal, s):.3f}  d' {d_prime(s[~abnormal], s[abnormal]):.2f}  " + "  ".join(per_class))


if __name__ == "__main__":
    main()
