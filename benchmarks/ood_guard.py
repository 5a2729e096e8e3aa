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
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from medvq.data.samples import collect_images
from medvq.detector import Detector
from medvq.engine.run_dir import RunDir
from medvq.evaluation.evaluate import select_test_samples


def samples_of(spec: str, run: Path, detector: Detector):
    split, _, root = spec.partition(":")
    if split in ("test", "val") and root:
        return select_test_samples(RunDir(run), root, split).samples
    return collect_images([Path(p) for p in spec.split(",")], detector.preprocessor.volume)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--set", action="append", required=True, help="NAME=PATH[,PATH...], NAME=test:ROOT or NAME=val:ROOT")
    parser.add_argument("--json", type=Path)
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
        samples = samples_of(spec, args.run, detector)
        distances = np.array([r.decision.ood_distance for r in detector.predict_files(samples)])
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
