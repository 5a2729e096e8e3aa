"""Images per second of trained detectors on the same preprocessed scans, measured in one process.

    python benchmarks/detector_speed.py runs/featvq runs/patchcore --data ../shared/data/kermany-dev --images 32

Each run's Detector.predict (model, maps, smoothing and calibrated scores) on the same batch of preprocessed
scans, the runs taking turns for ``--repeats`` rounds so that a change in machine load hits all alike; the
best round per run is reported with the speed ratio to the first run and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from medvq.data.dataset import ScanDataset
from medvq.data.samples import collect_images
from medvq.detector import Detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True, help="folder of scans (every image below it is a candidate)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    detectors = [Detector.load(r) for r in args.runs]
    sizes = {d.config.data.image_size for d in detectors}
    if len(sizes) != 1:
        raise SystemExit(f"runs differ in image size: {sorted(sizes)}")
    found = collect_images([args.data])
    samples = found[:: max(1, len(found) // args.images)][: args.images]  # spread over the folder
    scans = ScanDataset(samples, detectors[0].preprocessor, load_masks=False)
    best = [float("inf")] * len(detectors)
    for _ in range(args.repeats):
        for i, det in enumerate(detectors):
            started = time.perf_counter()
            for b in scans.batches(args.batch_size):
                det.predict(b.image, b.valid)
            best[i] = min(best[i], time.perf_counter() - started)
    print(f"{len(scans)} scans at {sizes.pop()} px, {args.threads} threads, 1-minute load {os.getloadavg()[0]:.1f}")
    for run, det, seconds in zip(args.runs, detectors, best):
        print(f"{det.config.method:10s} {len(scans) / seconds:8.1f} images/s  x{best[0] / seconds:5.2f}  {run}")


if __name__ == "__main__":
    main()
