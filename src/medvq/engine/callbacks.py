"""Callbacks that turn each finished epoch into files in the run directory (rank 0 only)."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import lightning as L
import torch
from rich.console import Console

from medvq.engine.run_dir import RunDir
from medvq.errors import TrainingDiverged
from medvq.io import atomic_write_text
from medvq.maps.residual import residual_map
from medvq.report.figures import plot_history, save_image_grid

COLUMNS = ["epoch", "train_loss", "train_rec", "train_commit", "val_loss", "val_rec", "val_commit", "perplexity", "codes_used", "lr", "seconds"]


def metric_columns(history: list[dict[str, Any]]) -> list[str]:
    """The usual columns a run has, then any other key of a module's epoch_summary, then lr and seconds."""
    present = {k for r in history for k in r}
    known = [c for c in COLUMNS if c in present and c not in ("lr", "seconds")]
    extra = list(dict.fromkeys(k for r in history for k in r if k not in COLUMNS))
    return ["epoch", *[c for c in known if c != "epoch"], *extra, "lr", "seconds"]


class EpochArtifacts(L.Callback):
    """Per epoch: metrics.csv row (every key of the module's epoch_summary), loss/codebook/SSIM plots,
    reconstruction samples, best/last safetensors.

    Its state (history and best loss) is saved in Lightning's checkpoint, so a resumed run continues the
    same files. Runs before ModelCheckpoint, which Lightning always calls last.
    """

    def __init__(self, run: RunDir, sample_images: torch.Tensor | None, min_delta: float = 0.0, console: Console | None = None):
        self.run = run
        self.sample_images = sample_images
        self.min_delta = min_delta
        self.history: list[dict[str, Any]] = []
        self.best_loss = float("inf")
        self.console = console or Console(stderr=True)
        self._started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_loss": self.best_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.best_loss = float(state.get("best_loss", float("inf")))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = pl_module.epoch_summary()
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1
        row = {"epoch": epoch, **summary, "lr": trainer.optimizers[0].param_groups[0]["lr"], "seconds": time.perf_counter() - self._started}
        self.history = [r for r in self.history if r["epoch"] < epoch] + [row]
        self._write_metrics()
        plot_history(self.history, self.run.plots)
        if self.sample_images is not None and len(self.sample_images):
            self._save_samples(pl_module, epoch)

        model = pl_module.model
        self.run.save_weights(model, "last")
        monitored = row.get("val_loss", row.get("train_loss", float("inf")))
        improved = monitored < self.best_loss - self.min_delta
        if improved:
            self.best_loss = monitored
            self.run.save_weights(model, "best")
        shown = "  ".join(f"{k} {row[k]:.4g}" for k in ("train_loss", "val_loss", "val_ssim", "perplexity", "codes_used", "val_balanced_accuracy", "val_auroc") if k in row)
        self.console.print(f"epoch {epoch:3d}  {shown}  {row['seconds']:.1f}s{'  *best' if improved else ''}")

    def _write_metrics(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=metric_columns(self.history), extrasaction="ignore")
        writer.writeheader()
        for r in self.history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_text(self.run.metrics, buffer.getvalue())

    @torch.no_grad()
    def _save_samples(self, pl_module: L.LightningModule, epoch: int) -> None:
        model = pl_module.model
        was_training = model.training
        model.eval()
        x = self.sample_images.to(pl_module.device)
        if hasattr(pl_module, "sample_rows"):  # a method that draws its own rows (e.g. a classifier's explanation maps)
            model.train(was_training)
            rows = pl_module.sample_rows(x)  # [(label, (N, H, W) array, colour map, vmax)]
            path = self.run.samples / f"epoch_{epoch:03d}.png"
            save_image_grid([(r[0], r[1]) for r in rows], path, cmap=[r[2] for r in rows], vmax=[r[3] for r in rows])
            return
        recon = model(x).reconstruction.float().clamp(0, 1)
        model.train(was_training)
        res = residual_map(x, recon)
        save_image_grid(
            [("input", x[:, 0].cpu().numpy()), ("reconstruction", recon[:, 0].cpu().numpy()), ("|residual|", res[:, 0].cpu().numpy())],
            self.run.samples / f"epoch_{epoch:03d}.png",
            cmap=["gray", "gray", "inferno"],
            vmax=[1, 1, 0.3],
        )


class StopOnNonFiniteLoss(L.Callback):
    """A non-finite training loss stops training at once; the files of the last finished epoch stay as they were."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            kept = f"epoch {trainer.current_epoch}'s weights are kept in model/" if trainer.current_epoch else "no epoch had finished"
            raise TrainingDiverged(
                f"training loss became {float(loss.detach().float().mean())} in epoch {trainer.current_epoch + 1}, step {trainer.global_step}, at learning rate {lr:.3g}; {kept}",
                path=self.run.root,
                fix="lower --learning-rate (or use --precision 32) and start a new run",
            )
