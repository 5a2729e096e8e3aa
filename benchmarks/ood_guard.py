"""Share of scans the out-of-distribution guard of a run flags, per set of inputs.

    python benchmarks/ood_guard.py runs/pc-kermany \
        --set kermany-test=test:../shared/data/kermany-dev \
        --set colin27=/usr/share/mricron/templates/ch2.nii.gz \
        --set nibabel=$(python -c "from nibabel.testing import data_path; print(data_path)")/anatomical.nii \
        --set phantom=phantom/test --json ood.json

A set is ``NAME=PATH[,PATH...]``: files or folders of scans (NIfTI volumes count slice by slice, as in
inference), or ``NAME=test:ROOT`` (``NAME=val:ROOT``) for the held-out test (validation) patients of a
labelled ROOT (the run's own patient split, as ``medvq evaluate`` uses). Prints one line per set: scans, flagged, share flagged, and the
median and largest out-of-distribution distance against the run's stored threshold.

``--parts`` adds, per set and class, the median [smallest, largest] of each part of the guard (the
whole-image features and the appearance, in units of their thresholds) and of the retina map level: the
lower quartile of the primary map (or the first map, where the run decides on a model score) over the brightest quarter of the scan's valid pixels (the retina), in
the map's calibrated units. A local lesion leaves most of the retina near 0; a scan the model finds
foreign all over raises it, and so does disease that changes most of the retina.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from medvq.data.loader import prepared_batches
from medvq.data.samples import collect_images
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.evaluation.evaluate import select_test_samples


def samples_of(spec: str, run: Path, detector: Detector):
    split, _, root = spec.partition(":")
    if split in ("test", "val") and root:
        return select_test_samples(RunDir(run), root, split).samples
    return collect_images([Path(p) for p in spec.split(",")], detector.preprocessor.volume)


def retina_map_level(images: torch.Tensor, valid: torch.Tensor, primary: torch.Tensor) -> np.ndarray:
    """(B,): the lower quartile of the map over each scan's brightest quarter of valid pixels."""
    out = []
    for x, v, m in zip(images[:, 0].float().cpu(), valid[:, 0].cpu(), primary[:, 0].float().cpu()):
        v = v if bool(v.any()) else torch.ones_like(v)
        retina = v & (x >= torch.quantile(x[v], 0.75))
        out.append(float(torch.quantile(m[retina], 0.25)))
    return np.asarray(out)


def score_set(detector: Detector, samples) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, list]:
    """The guard's distance, its parts and the retina map level of every readable, non-blank scan (the
    batches ``medvq infer`` scores), and the samples they belong to."""
    distances, parts, levels, kept = [], {}, [], []
    for batch in prepared_batches(samples, detector.preprocessor, batch_size=detector.inference.batch_size):
        batch = batch.subset(torch.nonzero(batch.valid.flatten(1).any(dim=1)).flatten().tolist())
        if not batch.samples:
            continue
        pred = detector.predict(batch.images, batch.valid)
        distances.append(pred.ood_distance)
        for k, v in pred.ood_parts.items():
            parts.setdefault(k, []).append(v)
        levels.append(retina_map_level(batch.images, batch.valid, pred.maps[level_map(detector, pred)]))
        kept += batch.samples
    return np.concatenate(distances), {k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(levels), kept


def level_map(detector: Detector, pred) -> str:
    """The primary map, or where the run decides on a score of the model's own (PatchCore's
    reweighted_max), the first map it computes."""
    return detector.primary_map if detector.primary_map in pred.maps else next(n for n in detector.map_names if n in pred.maps)


def spread(x: np.ndarray) -> str:
    return f"{np.median(x):.2f} [{x.min():.2f}, {x.max():.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--set", action="append", required=True, help="NAME=PATH[,PATH...], NAME=test:ROOT or NAME=val:ROOT")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--parts", action="store_true", help="also each part's distance and the retina map level, per class")
    args = parser.parse_args()
    detector = Detector.load(args.run)
    guard = detector.calibration.guard
    if guard is None:
        raise SystemExit(f"{args.run}: the run has no out-of-distribution guard (calibrated before medvq stored one)")
    results = {"run": str(args.run), "threshold": guard.threshold, "load_1min": os.getloadavg()[0], "sets": {}}
    if guard.appearance is not None:  # distances in units of the two parts' thresholds
        results |= {"feature_threshold": guard.feature_threshold, "appearance_threshold": guard.appearance.threshold, "appearance_reference": guard.appearance.n_reference}
        print(
            f"{args.run}: flagged above 1 = the feature part's threshold {guard.feature_threshold:.3g} ({guard.n_normals} calibration normals) "
            f"or the appearance part's {guard.appearance.threshold:.3g} ({guard.appearance.n_reference} reference normals)"
        )
    else:
        print(f"{args.run}: threshold {guard.threshold:.3g} (calibration normals' left-out distances up to {max(guard.normal_distances):.3g})")
    for item in args.set:
        name, spec = item.split("=", 1)
        distances, parts, levels, samples = score_set(detector, samples_of(spec, args.run, detector))
        flagged = distances > guard.threshold
        by_class: dict[str, list[int]] = {}
        for s, f in zip(samples, flagged):
            by_class.setdefault(s.label or "unlabelled", []).append(int(f))
        results["sets"][name] = {
            "scans": len(samples),
            "flagged": int(flagged.sum()),
            "share_flagged": float(flagged.mean()),
            "median_distance": float(np.median(distances)),
            "max_distance": float(distances.max()),
            "flagged_per_class": {c: f"{sum(v)}/{len(v)}" for c, v in sorted(by_class.items())},
        }
        r = results["sets"][name]
        print(
            f"{name:>16}: {r['scans']:4d} scans, {r['flagged']:4d} flagged ({100 * r['share_flagged']:5.1f} %), distance median "
            f"{r['median_distance']:.3g}, max {r['max_distance']:.3g}; per class {r['flagged_per_class']}"
        )
        if args.parts:
            labels = np.array([s.label or "unlabelled" for s in samples])
            r["parts_per_class"] = {}
            for c in sorted(set(labels)):
                keep = labels == c
                r["parts_per_class"][c] = {**{k: spread(v[keep]) for k, v in parts.items()}, "retina_map_level": spread(levels[keep])}
                print(f"{'':>18}{c}: " + ", ".join(f"{k} {v}" for k, v in r["parts_per_class"][c].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
