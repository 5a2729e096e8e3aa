"""Time of one NLL map (and of the whole prior map set) per image, and sampling time per image, per prior run.

    python benchmarks/prior_timing.py runs/prior-fusion runs/prior-ar --sizes 128,256 --json prior_timing.json

For each run the prior is rebuilt from its config.yaml at every requested image size (the latent grid, and
the autoregressive prior's position table, follow the size; at the run's own size the trained weights are
loaded, at other sizes the timing uses the same architecture with fresh weights, which costs the same).
One image per call, fp32, after warm-up; the median of ``--repeats`` calls is reported, with the 1-minute
load average so that timings taken next to other jobs can be recognised. Sampling (autoregressive runs) draws
``--samples`` images in one batch with cached keys and values and reports seconds per image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from medvq.engine.run_dir import RunDir
from medvq.models.prior.anomaly_map import compute_maps, nll_map
from medvq.models.prior.model import LatentPrior


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(run: RunDir, size: int) -> LatentPrior:
    config = run.read_config()
    model_config = config.model
    stride = model_config.vqvae_config.stride
    model = LatentPrior(model_config.model_copy(update={"latent_grid": [size // stride, size // stride]}))
    if size == config.data.image_size:
        run.load_weights(model)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="prior run directories")
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.runs:
        run = RunDir(path)
        kind = run.read_config().model.kind
        for size in [int(s) for s in args.sizes.split(",")]:
            model = build(run, size)
            x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                codes = model.codes(x).indices
                nll_only = timed(lambda: nll_map(model.logits(x, codes), codes, (size, size)), args.repeats)
                whole = timed(lambda: compute_maps(model, x), args.repeats)
            row = {"run": str(path), "kind": kind, "image_size": size, "latent_grid": list(codes.shape[1:]), "nll_map_seconds": nll_only,
                   "all_maps_seconds": whole, "threads": torch.get_num_threads(), "load_1min": os.getloadavg()[0]}
            if kind == "autoregressive":
                g = torch.Generator().manual_seed(0)
                start = time.perf_counter()
                drawn = model.sample(args.samples, generator=g)
                with torch.no_grad():
                    model.vqvae.decode_codes(drawn)
                row["sample_seconds_per_image"] = (time.perf_counter() - start) / args.samples
                row["samples_batch"] = args.samples
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
