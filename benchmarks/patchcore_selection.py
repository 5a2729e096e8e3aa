"""Choosing PatchCore's defaults without looking at the test patients.

The dataset is split by patient exactly as ``medvq train`` splits it; the test patients are set aside
and never read. The remaining (train + val) patients are cut into ``--folds`` patient-grouped folds: for
each fold, a memory bank is fitted on the NORMAL scans of the other folds and every scan of the fold
(NORMAL and abnormal) is scored. Reported per setting: image AUROC (NORMAL vs abnormal), AUROC per
abnormal class and AUROC within one original scan width (``w512``: 512-wide scans only, where NORMAL
meets DRUSEN and DME without the width confound), averaged over folds, for the re-weighted maximum and
for the top-1 % mean of the
smoothed patch-distance map (what ``medvq evaluate`` reports as ``reweighted_max`` and
``patch_distance``), plus the fit time.

    python benchmarks/patchcore_selection.py --data ../shared/data/kermany-dev --image-size 128 224
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from medvq.data.dataset import ScanDataset
from medvq.data.preprocess import Preprocessor
from medvq.data.samples import dataset_splits
from medvq.evaluation.metrics import grouped_auroc, image_auroc, reduce_map
from medvq.maps.smoothing import gaussian_smooth
from medvq.models.patchcore.anomaly_map import SCORE_NAME, compute_maps
from medvq.models.patchcore.coreset import StreamingCoreset
from medvq.models.patchcore.model import PatchCore, PatchCoreConfig

GRID = {  # one axis at a time around the first value of each (the defaults being chosen)
    "feature_stages": [[2, 3], [1, 2, 3], [2], [3], [3, 5]],
    "patch_size": [1, 3, 5],
    "normalisation": ["imagenet", "half"],
    "coreset_ratio": [0.1, 0.01, 0.25],
    "coreset_chunk_patches": [16384, 4096, 1 << 30],
    "coreset_projection_dim": [128, 64, 0],
}


def settings(axes: list[str]) -> list[dict]:
    base = {k: v[0] for k, v in GRID.items()}
    out = [base]
    for axis in axes:
        out += [{**base, axis: v} for v in GRID[axis][1:]]
    return out


def fold_scores(setting: dict, train: ScanDataset, held: ScanDataset, image_size: int, seed: int) -> tuple[dict[str, np.ndarray], float]:
    model = PatchCore(PatchCoreConfig(**setting))
    model.features.load_imagenet()
    started = time.perf_counter()
    c = model.config
    sampler = StreamingCoreset(c.feature_dim, c.coreset_ratio, c.coreset_chunk_patches, c.coreset_projection_dim, seed=seed)
    for b in train.batches(32):
        f = model.embed(b.image)
        sampler.add(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    model.set_memory_bank(sampler.finish())
    fit_s = time.perf_counter() - started
    maps, scores = [], []
    for b in held.batches(32):
        out = compute_maps(model, b.image)
        maps.append(gaussian_smooth(out.maps["patch_distance"], 2.0 * image_size / 128)[:, 0].numpy())
        scores.append(out.scores[SCORE_NAME].numpy())
    topk = reduce_map(np.concatenate(maps), "topk", 0.01, valid=held.valid[:, 0].numpy())
    return {SCORE_NAME: np.concatenate(scores), "patch_distance": topk}, fit_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, nargs="+", default=[128])
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--axes", nargs="*", default=list(GRID), help=f"settings varied one at a time (default: all of {', '.join(GRID)})")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--normal-class", default="NORMAL")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    parts = dataset_splits(args.data, val_fraction=0.15, test_fraction=0.3, seed=args.split_seed)
    pool = parts["train"] + parts["val"]  # the test patients are never read
    labels = np.array([s.label for s in pool])
    groups = np.array([s.patient_id for s in pool])
    folds = list(StratifiedGroupKFold(args.folds, shuffle=True, random_state=0).split(pool, labels, groups))
    print(f"{len(pool)} non-test scans ({', '.join(f'{c} {int((labels == c).sum())}' for c in sorted(set(labels)))}), "
          f"{len(set(groups))} patients, {args.folds} patient-grouped folds")
    results = []
    for size in args.image_size:
        data = ScanDataset(pool, Preprocessor(image_size=size), load_masks=False)
        widths = data.original_widths()
        for setting in settings(args.axes):
            per_fold: dict[str, list] = {}
            fit_seconds = []
            for fit_idx, held_idx in folds:
                normal_fit = [i for i in fit_idx if labels[i] == args.normal_class]
                scores, fit_s = fold_scores(setting, data.subset(normal_fit), data.subset(held_idx), size, seed=0)
                fit_seconds.append(fit_s)
                y = (labels[held_idx] != args.normal_class).astype(int)
                for name, s in scores.items():
                    row = per_fold.setdefault(name, [])
                    entry = {"pooled": image_auroc(y, s)}
                    for cls in sorted(set(labels) - {args.normal_class}):
                        keep = np.isin(labels[held_idx], [cls, args.normal_class])
                        if len(set(y[keep])) == 2:
                            entry[cls] = image_auroc(y[keep], s[keep])
                    entry.update({f"w{w}": v for w, v in grouped_auroc(y, s, widths[held_idx]).items()})
                    row.append(entry)
            for name, rows in per_fold.items():
                keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "pooled", k.startswith("w"), k))
                mean = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
                results.append({"image_size": size, "score": name, **setting, "auroc": mean, "fit_seconds": float(np.mean(fit_seconds))})
                changed = {k: v for k, v in setting.items() if v != GRID[k][0]} or "defaults"
                print(f"{size:4d}px {name:15s} {json.dumps(changed):48s} " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()) + f"  fit {np.mean(fit_seconds):.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
