"""Variants of featvq's distance map, scored on a trained run's validation scans without retraining.

    python benchmarks/featvq_distance_variants.py RUN --data DATA [--codebooks 2048,8192]

From the run's training scans (its split.json, read without augmentation) one pass gathers what the variants
need: each code's member count and mean squared distance, the per-dimension spread of its members around it,
the features' global covariance, and every grid position's mean and spread of the distance. Each variant's
grid map then goes through what the Detector does to a map (bilinear upsampling, Gaussian smoothing, the run's
top-k image score; standardisation is affine and changes no AUROC) on the run's validation scans
(``medvq evaluate --split val``'s scans): image AUROC, d' of the image scores, pixel AUROC where masks exist.
``--codebooks``: also k-means codebooks of that size fitted here on a 131,072-patch sample of the training
features (seeded farthest-point first, as training does), before and after one Lloyd step on all of them
(``codebook_refit``). One torch thread.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvq.data.dataset import ScanDataset
from medvq.data.sample import Sample
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.evaluation import metrics as M
from medvq.evaluation.evaluate import select_test_samples
from medvq.maps.smoothing import gaussian_smooth
from medvq.models.quantizer import CodeMeans, kmeans, nearest_rows
from medvq.scoring.reduce import reduce_map


def features_of(detector: Detector, dataset: ScanDataset) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N scans * h * w, D) patch features in raster order, and the grid (h, w)."""
    parts = []
    for batch in dataset.batches(32):
        f = detector.model.encode(batch.image.float())
        parts.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    return torch.cat(parts), tuple(f.shape[-2:])


def nearest_three(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances (N, 3) to the three nearest codes, ascending, and the nearest code (N,)."""
    sq = (codebook * codebook).sum(1)
    tops, idx = [], []
    for block in x.split(8192):
        d = (torch.addmm(sq, block, codebook.T, alpha=-2.0) + (block * block).sum(1, keepdim=True)).clamp_min(0)
        t, i = d.topk(3, dim=1, largest=False)
        tops.append(t)
        idx.append(i[:, 0])
    return torch.cat(tops), torch.cat(idx)


def variants(train: torch.Tensor, val: torch.Tensor, codebook: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Variant name -> per-patch values (N,) on the validation features."""
    k_count, dim = codebook.shape
    d2_train, k_train = nearest_rows(train, codebook)
    count = torch.bincount(k_train, minlength=k_count).double()
    spread = torch.bincount(k_train, weights=d2_train.double(), minlength=k_count)  # sum of member squared distances
    overall = float(spread.sum() / count.sum())
    residual = (train - codebook[k_train]).double()
    spread_dim = torch.zeros(k_count, dim, dtype=torch.float64).index_add_(0, k_train, residual * residual)
    overall_dim = spread_dim.sum(0) / count.sum()
    positions = d2_train.reshape(-1, grid[0] * grid[1]).double()
    position_mean, position_sd = positions.mean(0), positions.std(0)
    mean = train.double().mean(0)
    cov = torch.cov((train.double() - mean).T)

    top, k = nearest_three(val, codebook)
    d2 = top[:, 0]
    r = (val - codebook[k]).double()
    n_pos = len(val) // (grid[0] * grid[1])
    out = {"d2 (the map)": d2, "d": d2.sqrt(), "mean of 2 nearest": top[:, :2].mean(1), "mean of 3 nearest": top.mean(1)}
    for m in (0, 100, 1000):  # each code's mean squared member distance, shrunk towards the overall one by m patches
        var = torch.where(count > 0, (spread + m * overall) / (count + m).clamp_min(1), torch.tensor(overall, dtype=torch.float64))  # a code without members: the overall spread
        var = var.clamp_min(1e-6 * overall)[k].float()
        out[f"d2 / sigma_k^2, m = {m}"] = d2 / var
        out[f"isotropic Gaussian NLL, m = {m}"] = d2 * dim / (2 * var) + 0.5 * dim * (var / dim).log()
    for m in (10, 1000):  # per-dimension spread of each code's members
        var = ((spread_dim + m * overall_dim) / (count[:, None] + m))[k]
        out[f"diagonal Gaussian NLL, m = {m}"] = (0.5 * r * r / var + 0.5 * var.log()).sum(1).float()
    evals, evecs = torch.linalg.eigh(cov)
    white = (evecs / (evals + 0.1 * evals.mean()).sqrt()).float()
    wr = (val - codebook[k]) @ white
    out["whitened (global covariance)"] = (wr * wr).sum(1)
    z = (d2.double().reshape(n_pos, -1) - position_mean) / position_sd
    out["z-score per grid position"] = z.flatten().float()
    log_weight = ((count + 1) / (count + 1).sum()).log().float()
    out["d2 / 2T - log pi_k (mixture)"] = d2 * dim / (2 * overall) - log_weight[k]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--codebooks", default="", help="comma-separated K: also codebooks fitted here, before and after the refit")
    p.add_argument("--sample", type=int, default=131072)
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    detector = Detector.load(args.run)
    detector.model.eval()
    run = RunDir(Path(args.run))
    train_samples = [Sample(path=Path(s["path"]), label=s["label"], patient_id=s["patient_id"], frame=s.get("frame")) for s in run.read_split()["splits"]["train"]]
    with torch.no_grad():
        train, grid = features_of(detector, ScanDataset(train_samples, detector.preprocessor, load_masks=False))
        chosen = select_test_samples(run, args.data, "val")
        data = ScanDataset(chosen.samples, detector.preprocessor, load_masks=True)
        val, _ = features_of(detector, data)
    labels = np.array([s.label != detector.config.data.normal_class for s in chosen.samples])
    valid = data.valid[:, 0].numpy()
    masks = data.masks[:, 0].numpy() if data.masks is not None else None
    rows = (data.mask_known.numpy() | ~labels) if masks is not None else None
    score, size = detector.config.score, (detector.config.data.image_size,) * 2
    print(f"{args.run}: {len(train_samples)} training scans ({len(train)} patches), {len(labels)} validation scans ({labels.sum()} abnormal)")

    def report(name: str, values: torch.Tensor) -> None:
        grid_map = values.reshape(-1, 1, *grid).float()
        maps = gaussian_smooth(F.interpolate(grid_map, size=size, mode="bilinear", align_corners=False), detector.smoothing_sigma)[:, 0].numpy()
        s = reduce_map(maps, how=score.reducer, topk_fraction=score.topk_fraction, valid=valid)
        a, n = s[labels], s[~labels]
        d_prime = (a.mean() - n.mean()) / math.sqrt(0.5 * (a.var() + n.var()) + 1e-12)
        line = f"| {name} | {M.image_auroc(labels.astype(int), s):.4f} | {d_prime:.3f} |"
        if masks is not None and masks.any():
            line += f" {M.pixel_auroc(masks[rows], maps[rows], valid=valid[rows]):.4f} |"
        print(line, flush=True)

    print("| variant | image AUROC | d' | pixel AUROC |\n|---|---:|---:|---:|")
    codebook = detector.model.quantizer.codebook.float()
    for name, values in variants(train, val, codebook, grid).items():
        report(f"run's codebook: {name}", values)
    sample = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.sample]]
    for k in (int(v) for v in args.codebooks.split(",") if v):
        centres, _ = kmeans(sample, k, 20, seeding="farthest")
        report(f"K = {k}, k-means of {len(sample)} patches: d2", nearest_rows(val, centres)[0])
        means = CodeMeans(centres)
        for block in train.split(65536):
            means.add(block)
        refit, _ = means.centres()
        report(f"K = {k}, then refit on all {len(train)}: d2", nearest_rows(val, refit)[0])
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
