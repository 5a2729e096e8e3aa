"""Volume-level against B-scan-level AUROC on volumes assembled from kermany-dev's test patients.

The test B-scans of a run (the patients it neither trained nor calibrated on, exactly those `medvq
evaluate` scores) are grouped by patient and class, and each group of one image size is stacked as a
DICOM Ophthalmic Tomography multi-frame volume (pixels unchanged). A manifest lists the volumes, and
`medvq evaluate RUN --manifest` scores them: B-scan-level metrics over every B-scan, volume-level over
the volumes (score = mean of the top 10 % of a volume's B-scan scores). Usage:

    medvq train patchcore --data ../shared/data/kermany-dev --out runs/pc
    python benchmarks/kermany_volumes.py --run runs/pc --data ../shared/data/kermany-dev --out bench-volumes
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from volume_files import write_dicom_opt  # noqa: E402

from medvq.engine.run_dir import RunDir  # noqa: E402
from medvq.evaluation.evaluate import evaluate_run, select_test_samples  # noqa: E402


def assemble(run: Path, data: Path, out: Path) -> tuple[Path, list[int]]:
    """Write OUT/volumes/*.dcm and OUT/volumes.csv from the run's test B-scans; return the manifest and the
    number of B-scans of each volume."""
    samples = select_test_samples(RunDir(run), data, "test").samples
    groups: dict[tuple, list] = defaultdict(list)
    for s in samples:
        with Image.open(s.path) as im:
            pixels = np.asarray(im.convert("L"))
        groups[(s.patient_id, s.label, pixels.shape)].append((s.path.name, pixels))
    folder = out / "volumes"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,patient,split"]
    for k, ((patient, label, shape), items) in enumerate(sorted(groups.items())):
        frames = np.stack([p for _, p in sorted(items, key=lambda x: x[0])])
        path = write_dicom_opt(folder / f"{label}-{patient}-{shape[1]}x{shape[0]}.dcm", frames, patient=patient, laterality="", study_date="")
        lines.append(f"{path.name},{label},{patient},test")
    manifest = folder / "volumes.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, [len(items) for items in groups.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest, sizes = assemble(args.run, args.data, args.out)
    result = evaluate_run(args.run, manifest, args.out / "eval", progress=False)
    volume = result["volume_level"]
    print(f"{result['n_images']} test B-scans of {result['n_patients']} patients ({result['counts']}) in {volume['n_volumes']} volumes ({volume['counts']}); "
          f"B-scans per volume: median {np.median(sizes):g}, 1 in {sizes.count(1)} volumes, at most {max(sizes)}")
    print("| map | B-scan AUROC | volume AUROC | B-scan AUPRC | volume AUPRC |")
    print("|---|---:|---:|---:|---:|")
    for name, m in result["maps"].items():
        v = volume["maps"][name]
        print(f"| `{name}` | {m['image_auroc']:.3f} | {v['auroc']:.3f} | {m['image_auprc']:.3f} | {v['auprc']:.3f} |")
    primary = result.get("primary_map")
    if primary and "operating_point" in volume["maps"].get(primary, {}):
        b, v = result["maps"][primary]["operating_point"], volume["maps"][primary]["operating_point"]
        print(
            f"\nat the stored {b['name']} threshold of `{primary}` ({b['threshold']:.3g}): B-scans sensitivity {b['sensitivity']:.3f} / specificity "
            f"{b['specificity']:.3f}; volumes sensitivity {v['sensitivity']:.3f} / specificity {v['specificity']:.3f}"
        )


if __name__ == "__main__":
    main()
