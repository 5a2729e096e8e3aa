"""Images/s of the exported ONNX scoring graph in onnxruntime against the torch Detector, per run, in one process.

    python benchmarks/onnx_throughput.py runs/pc runs/vq --threads 2 --batch-size 16 --out docs/onnx_throughput.json

Both paths score the same preprocessed batch (real kermany-dev scans when --data is given, else random
images) from model input to calibrated maps and image scores; preprocessing and file reading are not
timed. torch runs fp32 (as the graph) with the same number of threads as onnxruntime; the two are called
in turn, round after round, so that load from other processes affects both alike. Also reports the
size of each exported file and the largest difference between the two paths' scores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def interleaved_images_per_second(fns: list, n_images: int, min_seconds: float) -> list[float]:
    """Call each function in turn, round after round, so that a change of machine load hits all alike."""
    for fn in fns:
        fn()  # warm-up
    spent = [0.0] * len(fns)
    rounds = 0
    while sum(spent) < min_seconds * len(fns) or rounds < 3:
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            spent[k] += time.perf_counter() - start
        rounds += 1
    return [rounds * n_images / s for s in spent]


def batch(detector, data: Path | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = detector.config.data.image_size
    if data is None:
        return torch.rand(n, 1, size, size), torch.ones(n, 1, size, size, dtype=torch.bool)
    from medvq.data.samples import scan_dataset

    every = sorted(scan_dataset(data), key=lambda s: s.path.name)
    samples = every[:: max(1, len(every) // n)][:n]
    prepared = [detector.preprocessor.load(s)[1] for s in samples]
    return torch.stack([p.image for p in prepared]), torch.stack([p.valid for p in prepared])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="Time each path at least this long.")
    parser.add_argument("--data", type=Path, default=None, help="Score real scans from this folder (default: random images).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from medvq.detector import Detector
    from medvq.export import export_onnx
    from medvq.onnx_runtime import OnnxScorer

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            detector = Detector.load(run)
            path = Path(tmp) / f"{run.name}.onnx"
            export_onnx(run, path)
            scorer = OnnxScorer(path, threads=args.threads)
            x, valid = batch(detector, args.data, args.batch_size)
            xv, vv = x.numpy(), valid.float().numpy()
            torch_ips, onnx_ips = interleaved_images_per_second(
                [lambda: detector.predict(x, valid, bf16=False), lambda: scorer.run(xv, vv)], len(x), args.seconds
            )
            pred, outs = detector.predict(x, valid, bf16=False), scorer.run(xv, vv)
            diff = max(float(np.abs(outs[f"score_{k.replace('+', '__')}"] - v).max()) for k, v in pred.scores.items())
            row = {
                "run": str(run),
                "method": detector.config.method,
                "image_size": detector.config.data.image_size,
                "torch_images_per_s": round(torch_ips, 1),
                "onnxruntime_images_per_s": round(onnx_ips, 1),
                "onnx_over_torch": round(onnx_ips / torch_ips, 2),
                "onnx_mib": round(path.stat().st_size / 2**20, 2),
                "max_score_difference": diff,
            }
            if detector.config.method == "patchcore":
                row["memory_bank"] = list(detector.model.memory_bank.shape)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "batch_size": args.batch_size, "data": str(args.data) if args.data else "random", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
