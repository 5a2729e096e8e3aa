"""Parity of an exported ONNX graph with `medvq infer` on a trained run: every score column and the decision.

    medvq export RUN --format onnx --out model.onnx
    python benchmarks/onnx_parity.py RUN model.onnx --data ../shared/data/kermany-dev [--limit 32]

Scores the same scans (sorted by path, the first --limit of them) through ``Detector.predict_files`` (what
`medvq infer` writes) and through ``OnnxScorer.score_files`` (what `python -m medvq.onnx_runtime` writes),
in full precision, and prints per column the largest absolute and relative difference, how many scans
differ in their decision, and per map the largest difference and the share of model-grid pixels that
differ by more than 1e-3 (calibrated units). Scores that land within 1e-3 of a calibration normal's score
can move the percentile by one normal (100 / the number of calibration normals); such moves are counted
apart. No timing: the result does not depend on machine load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder of scans (searched recursively)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N scans by path (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from medvq.data.readers import is_image_file
    from medvq.detector import Detector
    from medvq.onnx_runtime import OnnxScorer

    files = sorted(p for p in args.data.rglob("*") if is_image_file(p))
    files = files[: args.limit] if args.limit else files
    detector = Detector.load(args.run)
    scorer = OnnxScorer(args.onnx, threads=args.threads)
    reference = detector.predict_files(files)
    exported = scorer.score_files(files)

    columns: dict[str, dict[str, float]] = {}
    maps: dict[str, dict[str, float]] = {}
    percentile_steps = decisions = 0
    for ref, onx in zip(reference, exported):
        decisions += int(ref.decision.abnormal != onx.abnormal)
        for name, values in ref.scores.items():
            for key, suffix in (("score", ""), ("z", "_z"), ("normal_percentile", "_normal_percentile")):
                a, b = float(values[key]), onx.scores[name][key]
                c = columns.setdefault(name + suffix, {"max_abs": 0.0, "max_rel": 0.0})
                c["max_abs"] = max(c["max_abs"], abs(a - b))
                c["max_rel"] = max(c["max_rel"], abs(a - b) / max(abs(a), 1e-12))
                if key == "normal_percentile" and abs(a - b) > 1e-3:
                    percentile_steps += 1
        for name in ref.maps.model_grid:
            d = np.abs(ref.maps.model_grid[name] - onx.maps[name])
            m = maps.setdefault(name, {"max_abs": 0.0, "pixels_over_1e-3": 0, "pixels": 0})
            m["max_abs"] = max(m["max_abs"], float(d.max()))
            m["pixels_over_1e-3"] += int((d > 1e-3).sum())
            m["pixels"] += d.size

    print(f"{len(files)} scans, {args.run} against {args.onnx}")
    print(f"{'column':48s} {'max abs':>10s} {'max rel':>10s}")
    for name, c in columns.items():
        print(f"{name:48s} {c['max_abs']:10.2g} {c['max_rel']:10.2g}")
    print(f"decisions that differ: {decisions} of {len(files)}; percentiles that moved past a calibration normal: {percentile_steps}")
    for name, m in maps.items():
        print(f"map {name}: max abs {m['max_abs']:.2g}, pixels over 1e-3: {m['pixels_over_1e-3']} of {m['pixels']} ({m['pixels_over_1e-3'] / m['pixels']:.2%})")
    if args.out:
        args.out.write_text(json.dumps({"scans": len(files), "columns": columns, "decisions_differ": decisions, "maps": maps}, indent=1))


if __name__ == "__main__":
    main()
