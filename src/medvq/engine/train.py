"""Training a VQ-VAE end to end: data by patient -> Lightning fit -> calibration -> latent export.

Multi-GPU / multi-node training is configuration: ``--device gpu --devices 4 --strategy ddp``
(and ``--num-nodes N`` under a cluster launcher); mixed precision is ``--precision bf16-mixed``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
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
from medvq.engine.callbacks import EpochArtifacts, StopOnNonFiniteLoss
from medvq.engine.run_dir import RunDir, prepare_run_dir, swap_in
from medvq.errors import CheckpointError, DatasetError, MedvqError, TrainingDiverged, TrainingInterrupted
from medvq.io import atomic_save_npz, atomic_write_text
from medvq.scoring.ood import GUARD_WEIGHTS, MAX_REFERENCE
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


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
RESUMABLE_TRAIN_FIELDS = frozenset({"epochs", "device", "devices", "num_nodes", "strategy", "num_workers", "patience", "min_delta", "samples_per_epoch"})


def _device_count(devices: str) -> int | list[int] | str:
    if devices == "auto":
        return devices
    try:
        return [int(x) for x in devices.split(",") if x.strip()] if "," in devices else int(devices)
    except ValueError:
        raise MedvqError(f"--devices {devices!r} is not a count, a list like 0,1 or auto") from None


def check_training_setup(config: RunConfig) -> None:
    """Refuse, before anything is read or written, settings this machine or method cannot run."""
    t = config.train
    if t.device not in ACCELERATORS:
        raise MedvqError(f"unknown --device {t.device!r}", fix=f"use one of {', '.join(ACCELERATORS)}")
    accelerator = _accelerator(config)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise MedvqError(f"--device {t.device}: no CUDA GPU is visible to PyTorch", fix="use --device cpu (or auto)")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise MedvqError("--device mps: Apple's Metal backend is not available here", fix="use --device cpu (or auto)")
    devices = _device_count(t.devices)
    available = torch.cuda.device_count() if accelerator in ("gpu", "cuda") else (1 if accelerator == "mps" else os.cpu_count() or 1)
    wanted = max(devices) + 1 if isinstance(devices, list) and devices else devices
    if isinstance(wanted, int) and (wanted < 1 or wanted > available):
        raise MedvqError(f"--devices {t.devices}: this machine has {available} {accelerator} device(s)", fix=f"use a count from 1 to {available}")
    from lightning.pytorch.strategies import StrategyRegistry

    if t.strategy != "auto" and t.strategy not in StrategyRegistry.available_strategies():
        raise MedvqError(f"unknown --strategy {t.strategy!r}", fix="use auto, ddp, ddp_spawn, fsdp or deepspeed")
    if accelerator == "cpu" and t.precision in ("16-mixed", "bf16-true"):
        raise MedvqError(f"--precision {t.precision} is not available for training on the CPU", fix="use auto, bf16-mixed or 32")
    method = get_method(config.method)
    channels = getattr(config.model, "in_channels", 1)
    if channels != 1 and not method.gray_to_rgb:  # scans are read as one gray channel (some models repeat it as RGB themselves)
        raise MedvqError(f"--in-channels {channels}: medvq reads every scan as one gray channel", fix="use --in-channels 1")
    available_maps = set(method.maps(config.model)) | set(method.map_names)
    for option, names in (("--maps", config.score.maps), ("--combine", config.score.combine)):
        unknown = sorted(set(names or []) - available_maps)
        if unknown:
            raise MedvqError(f"{option}: unknown map(s) {', '.join(unknown)} for {config.method}", fix=f"choose from {', '.join(method.maps(config.model))}")


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
    devices = _device_count(t.devices)  # checked by check_training_setup
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
    check_training_setup(config)
    target = RunDir(out)
    # A replaced run is built aside and swapped in at the end; an interruption leaves the old one whole.
    run, replaces = prepare_run_dir(target, resume, overwrite, clean=is_rank_zero())
    started = time.perf_counter()
    L.seed_everything(config.train.seed, workers=True, verbose=False)

    method = get_method(config.method)
    if method.prepare is not None and splits is None:  # built on another run (a prior on a VQ-VAE): its config and patient split
        config, splits = method.prepare(config, data_root, RunDir)
    parts = splits if splits is not None else training_splits(config, data_root)
    if method.resolve_config is not None:  # e.g. a classifier's class names and weights, recorded in config.yaml
        config = method.resolve_config(config, [s.label for s in parts["train"]])
    if resume:  # nothing changes in the run until data, settings and training state agree with it
        check_resumable(run, config, data_root, parts)
    targets = (lambda items: method.targets(config, [s.label for s in items])) if method.targets is not None else (lambda items: None)
    preprocessor = Preprocessor.from_config(config.data, getattr(config.model, "stride", 1))
    if is_rank_zero():
        console.print(
            f"[bold]medvq[/] training {config.method} on {len(parts['train'])} {'/'.join(sorted({s.label for s in parts['train']} - {''})) or 'unlabelled'} images "
            f"({len({s.patient_id for s in parts['train']})} patients), validating on {len(parts['val'])} -> {target.root}"
        )
        console.print(patient_summary(parts), highlight=False)
    # Every scan is read before the run directory is written: a bad file stops here and leaves nothing behind
    # (streaming methods read training scans batch by batch: only that each exists is checked here).
    train_set = (StreamingScanDataset if method.streams_training else ScanDataset)(
        parts["train"], preprocessor, hflip=config.data.hflip, zoom=config.data.zoom, shift=config.data.shift, load_masks=False, targets=targets(parts["train"]), progress="reading training scans" if progress else None
    )
    val_set = ScanDataset(parts["val"], preprocessor, load_masks=False, targets=targets(parts["val"]), progress="reading validation scans" if progress else None)
    train_set, val_set = _without_blank(train_set, "training", console), _without_blank(val_set, "validation", console)
    val_other = [s for s in parts.get("val_abnormal", []) if s.label]
    val_abnormal = ScanDataset(val_other, preprocessor, load_masks=False, progress="reading validation scans" if progress else None) if val_other else None
    if val_abnormal is not None:
        val_abnormal = _without_blank(val_abnormal, "abnormal validation", console)
    run.create()
    if is_rank_zero():
        run.write_config(config)  # a resumed run records what changed (e.g. more epochs)
        if not resume:
            run.write_split(data_root, parts)
    if method.training == "fit":  # no gradient training (a memory bank): one pass instead of the Lightning trainer
        result = fit_run(method, config, run, train_set, val_set, started, console, progress, val_abnormal)
        if replaces and is_rank_zero():
            swap_in(run, target)
        return TrainResult(run=target, epochs=result.epochs, seconds=result.seconds, best_val_loss=result.best_val_loss)

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
    trainer = build_trainer(config, run, [artifacts, StopOnNonFiniteLoss(run)], progress)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*the number of training batches.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen parts of a prior stay in eval mode on purpose
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(run.last_ckpt) if resume else None, weights_only=True)
        if trainer.is_global_zero:
            finish_run(run, config, train_set, val_set, console, val_abnormal)
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and not trainer.interrupted:  # Lightning turns Ctrl-C into exit(1)
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C while it shuts down
        raise TrainingInterrupted(len(artifacts.history), target.root, resumable=run.last_ckpt.is_file()) from None
    if replaces and trainer.is_global_zero:
        swap_in(run, target)
    return TrainResult(run=target, epochs=trainer.current_epoch, seconds=time.perf_counter() - started, best_val_loss=artifacts.best_loss)


def _without_blank(dataset: ScanDataset, role: str, console: Console) -> ScanDataset:
    """Scans without a single valid pixel (saturated or blank) carry nothing to learn or calibrate: left out, counted."""
    if isinstance(dataset, StreamingScanDataset):  # reads each scan when it is used: nothing to look at here
        return dataset
    blank = dataset.blank_indices()
    if not blank:
        return dataset
    names = ", ".join(dataset.samples[i].name for i in blank[:3]) + (" ..." if len(blank) > 3 else "")
    console.print(f"[yellow]skipped[/] {len(blank)} {role} scan(s) without any valid pixel (saturated or blank): {names}")
    return dataset.subset([i for i in range(len(dataset)) if i not in set(blank)])


def check_resumable(run: RunDir, config: RunConfig, data_root: str | Path, parts: dict[str, list[Sample]]) -> None:
    """Resuming continues the same run: same settings (but those in RESUMABLE_TRAIN_FIELDS), same training and
    validation images, a readable training state. Checked before anything in the run is written."""
    stored = run.read_config().model_dump(mode="json")
    wanted = config.model_dump(mode="json")
    for section in (stored, wanted):
        for key in RESUMABLE_TRAIN_FIELDS:
            section["train"].pop(key, None)
    changed = sorted(f"{s}.{k}" for s in wanted if isinstance(wanted[s], dict) for k in wanted[s] if stored.get(s, {}).get(k) != wanted[s][k])
    changed += [s for s in wanted if not isinstance(wanted[s], dict) and stored.get(s) != wanted[s]]
    if changed:
        raise MedvqError(f"cannot change {', '.join(changed)} when resuming", path=run.root, fix=f"only {', '.join(sorted(RESUMABLE_TRAIN_FIELDS))} may change; start a new run for other settings")
    record = run.read_split()
    for name in ("train", "val"):
        before = {(item["path"], item.get("frame")) for item in record.get("splits", {}).get(name, [])}
        now = {(str(s.path.resolve()), s.frame) for s in parts[name]}
        if record.get("splits") and before != now:
            raise DatasetError(
                f"gives {len(now - before)} {name} image(s) the run did not have and lacks {len(before - now)} it had",
                path=data_root,
                fix=f"resume with the data the run was trained on ({record.get('data_root')}), or start a new run",
            )
    try:
        torch.load(run.last_ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or garbage: whatever torch raises, the file is unusable
        raise CheckpointError(
            f"training state cannot be read ({err.__class__.__name__})",
            path=run.last_ckpt,
            fix="the finished epochs' weights are in model/; start a new run (--overwrite or another --out) to train again",
        ) from None


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
    train_normals = [i for i, s in enumerate(train_set.samples) if s.label == normal]
    if len(train_normals) > MAX_REFERENCE:  # evenly spaced, enough for the guard's nearest-neighbour distance
        train_normals = [train_normals[i] for i in np.linspace(0, len(train_normals) - 1, MAX_REFERENCE).round().astype(int)]
    calibration = detector.calibrate(normals, batch_size=config.train.batch_size, abnormals=abnormals, reference=train_set.subset(train_normals))
    broken = [name for name, st in calibration.stats.items() if not np.all(np.isfinite([st.pixel_mean, st.pixel_std, *st.normal_scores]))]
    if broken:  # weights that diverged without a non-finite training loss: no calibration.json is better than a wrong one
        raise TrainingDiverged(
            f"the trained model gives non-finite {', '.join(broken)} values on the validation normals; no calibration was written",
            path=run.root,
            fix="lower --learning-rate (or use --precision 32) and start a new run",
        )
    calibration.save(run.calibration)
    if calibration.guard is not None and calibration.guard.appearance is not None:  # scoring then loads safetensors only
        run.save_weights(detector.appearance_network(), GUARD_WEIGHTS)
    if len(normals) < MIN_CALIBRATION_NORMALS:
        console.print(
            f"[yellow]warning[/]: calibrated on only {len(normals)} held-out {normal} scans (fewer than {MIN_CALIBRATION_NORMALS}): "
            "thresholds, percentiles and the out-of-distribution guard rest on few scans; raise --val-fraction or add normal scans"
        )
    codes: dict[str, list[np.ndarray]] = {}
    for b in train_set.batches(64):
        levels = detector.codes(b.image)  # e.g. codes and top_codes of a VQ-VAE-2; no maps
        if not levels:
            break
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
