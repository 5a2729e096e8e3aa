"""Other rules for the out-of-distribution guard, measured against the stored one on the same scans.

    python benchmarks/ood_alternatives.py runs/pc-phantom \
        --set phantom-test=test:phantom --set kermany-val=val:../shared/data/kermany-dev --json alt.json

Every rule is fitted as the stored guard's parts are, from normal scans of the run's own source only, and
flags a scan above ``MARGIN`` times the largest distance of one of those normals left out:

- appearance rules on the reference normals (the run's training and calibration normals, as in
  calibration), on the channel mean and spread of ImageNet EfficientNet-Lite0 stages, each feature
  standardised by the references: ``nearest-2,3`` (the stored part: Euclidean distance to the nearest
  reference, stages 2 and 3), ``nearest-1..5`` (all five stages), ``largest-z-2,3`` (the largest
  per-feature z-score, no neighbour), ``mahalanobis-2,3`` (Ledoit-Wolf covariance of the references);
- ``retina-level``: "abnormal all over the retina" from the model's own map: the lower quartile of the
  primary map over the brightest quarter of the scan's valid pixels (``ood_guard.py --parts``), on the
  calibration normals.

Prints, per set and class, the share each rule flags. Sets as in ``ood_guard.py``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from ood_guard import level_map, retina_map_level, samples_of
from sklearn.covariance import LedoitWolf

from medvq.data.loader import prepared_batches
from medvq.data.samples import Sample
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.models.backbones.config import IMAGENET_MEAN, IMAGENET_STD
from medvq.models.backbones.efficientnet_lite0 import LiteFeatures
from medvq.models.backbones.weights import load_lite0_weights
from medvq.scoring.ood import AppearanceFeatures

MARGIN = 1.1
STAGES = [1, 2, 3, 4, 5]


class Rule:
    """A distance fitted on reference rows, with its threshold from the references left out one at a time."""

    def __init__(self, columns: np.ndarray | None, kind: str):
        self.columns, self.kind = columns, kind

    def _fit(self, rows: np.ndarray):
        if self.kind == "level":
            return lambda x: x[:, 0]
        mean, scale = rows.mean(0), rows.std(0) + 1e-6
        z = (rows - mean) / scale
        if self.kind == "nearest":

            def nearest(x: np.ndarray) -> np.ndarray:
                q = (x - mean) / scale
                return np.sqrt(np.maximum((q**2).sum(1)[:, None] + (z**2).sum(1)[None] - 2 * q @ z.T, 0)).min(1)

            return nearest
        if self.kind == "largest-z":
            return lambda x: np.abs((x - mean) / scale).max(1)
        covariance = LedoitWolf().fit(z)
        return lambda x: np.sqrt(covariance.mahalanobis((x - mean) / scale))

    def fit(self, reference: np.ndarray) -> "Rule":
        rows = reference[:, self.columns] if self.columns is not None else reference
        if self.kind == "level":  # one statistic: its largest value on the normals
            self.threshold = MARGIN * float(rows.max())
        else:
            left_out = [self._fit(np.delete(rows, i, 0))(rows[i : i + 1])[0] for i in range(len(rows))]
            self.threshold = MARGIN * float(max(left_out))
        self.distance = self._fit(rows)
        return self

    def flags(self, x: np.ndarray) -> np.ndarray:
        return self.distance(x[:, self.columns] if self.columns is not None else x) > self.threshold


def features(detector: Detector, network: LiteFeatures, samples) -> tuple[np.ndarray, np.ndarray, list]:
    """Pooled appearance features of all stages at the guard's input size, the retina map level, and the
    scans they belong to (blank scans left out, as ``medvq infer`` does)."""
    size = detector.appearance_size
    looks, levels, kept = [], [], []
    for batch in prepared_batches(samples, detector.preprocessor, batch_size=detector.inference.batch_size):
        batch = batch.subset(torch.nonzero(batch.valid.flatten(1).any(dim=1)).flatten().tolist())
        if not batch.samples:
            continue
        x = batch.images.float()
        x = torch.nn.functional.interpolate(x, size=size, mode="area") if x.shape[-1] > size else x
        with torch.no_grad():
            stages = network(x)
        looks.append(np.concatenate([AppearanceFeatures.pool([s], batch.valid, batch.images.shape[-1]) for s in stages], axis=1))
        pred = detector.predict(batch.images, batch.valid)
        levels.append(retina_map_level(batch.images, batch.valid, pred.maps[level_map(detector, pred)]))
        kept += batch.samples
    return np.concatenate(looks), np.concatenate(levels)[:, None], kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--set", action="append", required=True, help="NAME=PATH[,PATH...], NAME=test:ROOT or NAME=val:ROOT")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    detector = Detector.load(args.run)
    network = LiteFeatures(1, STAGES)
    load_lite0_weights(network, "imagenet", IMAGENET_MEAN, IMAGENET_STD, 1)
    network.eval()
    split = RunDir(args.run).read_split()["splits"]
    as_samples = lambda items: [Sample(path=Path(x["path"]), label=x.get("label", ""), patient_id=x.get("patient_id", ""), frame=x.get("frame")) for x in items]
    calibration = as_samples(split["val"])
    reference_looks, _, _ = features(detector, network, as_samples(split["train"]) + calibration)
    _, calibration_levels, _ = features(detector, network, calibration)
    widths = [s.shape[1] for s in network(torch.zeros(1, 1, 32, 32))]
    starts = np.concatenate([[0], np.cumsum([2 * w for w in widths])])
    columns = lambda stages: np.concatenate([np.arange(starts[s - 1], starts[s]) for s in stages])
    rules = {
        "nearest-2,3": Rule(columns([2, 3]), "nearest").fit(reference_looks),
        "nearest-1..5": Rule(columns(STAGES), "nearest").fit(reference_looks),
        "largest-z-2,3": Rule(columns([2, 3]), "largest-z").fit(reference_looks),
        "mahalanobis-2,3": Rule(columns([2, 3]), "mahalanobis").fit(reference_looks),
        "retina-level": Rule(None, "level").fit(calibration_levels),
    }
    stored = detector.calibration.guard.appearance if detector.calibration.guard is not None else None
    print(
        f"{args.run}: {len(reference_looks)} reference normals, {len(calibration_levels)} calibration normals; nearest-2,3 threshold "
        f"{rules['nearest-2,3'].threshold:.3g} (stored part: {stored.threshold:.3g})" if stored else "(no stored appearance part)"
    )
    results = {"run": str(args.run), "load_1min": os.getloadavg()[0], "thresholds": {k: r.threshold for k, r in rules.items()}, "sets": {}}
    for item in args.set:
        name, spec = item.split("=", 1)
        looks, levels, samples = features(detector, network, samples_of(spec, args.run, detector))
        labels = np.array([s.label or "unlabelled" for s in samples])
        flags = {k: r.flags(levels if k == "retina-level" else looks) for k, r in rules.items()}
        results["sets"][name] = {}
        for c in ["all", *sorted(set(labels))]:
            keep = np.ones(len(labels), bool) if c == "all" else labels == c
            row = {k: f"{int(f[keep].sum())}/{int(keep.sum())}" for k, f in flags.items()}
            results["sets"][name][c] = row
            print(f"{name:>16} {c:>10}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
