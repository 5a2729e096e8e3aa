"""Thin Lightning wrapper of a latent prior: cross-entropy over the frozen VQ-VAE's codes, per-epoch statistics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medvq.maps import evaluating
from medvq.models.lightning import TrainingModule
from medvq.maps.nll import code_nll
from medvq.models.prior.model import LatentPrior, PriorConfig
from medvq.models.prior.training import load_frozen_weights


class PriorModule(TrainingModule):
    def __init__(self, model_config: dict, learning_rate: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant"):
        super().__init__()
        self.save_hyperparameters()  # plain dicts and numbers only: checkpoints load with weights_only=True
        self.model = LatentPrior(PriorConfig(**model_config))
        # loss * n, nll * n, correct positions, positions, n
        self.register_buffer("train_sums", torch.zeros(5, dtype=torch.float64), persistent=False)
        self.register_buffer("val_sums", torch.zeros(5, dtype=torch.float64), persistent=False)

    @classmethod
    def from_run_config(cls, config) -> "PriorModule":
        t = config.train
        module = cls(config.model.model_dump(mode="json"), learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule)
        load_frozen_weights(module.model)
        return module

    def _step(self, batch: dict, sums: torch.Tensor) -> torch.Tensor:
        x = batch["image"]
        loss, logits, codes = self.model.loss(x)
        with torch.no_grad():
            n = x.shape[0]
            nll = code_nll(logits, codes).mean()
            correct = (logits.argmax(dim=1) == codes).sum()
            sums += torch.stack([loss.detach().double() * n, nll.double() * n, correct.double(), torch.tensor(float(codes.numel()), device=sums.device, dtype=torch.float64), torch.tensor(float(n), device=sums.device, dtype=torch.float64)])
        return loss

    def on_train_epoch_start(self) -> None:
        self.train_sums.zero_()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, self.train_sums)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._step(batch, self.val_sums)  # the training loss, same reshaping, in eval mode
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def epoch_summary(self) -> dict[str, float]:
        """Mean loss, NLL (nats per position) and top-1 code accuracy of the finished epoch, reduced over processes."""
        summary: dict[str, float] = {}
        for prefix, sums in (("train", self.reduce_sum(self.train_sums)), ("val", self.reduce_sum(self.val_sums))):
            n = float(sums[4])
            if n > 0:
                summary.update({f"{prefix}_loss": float(sums[0]) / n, f"{prefix}_nll": float(sums[1]) / n, f"{prefix}_code_accuracy": float(sums[2]) / float(sums[3])})
        return summary

    @torch.no_grad()
    def sample_rows(self, x: torch.Tensor) -> list[tuple[str, object, str, float]]:
        """Per-epoch samples: input, the frozen VQ-VAE's reconstruction, the NLL map (nats)."""
        with evaluating(self.model):
            q = self.model.codes(x.float())
            recon = self.model.vqvae.decode(q.quantized).float().clamp(0, 1)
            nll = code_nll(self.model.logits(x.float(), q.indices), q.indices)[:, None]
            nll = F.interpolate(nll, size=tuple(x.shape[-2:]), mode="nearest")
        k = self.model.config.codebook_size
        return [
            ("input", x[:, 0].float().cpu().numpy(), "gray", 1.0),
            ("VQ-VAE reconstruction", recon[:, 0].cpu().numpy(), "gray", 1.0),
            ("NLL (nats)", nll[:, 0].cpu().numpy(), "inferno", math.log(k)),
        ]

    def trainable_parameters(self):
        return self.model.trainable_parameters()


def training_module(config) -> PriorModule:
    """The LightningModule of a run config: this folder's entry point for the registry (``Method.training_module``)."""
    return PriorModule.from_run_config(config)
