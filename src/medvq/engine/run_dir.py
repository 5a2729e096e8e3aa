"""The run directory: one folder per training run, the only thing later commands need.

RUNDIR/
  config.yaml              resolved configuration (rebuilds model, preprocessing and scoring)
  split.json               which images (and patients) were used for training and validation
  model/best.safetensors   weights with the lowest validation loss (shareable; loads without pickle)
  model/last.safetensors   weights after the last finished epoch
  calibration.json         normal-image statistics of every map (see medvq.scoring.calibration)
  fit.json                 fit-only methods (PatchCore): what was fitted, with the seconds of each stage
  metrics.csv              one row per epoch
  plots/loss.png, plots/codebook.png
  samples/epoch_NNN.png    input / reconstruction / residual of fixed validation images
  latents/train_codes.npz  code maps of the training images
  checkpoints/last.ckpt    full training state for --resume (optimizer, epoch, callbacks)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from medvq.config import RunConfig, build_config, dump_config, load_yaml
from medvq.data.samples import Sample
from medvq.errors import CheckpointError, MedvqError
from medvq.io import atomic_path, atomic_write_text, mark_output
from medvq.models.checkpoint import load_run_weights, weights_path
from medvq.models.registry import get_method, method_names


def timestamped(prefix: str, base: str | Path = "runs") -> Path:
    return Path(base) / f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    split = property(lambda self: self.root / "split.json")
    calibration = property(lambda self: self.root / "calibration.json")
    fit_summary = property(lambda self: self.root / "fit.json")
    metrics = property(lambda self: self.root / "metrics.csv")
    plots = property(lambda self: self.root / "plots")
    samples = property(lambda self: self.root / "samples")
    latents = property(lambda self: self.root / "latents")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last_ckpt = property(lambda self: self.root / "checkpoints" / "last.ckpt")

    def weights(self, which: str = "best") -> Path:
        return weights_path(self.root, which)

    # --- writing ---------------------------------------------------------------------------
    def create(self) -> None:
        for d in (self.root, self.plots, self.samples, self.latents, self.checkpoints, self.root / "model"):
            d.mkdir(parents=True, exist_ok=True)
        mark_output(self.root, self.samples, self.plots)  # its images are results, never training or input scans

    def write_config(self, config: RunConfig) -> None:
        atomic_write_text(self.config, dump_config(config))

    def write_split(self, data_root: str | Path, parts: dict[str, list[Sample]]) -> None:
        payload = {
            "data_root": str(Path(data_root).resolve()),
            "splits": {
                name: [
                    {"path": str(s.path.resolve()), "label": s.label, "patient_id": s.patient_id, **({"frame": s.frame} if s.frame is not None else {})}
                    for s in items
                ]
                for name, items in parts.items()
            },
        }
        atomic_write_text(self.split, json.dumps(payload, indent=1))

    def save_weights(self, model: nn.Module, which: str) -> None:
        with atomic_path(self.weights(which)) as tmp:
            save_model(model, str(tmp), metadata={"format": "medvq", "which": which})

    # --- reading ---------------------------------------------------------------------------
    def check_exists(self) -> None:
        if not self.root.is_dir():
            raise CheckpointError("run directory not found", path=self.root, fix="pass the folder that `medvq train` wrote")
        if not self.config.is_file():
            raise CheckpointError("no config.yaml in run directory", path=self.root, fix="is this a medvq run folder?")

    def read_config(self) -> RunConfig:
        self.check_exists()
        data = load_yaml(self.config)
        if isinstance(data.get("model"), dict) and data.get("method") in method_names():
            for key, value in get_method(data["method"]).stored_model_defaults.items():
                data["model"].setdefault(key, value)
        return build_config(data, source=str(self.config))

    def read_split(self) -> dict:
        if not self.split.is_file():
            return {"data_root": None, "splits": {}}
        try:
            record = json.loads(self.split.read_text())
            for items in record["splits"].values():
                for item in items:
                    item["path"], item["patient_id"]  # every entry names its file and patient
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"damaged split record ({err.__class__.__name__}: {err})", path=self.split, fix="restore split.json as training wrote it") from None
        return record

    def load_weights(self, model: nn.Module, which: str = "best") -> nn.Module:
        return load_run_weights(model, self.root, which)


def is_run_dir(path: str | Path) -> bool:
    """A folder medvq wrote with ``medvq train`` (it holds config.yaml)."""
    return (Path(path) / "config.yaml").is_file()


def has_training(run: RunDir) -> bool:
    """Whether any epoch (or fit) finished: weights or a training state exist."""
    return run.last_ckpt.is_file() or run.weights("best").is_file() or run.weights("last").is_file()


def staging_dir(run: RunDir) -> RunDir:
    """Where ``--overwrite`` builds the replacement of a run, beside it; swapped in when training finishes."""
    return RunDir(run.root.parent / f".{run.root.name}.partial")


def resumed_dir(run: RunDir) -> RunDir:
    """The folder ``--resume`` continues: an interrupted replacement of ``run`` if there is one, else ``run``."""
    staged = staging_dir(run)
    return staged if staged.last_ckpt.is_file() and is_run_dir(staged.root) else run


def prepare_run_dir(run: RunDir, resume: bool, overwrite: bool = False, *, clean: bool = True) -> tuple[RunDir, bool]:
    """Never clobber a run by accident. Returns the folder to train in and whether it replaces ``run`` at the end.

    - A new or empty folder, or a run stopped before its first epoch finished (only its config and split
      were written), is trained in place.
    - ``--overwrite`` of a run builds the new run aside (``.NAME.partial``) and swaps it in only when it is
      complete: an interrupted replacement leaves the old run as it was. A folder that is not a medvq run
      is never overwritten.
    - ``--resume`` continues ``checkpoints/last.ckpt``, or an interrupted replacement.
    ``clean``: whether a stale replacement may be removed (the first process only; under DDP the others
    start once it has begun the new one).
    """
    staged = staging_dir(run)
    if resume:
        if resumed_dir(run) == staged:
            return staged, True
        if run.last_ckpt.is_file():
            return run, False
        if is_run_dir(run.root) and not has_training(run):
            raise MedvqError("nothing to resume: the run stopped before its first epoch finished", path=run.root, fix="start it again without --resume; the folder is reused")
        raise MedvqError("nothing to resume: no checkpoints/last.ckpt", path=run.root, fix="start a new run with another --out (or --overwrite to replace this one)")
    if not run.root.exists():
        return run, False
    if not run.root.is_dir():
        raise MedvqError("--out is an existing file, not a folder", path=run.root, fix="choose a folder for the run")
    if not any(run.root.iterdir()):
        return run, False
    if is_run_dir(run.root) and not has_training(run) and not run.calibration.exists():
        return run, False  # stopped before the first epoch: nothing of value to keep
    if not overwrite:
        raise MedvqError("run directory is not empty", path=run.root, fix="use --resume to continue it, --overwrite to replace it, or another --out")
    if not is_run_dir(run.root):
        raise MedvqError("not a medvq run folder (no config.yaml): --overwrite replaces only runs", path=run.root, fix="choose another --out")
    if staged.root.exists() and clean:
        import shutil

        shutil.rmtree(staged.root)  # an earlier replacement that never finished; medvq wrote it
    return staged, True


def swap_in(staged: RunDir, run: RunDir) -> None:
    """Replace ``run`` by the finished ``staged`` run: two renames, then the old run is deleted."""
    import shutil

    old = run.root.parent / f".{run.root.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if run.root.exists():
        run.root.rename(old)
    staged.root.rename(run.root)
    if old.exists():
        shutil.rmtree(old)
