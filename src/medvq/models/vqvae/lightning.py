"""Thin Lightning wrapper: optimiser, logging and per-epoch statistics for a VQ-VAE."""

from __future__ import annotations

import torch

from medvq.models.lightning import AutoencoderModule
from medvq.models.quantizer import code_usage
from medvq.models.vqvae.model import VQVAE, VQVAEConfig


class VQVAEModule(AutoencoderModule):
    def __init__(self, model_config: dict, learning_rate: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant", channels_last: bool = True, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()  # plain dicts and numbers only: checkpoints load with weights_only=True
        self.model = VQVAE(VQVAEConfig(**model_config))
        self._place_model(channels_last, [self.model.encoder, self.model.decoder] if compile else [])
        k = self.model.config.codebook_size
        self.register_buffer("code_counts", torch.zeros(k, dtype=torch.float64), persistent=False)
        self.register_buffer("train_sums", torch.zeros(4, dtype=torch.float64), persistent=False)  # loss, rec, commit, n
        self.register_buffer("val_sums", torch.zeros(4, dtype=torch.float64), persistent=False)

    @staticmethod
    def _accumulate(sums: torch.Tensor, out, n: int) -> None:
        sums += torch.stack([out.loss.detach() * n, out.reconstruction_loss.detach() * n, out.commitment_loss.detach() * n, torch.tensor(float(n), device=sums.device)]).to(sums)

    def on_train_epoch_start(self) -> None:
        self.code_counts.zero_()
        self.train_sums.zero_()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = self._images(batch)
        out = self.model(x)
        self._accumulate(self.train_sums, out, x.shape[0])
        self.code_counts += torch.bincount(out.quantizer.indices.flatten(), minlength=self.code_counts.numel()).to(self.code_counts)
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self._images(batch)
        out = self.model(x)
        self._accumulate(self.val_sums, out, x.shape[0])
        self.log("val/loss", out.loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def epoch_summary(self) -> dict[str, float]:
        """Mean losses and codebook usage of the finished epoch, reduced over all processes."""
        train, val, counts = self.reduce_sum(self.train_sums), self.reduce_sum(self.val_sums), self.reduce_sum(self.code_counts)
        perplexity, used = code_usage(counts)
        summary = {"perplexity": perplexity, "codes_used": used}
        for prefix, sums in (("train", train), ("val", val)):
            n = float(sums[3])
            if n > 0:
                summary.update({f"{prefix}_loss": float(sums[0]) / n, f"{prefix}_rec": float(sums[1]) / n, f"{prefix}_commit": float(sums[2]) / n})
        return summary


def training_module(config) -> VQVAEModule:
    """The LightningModule of a run config: this folder's entry point for the registry (``Method.training_module``)."""
    return VQVAEModule.from_run_config(config)
