"""Scans per second as a user sees them, next to what the model alone allows, per run and image size.

    python benchmarks/speed.py runs/vqvae runs/patchcore --data ../shared/data/kermany-dev --sizes 128,256 --json speed.json
    python benchmarks/speed.py runs/vqvae --sizes "" --scale 10000     # peak memory of medvq infer at 1,000 and 10,000 scans

For every run and size, in one process and one run (so that the ratios compare like with like):

- ``preprocess 1 proc``: read + preprocess (``Preprocessor.load``) scan after scan in this process;
- ``preprocess W workers``: the same through the reading workers that scoring uses;
- ``model``: ``Detector.predict`` (maps, smoothing, calibration, scores) on preprocessed batches held in
  memory, fp32 and (where the CPU computes bf16 natively, or with ``--bf16 yes``) bf16 autocast;
- ``predict_files``: files in, scores and maps on the model's grid out (maps reach the scan's grid only
  when asked for);
- ``infer``: ``medvq.inference.infer`` (what ``medvq infer`` runs, without interpreter start-up), with
  overlay PNGs and without (``--no-overlays``), neither with ``.npy`` maps.

Each is reported as scans per second of wall time and as CPU milliseconds per scan summed over the
process and its reading workers (``_cpu_ms``): next to other jobs the first follows the machine's load,
the second much less.

A run is scored at another size than it was trained at by a copy of the run folder whose config says
that size (and whose calibration record says so): the weights are the same (the networks are
convolutional), so the timing is that of a model trained at that size; its scores mean nothing. ``--memory-scans`` runs ``infer --no-overlays --no-npy``
on that many scans (the data's scans repeated) in a fresh process each and reports its peak resident
memory and that of its reading workers; ``--scale N`` is short for ``--memory-scans N/10,N``. The 1-minute
load average is printed next to every figure, and a markdown table of the rates (scans per second) and of
the memory runs closes the output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from medvq.config import InferenceConfig
from medvq.data.dataset import ScanDataset
from medvq.data.loader import prepared_batches
from medvq.data.samples import Sample, collect_images
from medvq.detector import Detector
from medvq.inference import infer


def load() -> float:
    return os.getloadavg()[0]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (reading workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def rate(n: int, fn, into: dict, name: str) -> None:
    """Scans per second of wall time, and CPU milliseconds per scan (all processes): on a shared machine
    the wall-time rate follows the load, the CPU time much less."""
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    into[name] = n / (time.perf_counter() - start)
    into[f"{name}_cpu_ms"] = (cpu_seconds() - cpu) / n * 1e3


def sized_run(run: Path, size: int, tmp: Path) -> Path:
    """The run itself at its own size, else a copy whose config asks for ``size``."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config["data"]["image_size"] == size:
        return run
    copy = tmp / f"{run.name}-{size}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "samples", "latents", "plots", "eval*"), dirs_exist_ok=True)
    config["data"]["image_size"] = size
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    calibration = json.loads((copy / "calibration.json").read_text())
    if isinstance(calibration.get("settings", {}).get("data"), dict):  # loading checks the config against these
        calibration["settings"]["data"]["image_size"] = size
        (copy / "calibration.json").write_text(json.dumps(calibration))
    return copy


def measure(run: Path, paths: list[Path], speed: InferenceConfig, tmp: Path, bf16: bool) -> dict:
    samples = [Sample(path=p) for p in paths]
    n = len(samples)
    det = Detector.load(run, inference=speed)
    pre = det.preprocessor
    out: dict = {"run": str(run), "method": det.config.method, "image_size": det.config.data.image_size, "scans": n}
    rate(n, lambda: [pre.load(s) for s in samples], out, "preprocess_1proc")
    out["load_preprocess_1proc"] = load()
    rate(n, lambda: list(prepared_batches(samples, pre, batch_size=speed.batch_size, workers=speed.workers, keep_originals=True)), out, f"preprocess_{speed.workers}workers")
    data = ScanDataset(samples, pre, load_masks=False, workers=speed.workers)
    for precision in ("32", "bf16") if bf16 else ("32",):
        det.inference = speed.model_copy(update={"precision": precision})
        det.predict_dataset(data.subset(range(min(n, speed.batch_size))), speed.batch_size)  # warm-up
        rate(n, lambda: det.predict_dataset(data, speed.batch_size), out, f"model_{precision}")
    out["load_model"] = load()
    det.inference = speed
    rate(n, lambda: [r.scores for r in det.iter_files(paths)], out, "predict_files")
    out["load_predict_files"] = load()
    quiet = __import__("rich.console", fromlist=["Console"]).Console(stderr=True, quiet=True)
    for overlays in (True, False):
        dest = tmp / f"infer-{overlays}"
        rate(n, lambda: infer(run, paths, dest, save_npy=False, save_overlays=overlays, inference=speed, console=quiet), out, f"infer_{'overlays' if overlays else 'no_overlays'}")
        shutil.rmtree(dest, ignore_errors=True)
    out["load_infer"] = load()
    return out


MEMORY_CHILD = """
import resource, sys, json
from pathlib import Path
from rich.console import Console
from medvq.config import InferenceConfig
from medvq.inference import infer
run, out, n, listing, speed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
paths = [Path(p) for p in Path(listing).read_text().split(chr(10)) if p]
paths = (paths * (n // len(paths) + 1))[:n]
infer(run, paths, out, save_npy=False, save_overlays=False, inference=InferenceConfig(**speed), console=Console(stderr=True, quiet=True))
print(json.dumps({"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def peak_memory(run: Path, paths: list[Path], n: int, speed: InferenceConfig, tmp: Path) -> dict:
    listing = tmp / "paths.txt"
    listing.write_text("\n".join(map(str, paths)))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(run), str(tmp / f"mem-{n}"), str(n), str(listing), speed.model_dump_json()],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.rmtree(tmp / f"mem-{n}", ignore_errors=True)
    return {"scans": n, **json.loads(done.stdout.strip().splitlines()[-1]), "scans_per_s": n / seconds, "load": load()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-dev")
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--max-scans", type=int, default=None, help="Use at most this many of the data's scans.")
    p.add_argument("--batch-size", type=int, default=InferenceConfig().batch_size)
    p.add_argument("--workers", type=int, default=InferenceConfig().workers)
    p.add_argument("--memory-scans", default="", help="Comma-separated scan counts for the peak-memory runs (e.g. 1000,10000).")
    p.add_argument("--scale", type=int, default=None, help="Peak memory of infer on N/10 and N scans (the data's scans repeated): --memory-scans N/10,N.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto", help="Also time the model under bf16 autocast (auto: where the CPU computes bf16 natively).")
    args = p.parse_args()
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and (torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale:
        args.memory_scans = f"{args.scale // 10},{args.scale}"
    paths = [s.path for s in collect_images([args.data])][: args.max_scans]
    speed = InferenceConfig(batch_size=args.batch_size, workers=args.workers)
    cpu = {"name": cpu_name(), "cpus": os.cpu_count(), "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "capability": torch.backends.cpu.get_cpu_capability()}
    print(f"{len(paths)} scans from {args.data}; torch threads {torch.get_num_threads()}; batch {speed.batch_size}, {speed.workers} workers; {cpu}")
    results = {"cpu": cpu, "threads": torch.get_num_threads(), "speed": speed.model_dump(), "timings": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="medvq-speed-") as tmp:
        tmp = Path(tmp)
        for run in args.runs:
            for size in [int(s) for s in args.sizes.split(",") if s]:
                r = measure(sized_run(run, size, tmp), paths, speed, tmp, bf16)
                results["timings"].append(r)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            for n in [int(s) for s in args.memory_scans.split(",") if s]:
                m = {"run": str(run), **peak_memory(run, paths, n, speed, tmp)}
                results["memory"].append(m)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()}), flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def markdown(results: dict) -> str:
    """The rates as a table (scans per second of wall time), then the memory runs."""
    rows = results["timings"]
    precisions = ["32"] + (["bf16"] if any("model_bf16" in r for r in rows) else [])
    head = ["method", "size", "read + preprocess, 1 process", f"the same, {results['speed']['workers']} workers"]
    head += [f"model ({'fp32' if p == '32' else 'bf16'})" for p in precisions]
    head += ["`predict_files`", "÷ model (fp32)", "`infer`, no overlays", "`infer` with overlays", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        loads = [r[k] for k in r if k.startswith("load_")]
        cells = [r["method"], str(r["image_size"]), f"{r['preprocess_1proc']:.1f}", f"{r[next(k for k in r if k.startswith('preprocess_') and k.endswith('workers'))]:.1f}"]
        cells += [f"{r[f'model_{p}']:.1f}" for p in precisions]
        cells += [f"{r['predict_files']:.1f}", f"{r['predict_files'] / r['model_32']:.2f}", f"{r['infer_no_overlays']:.1f}", f"{r['infer_overlays']:.1f}", f"{min(loads):.1f}–{max(loads):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if results["memory"]:
        lines += ["", "| run | scans | scoring process | largest reading worker | scans/s | load |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {Path(m['run']).name} | {m['scans']:,} | {m['self_mb']:.0f} MB | {m['workers_mb']:.0f} MB | {m['scans_per_s']:.1f} | {m['load']:.1f} |" for m in results["memory"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
