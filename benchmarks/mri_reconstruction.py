"""Reconstruction benchmark: VQ-VAE-2 against the single-level VQ-VAE with the same code budget.

    python benchmarks/mri_reconstruction.py --out bench-recon                     # both datasets, both methods
    python benchmarks/mri_reconstruction.py --datasets colin27 --epochs 30 --images-per-epoch 1000
    python benchmarks/mri_reconstruction.py --out bench-recon --datasets colin27 --epochs 36 --resume   # train on

Datasets (both at --image-size, 128 px by default):
- colin27: the Colin27 T1 volume (Debian mricron-data, ``ch2.nii.gz``), axial slices (empty ones skipped),
  cut into contiguous slabs along the axis, inferior to superior: train 60 %, validation 10 %, test 30 %,
  with at least --gap-mm between any two slabs (``medvq.data.nifti.split_by_position``), so every test
  slice lies at least that far from every training slice.
- kermany: kermany-dev NORMAL OCT B-scans with the project's patient split (``training_splits``); the
  model trains on NORMAL images of the training patients and is tested on the NORMAL images of the test
  patients.

Methods: ``vqvae2`` (top and bottom codes, --codebook-size each) and ``vqvae`` built by
``equal_budget_vqvae``: the bottom level's grid and a codebook carrying the same bits per image.
Everything else (widths, depths, optimiser, epochs, images per epoch, batch size, precision, seed) is
shared. Training rescales images at random by 0.6-1.4 and shifts them by up to 10 % of the side
(--zoom, --shift) and decays the learning rate by a cosine (--lr-schedule): the superior Colin27 slices
show a smaller brain outline than any training slice (with transposed-convolution upsampling, --upsampling
transpose, the VQ-VAE-2 reached test SSIM 0.70 without the rescaling and 0.82 with it at 30 epochs). Each training runs in a process of its own through ``medvq.engine.train.train_run`` (the run
directories stay under OUT/runs/), so the peak resident memory reported is that run's own.

Reported per dataset and method: test SSIM, PSNR and MSE (data range 1.0, mean and standard deviation
over test images), best validation loss, seconds per training epoch and images per second, peak memory
(RSS; and CUDA peak allocation on a GPU), parameters and code bits per image. Writes OUT/results.json
and OUT/results.md (runs of other datasets or methods already in OUT/results.json are kept, so the
table can be built in parts). The load average of the machine at the start and end of each run is
recorded, because shared machines slow training down.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

DEFAULT_COLIN27 = Path(os.environ.get("MEDVQ_COLIN27", "/usr/share/mricron/templates/ch2.nii.gz"))
DEFAULT_KERMANY = Path(os.environ.get("MEDVQ_KERMANY_DEV", Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-dev"))
SLABS = {"train": 0.6, "val": 0.1, "test": 0.3}


def run_configs(args) -> dict[str, dict]:
    """The two methods' run configs (as dicts) with everything but the architecture shared."""
    from medvq.models.vqvae2.model import VQVAE2Config, equal_budget_vqvae

    v2 = VQVAE2Config(
        hidden_channels=args.hidden_channels,
        residual_channels=args.residual_channels,
        residual_layers=args.residual_layers,
        embedding_dim=args.embedding_dim,
        codebook_size_top=args.codebook_size,
        codebook_size_bottom=args.codebook_size,
        **({"upsampling": args.upsampling} if args.upsampling else {}),
    )
    common = {
        "data": {"image_size": args.image_size, "zoom": args.zoom, "shift": args.shift},
        "train": {
            "epochs": args.epochs,
            "min_images_per_epoch": args.images_per_epoch,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "lr_schedule": args.lr_schedule,
            "precision": args.precision,
            "device": args.device,
            "patience": args.epochs,
            "seed": args.seed,
            "samples_per_epoch": 8,
        },
    }
    return {
        "vqvae2": {"method": "vqvae2", "model": v2.model_dump(), **common},
        "vqvae": {"method": "vqvae", "model": equal_budget_vqvae(v2).model_dump(), **common},
    }


def splits_for(dataset: str, config, data: Path, gap_mm: float) -> dict[str, list]:
    from medvq.data.nifti import VolumeOptions, scan_nifti_file, split_by_position
    from medvq.engine.train import training_splits

    if dataset == "colin27":
        samples = scan_nifti_file(data, VolumeOptions.from_config(config.data, config.model.stride))
        return split_by_position(samples, SLABS, gap_mm)
    parts = training_splits(config, data)
    return {**parts, "test": [s for s in parts["test"] if s.label == config.data.normal_class]}


def job(dataset: str, method: str, config_dict: dict, data: str, out: str, gap_mm: float, resume: bool = False) -> dict:
    """Train one method on one dataset and measure it (runs in a fresh process).

    ``resume``: continue the run directory's finished epochs up to the (larger) epoch count of
    ``config_dict``, with the same splits; the other settings stay those the run was started with.
    """
    import numpy as np
    import torch
    from rich.console import Console

    from medvq.config import build_config
    from medvq.data.dataset import ScanDataset
    from medvq.detector import Detector
    from medvq.engine.train import resolve_precision, train_run
    from medvq.evaluation.reconstruction import reconstruction_metrics, summarize
    from medvq.models.registry import get_method
    from medvq.models.vqvae2.model import code_bits

    run_dir = Path(out) / "runs" / f"{dataset}-{method}"
    config = build_config(config_dict)
    if resume:
        from medvq.engine.run_dir import RunDir

        config = build_config(RunDir(run_dir).read_config().model_dump(mode="json"), {"train": {"epochs": config.train.epochs, "patience": config.train.epochs}})
    parts = splits_for(dataset, config, Path(data), gap_mm)
    started = time.perf_counter()
    result = train_run(config, data, run_dir, splits=parts, resume=resume, overwrite=not resume, progress=False, console=Console(stderr=True))
    train_seconds = time.perf_counter() - started
    history = list(csv.DictReader(open(run_dir / "metrics.csv")))
    epoch_seconds = [float(r["seconds"]) for r in history]

    detector = Detector.load(run_dir, device="cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu")
    test = ScanDataset(parts["test"], detector.preprocessor, load_masks=False)
    pred = detector.predict_dataset(test, batch_size=32)
    per_image = reconstruction_metrics(pred.reconstruction, test.images.float())
    positions = {k: [s.meta["position_mm"] for s in v] for k, v in parts.items()} if dataset == "colin27" else None
    model = get_method(method).build_model(config.model)
    accelerator = "gpu" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu"
    return {
        "dataset": dataset,
        "method": method,
        "images": {k: len(v) for k, v in parts.items()},
        "patients": {k: len({s.patient_id for s in v}) for k, v in parts.items()},
        "test_gap_mm": float(np.min(np.abs(np.subtract.outer(positions["test"], positions["train"])))) if positions else None,
        "test": summarize(per_image),
        "best_val_loss": result.best_val_loss,
        "epochs": len(history),
        "val_ssim_last_epoch": float(history[-1]["val_ssim"]) if "val_ssim" in history[-1] and history[-1]["val_ssim"] else None,
        "seconds_per_epoch": float(np.mean(epoch_seconds)),
        "images_per_epoch": max(len(parts["train"]), config.train.min_images_per_epoch),
        "epoch_seconds_total": float(np.sum(epoch_seconds)),  # every epoch of the run, resumed ones included
        "wall_seconds_this_call": train_seconds,  # training, calibration and code export of this call
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "code_bits_per_image": code_bits(config.model, config.data.image_size),
        "codebook": {"top": config.model.codebook_size_top, "bottom": config.model.codebook_size_bottom}
        if method == "vqvae2"
        else {"single": config.model.codebook_size},
        "precision": resolve_precision(config.train.precision, accelerator),
        "run_dir": str(run_dir),
    }


def markdown(results: list[dict]) -> str:
    head = "| data | method | test SSIM | test PSNR (dB) | test MSE | s / epoch | images / s | peak RSS (MiB) | parameters | code bits / image |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for r in results:
        t = r["test"]
        rows.append(
            f"| {r['dataset']} ({r['images']['test']} test) | {r['method']} | {t['ssim']:.4f} ± {t['ssim_std']:.4f} | {t['psnr']:.2f} ± {t['psnr_std']:.2f} | "
            f"{t['mse']:.2e} | {r['seconds_per_epoch']:.0f} | {r['images_per_epoch'] / r['seconds_per_epoch']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{r['parameters']:,} | {r['code_bits_per_image']:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-recon"), help="Output folder (run directories, results.json, results.md).")
    p.add_argument("--datasets", default="colin27,kermany", help="Comma-separated: colin27, kermany.")
    p.add_argument("--methods", default="vqvae2,vqvae", help="Comma-separated: vqvae2, vqvae (equal code budget).")
    p.add_argument("--colin27", type=Path, default=DEFAULT_COLIN27, help="Colin27 T1 volume (ch2.nii.gz).")
    p.add_argument("--kermany", type=Path, default=DEFAULT_KERMANY, help="kermany-dev folder (CLASS/*.jpeg).")
    p.add_argument("--gap-mm", type=float, default=10.0, help="Least distance between the Colin27 train, validation and test slabs.")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--images-per-epoch", type=int, default=400, help="Training images per epoch (small sets are cycled).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"], help="Learning rate after the warm-up (cosine: decay to 1%% at the last epoch).")
    p.add_argument("--zoom", type=float, default=0.4, help="Training augmentation: random rescaling by a factor in [1 - zoom, 1 + zoom].")
    p.add_argument("--shift", type=float, default=0.1, help="Training augmentation: random translation by up to this share of the side.")
    p.add_argument("--hidden-channels", type=int, default=64)
    p.add_argument("--residual-channels", type=int, default=32)
    p.add_argument("--residual-layers", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--codebook-size", type=int, default=256, help="VQ-VAE-2 codes per level; the VQ-VAE gets the same bits per image.")
    p.add_argument("--upsampling", default=None, choices=["resize", "transpose"], help="VQ-VAE-2 decoder upsampling (default: the model's); the VQ-VAE keeps transposed convolutions.")
    p.add_argument("--precision", default="auto", help="auto, 32, bf16-mixed, 16-mixed.")
    p.add_argument("--device", default="auto", help="auto, cpu, gpu.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="Continue the runs in OUT/runs up to --epochs (their other settings are kept).")
    args = p.parse_args(argv)

    data = {"colin27": args.colin27, "kermany": args.kermany}
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for d in datasets:
        if d not in data:
            p.error(f"unknown dataset {d!r} (colin27, kermany)")
        if not data[d].exists():
            p.error(f"{data[d]} not found (Colin27: apt-get install mricron-data; kermany-dev: --kermany)")
    configs = run_configs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from medvq.io import atomic_write_text

    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_start": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    # Runs of other datasets / methods already in OUT/results.json are kept, so the table can be built in parts.
    previous = json.loads((args.out / "results.json").read_text())["results"] if (args.out / "results.json").is_file() else []
    chosen = {(d, m) for d in datasets for m in methods}
    results = [r for r in previous if (r["dataset"], r["method"]) not in chosen]
    context = multiprocessing.get_context("spawn")
    for dataset in datasets:
        for method in methods:
            print(f"training {method} on {dataset} ...", file=sys.stderr, flush=True)
            load_start = os.getloadavg()
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                r = pool.submit(job, dataset, method, configs[method], str(data[dataset]), str(args.out), args.gap_mm, args.resume).result()
            r["load_average"] = {"start": load_start, "end": os.getloadavg()}
            results.append(r)
            results.sort(key=lambda x: (list(data).index(x["dataset"]), ["vqvae2", "vqvae"].index(x["method"])))
            t = r["test"]
            print(f"  {dataset} {method}: test SSIM {t['ssim']:.4f}  PSNR {t['psnr']:.2f} dB  {r['seconds_per_epoch']:.0f} s/epoch  peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
            meta["load_average_end"] = os.getloadavg()
            atomic_write_text(args.out / "results.json", json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results)
    atomic_write_text(args.out / "results.md", table)
    print(table)


if __name__ == "__main__":
    main()
