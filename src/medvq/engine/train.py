"""Training a VQ-VAE end to end: data by patient -> Lightning fit -> calibration -> latent export.

Multi-GPU / multi-node training is configuration: ``--device gpu --devices 4 --strategy ddp``
(and ``--num-nodes N`` under a cluster launcher); mixed precision is ``--precision bf16-mixed``.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from rich.console import Console
from torch.utils.data import DataLoader, RandomSampler

from medvq.config import RunConfig
from medvq.data.dataset import ScanDataset, StreamingScanDataset
from medvq.data.nifti import VolumeOptions
from medvq.data.preprocess import Preprocessor
from medvq.data.samples import Sample, dataset_splits, patient_summary
from medvq.engine.callbacks import EpochArtifacts
from medvq.engine.run_dir import RunDir, require_new_or_resumable
from medvq.errors import DatasetError, MedvqError
from medvq.io import atomic_save_npz, atomic_write_text
from medvq.models.registry import get_method


MIN_CALIBRATION_NORMALS = 20  # below this a 95 % specificity threshold is simply the highest normal score


@dataclass
class TrainResult:
    run: RunDir
    epochs: int
    seconds: float
    best_val_loss: float


def training_splits(config: RunConfig, data_root: str | Path) -> dict[str, list[Sample]]:
    """Patient-grouped train/val/test over all classes; train and val keep only the training classes.

    Unsupervised methods train on ``data.train_classes`` (NORMAL by default); supervised ones (a classifier)
    on every class of the training patients.
    """
    d = config.data
    volume = VolumeOptions.from_config(d, getattr(config.model, "stride", 1))
    parts = dataset_splits(
        data_root, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed, volume=volume, patient_pattern=d.patient_pattern
    )
    present = {s.label for items in parts.values() for s in items}
    keep = set(d.train_classes) if get_method(config.method).normal_only else present
    if present == {""}:  # unlabelled data (NIfTI slices): every image trains
        keep = present
    missing = keep - present
    if missing:
        raise DatasetError(f"training class(es) {', '.join(sorted(missing))} not found (found: {', '.join(sorted(present))})", path=data_root, fix="set --train-classes")
    train = [s for s in parts["train"] if s.label in keep]
    val = [s for s in parts["val"] if s.label in keep]
    if d.max_train_images is not None and len(train) > d.max_train_images:
        train = sorted(random.Random(d.split_seed).sample(train, d.max_train_images), key=lambda s: str(s.path))
    if len(train) < 2:
        raise DatasetError(f"only {len(train)} training image(s){_of(keep)}", path=data_root, fix="a VQ-VAE needs a folder of normal scans")
    if len(val) < 2:
        raise DatasetError(
            f"only {len(val)} held-out validation image(s){_of(keep)}: early stopping and score calibration need them",
            path=data_root,
            fix="add a val/ split or raise --val-fraction",
        )
    # The validation patients' other scans (e.g. their abnormal ones) choose the run's primary map, never the test patients'.
    val_other = [s for s in parts["val"] if s.label not in keep]
    return {"train": train, "val": val, "val_abnormal": val_other, "test": parts["test"]}


def _of(classes: set[str]) -> str:
    return f" of class {', '.join(sorted(classes))}" if classes != {""} else ""


def _accelerator(config: RunConfig) -> str:
    device = config.train.device
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> bf16-mixed where the hardware has native bf16, else 32."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "cpu":
        return "bf16-mixed" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32"
    return "32"


def is_rank_zero() -> bool:
    """True in the main process (and in the first process of a multi-process run)."""
    return rank_zero_only.rank == 0


def quiet_lightning() -> None:
    """Lightning logs hardware facts and tips at INFO; medvq prints its own summary instead."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_trainer(config: RunConfig, run: RunDir, callbacks: list[L.Callback], progress: bool) -> L.Trainer:
    quiet_lightning()
    t = config.train
    accelerator = _accelerator(config)
    precision = resolve_precision(t.precision, accelerator)
    if accelerator == "cpu" and precision == "16-mixed":
        raise MedvqError("fp16 mixed precision is not available on the CPU", fix="use --precision bf16-mixed or 32")
    devices: int | str | list[int] = t.devices
    if isinstance(devices, str) and devices != "auto":
        devices = [int(x) for x in devices.split(",") if x.strip()] if "," in devices else int(devices)
    if accelerator == "cpu" and devices == "auto":
        devices = 1  # "auto" would start one process per core
    ckpt = ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=1, monitor=None, save_on_train_epoch_end=True, enable_version_counter=False)
    stop = EarlyStopping(monitor="val/loss", patience=t.patience, min_delta=t.min_delta, mode="min")
    bar = [RichProgressBar(leave=False)] if progress and sys.stderr.isatty() else []
    return L.Trainer(
        default_root_dir=run.root,
        accelerator=accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_epochs=t.epochs,
        callbacks=[*callbacks, stop, ckpt, *bar],
        logger=False,
        enable_progress_bar=bool(bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        log_every_n_steps=10,
    )


def train_run(
    config: RunConfig,
    data_root: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    splits: dict[str, list[Sample]] | None = None,
) -> TrainResult:
    """Train ``config.method`` on ``data_root`` into the run directory ``out``.

    ``splits`` ({'train', 'val'[, 'test']} -> samples) replaces the patient split of ``data_root``, for
    protocols of their own (e.g. slabs of one volume, ``medvq.data.nifti.split_by_position``).
    """
    console = console or Console(stderr=True)
    run = RunDir(out)
    if is_rank_zero():  # further DDP processes start after the first has created the run directory
        require_new_or_resumable(run, resume, overwrite)
    started = time.perf_counter()
    L.seed_everything(config.train.seed, workers=True, verbose=False)

    method = get_method(config.method)
    if method.prepare is not None and splits is None:  # built on another run (a prior on a VQ-VAE): its config and patient split
        config, splits = method.prepare(config, data_root)
    parts = splits if splits is not None else training_splits(config, data_root)
    if method.resolve_config is not None:  # e.g. a classifier's class names and weights, recorded in config.yaml
        config = method.resolve_config(config, [s.label for s in parts["train"]])
    targets = (lambda items: method.targets(config, [s.label for s in items])) if method.targets is not None else (lambda items: None)
    preprocessor = Preprocessor.from_config(config.data, getattr(config.model, "stride", 1))
    if is_rank_zero():
        console.print(
            f"[bold]medvq[/] training {config.method} on {len(parts['train'])} {'/'.join(sorted({s.label for s in parts['train']} - {''})) or 'unlabelled'} images "
            f"({len({s.patient_id for s in parts['train']})} patients), validating on {len(parts['val'])} -> {run.root}"
        )
        console.print(patient_summary(parts), highlight=False)
    # Every scan is read before the run directory is written: a bad file stops here and leaves nothing behind
    # (streaming methods read training scans batch by batch: only that each exists is checked here).
    train_set = (StreamingScanDataset if method.streams_training else ScanDataset)(
        parts["train"], preprocessor, hflip=config.data.hflip, zoom=config.data.zoom, shift=config.data.shift, load_masks=False, targets=targets(parts["train"]), progress="reading training scans" if progress else None
    )
    val_set = ScanDataset(parts["val"], preprocessor, load_masks=False, targets=targets(parts["val"]), progress="reading validation scans" if progress else None)
    val_other = [s for s in parts.get("val_abnormal", []) if s.label]
    val_abnormal = ScanDataset(val_other, preprocessor, load_masks=False, progress="reading validation scans" if progress else None) if val_other else None
    run.create()
    if is_rank_zero():
        run.write_config(config)
        run.write_split(data_root, parts)
    if method.fit is not None:  # no gradient training (a memory bank): one pass instead of the Lightning trainer
        return fit_run(method, config, run, train_set, val_set, started, console, progress, val_abnormal)

    t = config.train
    loader_kw = dict(num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
    # Few images: cycle them so an epoch is long enough for early stopping to mean something.
    # (Under DDP, Lightning swaps this sampler for a DistributedSampler: one pass over the data per epoch.)
    epoch_size = max(len(train_set), t.min_images_per_epoch)
    sampler = RandomSampler(train_set, replacement=False, num_samples=epoch_size)
    # No drop_last: under DDP each process gets a share of the data that may be smaller than one batch,
    # and BatchNorm2d copes with a last batch of one image (it normalises over H x W too).
    train_loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, **loader_kw)
    val_loader = DataLoader(val_set, batch_size=t.batch_size, shuffle=False, **loader_kw)

    module = method.training_module(config)
    n_samples = min(t.samples_per_epoch, len(val_set))
    artifacts = EpochArtifacts(run, val_set.images[:n_samples].float() if n_samples else None, min_delta=t.min_delta, console=console)
    trainer = build_trainer(config, run, [artifacts], progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*the number of training batches.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen parts of a prior stay in eval mode on purpose
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(run.last_ckpt) if resume else None, weights_only=True)

    if trainer.is_global_zero:
        finish_run(run, config, train_set, val_set, console, val_abnormal)
    return TrainResult(run=run, epochs=trainer.current_epoch, seconds=time.perf_counter() - started, best_val_loss=artifacts.best_loss)


def torch_device(config: RunConfig) -> torch.device:
    """The one device a single-process fit runs on (the first of --devices for a GPU)."""
    accelerator = _accelerator(config)
    if accelerator in ("gpu", "cuda"):
        ids = str(config.train.devices)  # a list ('1,3') names GPUs; a count or 'auto' starts at the first
        return torch.device("cuda", int(ids.split(",")[0])) if "," in ids else torch.device("cuda")
    return torch.device(accelerator)


def fit_run(
    method, config: RunConfig, run: RunDir, train_set: ScanDataset, val_set: ScanDataset, started: float, console: Console, progress: bool, val_abnormal: ScanDataset | None = None
) -> TrainResult:
    """Fit-only methods (``Method.fit``): fit once on the training images, then write the same run directory
    as a trained one: model/best.safetensors, fit.json (counts and seconds of the fit), calibration.json."""
    if is_rank_zero():  # one process fits; the others of a multi-process launch have nothing to do
        model, summary = method.fit(config, train_set, device=torch_device(config), console=console, progress=progress)
        run.save_weights(model, "best")
        atomic_write_text(run.fit_summary, json.dumps(summary, indent=1))
        finish_run(run, config, train_set, val_set, console, val_abnormal)
    return TrainResult(run=run, epochs=0, seconds=time.perf_counter() - started, best_val_loss=float("nan"))


def finish_run(run: RunDir, config: RunConfig, train_set: ScanDataset, val_set: ScanDataset, console: Console, val_abnormal: ScanDataset | None = None) -> None:
    """Calibrate the best model on held-out normals (thresholds included), choose the primary map on the
    validation patients' abnormal scans, and export the training images' code maps (VQ models)."""
    from medvq.detector import Detector

    detector = Detector.load(run.root)
    normal = config.data.normal_class
    if detector.method.normal_only:
        normals = val_set
        abnormals = val_abnormal
    else:  # a classifier validates on every class
        normals = val_set.subset([i for i, s in enumerate(val_set.samples) if s.label == normal])
        rest = [i for i, s in enumerate(val_set.samples) if s.label != normal]
        abnormals = val_set.subset(rest) if rest else None
    if len(normals) < 2:
        raise DatasetError(f"only {len(normals)} held-out {normal} validation image(s): score calibration needs at least 2", fix="raise --val-fraction")
    calibration = detector.calibrate(normals, batch_size=config.train.batch_size, abnormals=abnormals)
    calibration.save(run.calibration)
    if len(normals) < MIN_CALIBRATION_NORMALS:
        console.print(
            f"[yellow]warning[/]: calibrated on only {len(normals)} held-out {normal} scans (fewer than {MIN_CALIBRATION_NORMALS}): "
            "thresholds, percentiles and the out-of-distribution guard rest on few scans; raise --val-fraction or add normal scans"
        )
    codes: dict[str, list[np.ndarray]] = {}
    for b in train_set.batches(64):
        pred = detector.predict(b.image)
        if pred.codes is None:
            break
        levels = {"codes": pred.codes, **{k: v for k, v in pred.extras.items() if k.endswith("codes")}}  # e.g. top_codes of a VQ-VAE-2
        for name, c in levels.items():
            codes.setdefault(name, []).append(c.cpu().numpy().astype(np.int32))
    if codes:
        atomic_save_npz(
            run.latents / "train_codes.npz",
            **{k: np.concatenate(v) for k, v in codes.items()},
            paths=np.array([str(s.path) for s in train_set.samples]),
            frames=np.array([-1 if s.frame is None else s.frame for s in train_set.samples]),
        )
    console.print(f"calibrated on {len(normals)} held-out normal images -> {run.calibration}")
    console.print(f"primary map: {calibration.primary_map} ({calibration.primary_reason})")
