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

from safetensors.torch import load_model, save_model
from torch import nn

from medvq.config import RunConfig, build_config, dump_config, load_yaml
from medvq.data.samples import Sample
from medvq.errors import CheckpointError, MedvqError
from medvq.io import atomic_path, atomic_write_text
from medvq.models.registry import get_method, method_names


def timestamped(base: str | Path = "runs", prefix: str = "vqvae") -> Path:
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
        return self.root / "model" / f"{which}.safetensors"

    # --- writing ---------------------------------------------------------------------------
    def create(self) -> None:
        for d in (self.root, self.plots, self.samples, self.latents, self.checkpoints, self.root / "model"):
            d.mkdir(parents=True, exist_ok=True)

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
        return json.loads(self.split.read_text())

    def load_weights(self, model: nn.Module, which: str = "best") -> nn.Module:
        path = self.weights(which)
        if not path.is_file():
            fallback = self.weights("last")
            if which == "best" and fallback.is_file():
                path = fallback
            else:
                raise CheckpointError(f"no {which} weights", path=path, fix="has training finished at least one epoch?")
        try:
            missing, unexpected = load_model(model, str(path), strict=False)
        except Exception as err:  # shape mismatches surface as RuntimeError from load_state_dict
            raise CheckpointError(
                f"weights do not fit the model built from config.yaml ({str(err).splitlines()[0][:300]})",
                path=path,
                fix="the checkpoint comes from a different configuration; use the config.yaml it was trained with",
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f"weights do not fit the model built from config.yaml (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                path=path,
                fix="the checkpoint comes from a different configuration; use the config.yaml it was trained with",
            )
        return model


def require_new_or_resumable(run: RunDir, resume: bool, overwrite: bool = False) -> None:
    """Never clobber a finished run by accident."""
    if resume:
        if not run.last_ckpt.is_file():
            raise MedvqError("nothing to resume: no checkpoints/last.ckpt", path=run.root, fix="start without --resume")
        return
    if run.root.exists() and any(run.root.iterdir()) and not overwrite:
        raise MedvqError(
            "run directory is not empty", path=run.root, fix="use --resume to continue it, --overwrite to replace it, or another --out"
        )
