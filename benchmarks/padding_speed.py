"""Padding search and background level: the current functions against the full-resolution originals.

    python benchmarks/padding_speed.py --data ../shared/data/kermany-dev

The originals (scipy morphology and labelling on every pixel, exact quantiles) are the reference kept in
``tests/test_padding_reference.py``. Milliseconds per scan of each, one process, the scans read first;
the share of pixels where the masks differ, the largest background-level difference, and the 1-minute
load average, since timings next to other jobs are upper bounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from medvq.data.preprocess import background_level, find_padding
from medvq.data.readers import read_image


def reference():
    path = Path(__file__).resolve().parents[1] / "tests" / "test_padding_reference.py"
    spec = importlib.util.spec_from_file_location("padding_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_find_padding, module.reference_background_level


def ms_per_scan(fn, inputs) -> tuple[float, list]:
    start = time.perf_counter()
    out = [fn(*x) for x in inputs]
    return (time.perf_counter() - start) / len(inputs) * 1e3, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-dev")
    args = p.parse_args()
    images = [read_image(f) for f in sorted(args.data.rglob("*.jpeg"))]
    old_pad, old_bg = reference()
    t_old, masks_old = ms_per_scan(old_pad, [(im,) for im in images])
    t_new, masks_new = ms_per_scan(find_padding, [(im,) for im in images])
    b_old, level_old = ms_per_scan(old_bg, list(zip(images, masks_old)))
    b_new, level_new = ms_per_scan(background_level, list(zip(images, masks_old)))
    differ = max(float((a ^ b).mean()) for a, b in zip(masks_old, masks_new))
    print(f"{len(images)} scans, 1-minute load {os.getloadavg()[0]:.1f}")
    print(f"find_padding      {t_old:7.2f} -> {t_new:6.2f} ms/scan ({t_old / t_new:.1f}x); masks differ on at most {differ:.3%} of a scan's pixels")
    print(f"background_level  {b_old:7.2f} -> {b_new:6.2f} ms/scan ({b_old / b_new:.1f}x); levels differ by at most {np.max(np.abs(np.subtract(level_old, level_new))):.4f}")


if __name__ == "__main__":
    main()
