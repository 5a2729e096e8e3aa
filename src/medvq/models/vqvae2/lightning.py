"""Thin Lightning wrapper: optimiser, logging and per-epoch statistics (losses, SSIM, code usage) of a VQ-VAE-2."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from medvq.models.lightning import AutoencoderModule
from medvq.models.quantizer import code_usage
from medvq.models.vqvae2.model import VQVAE2, VQVAE2Config

# Per-epoch sums, weighted by batch size: loss, rec, commit_top, commit_bottom, ssim, n
_SUMS = ("loss", "rec", "commit_top", "commit_bottom", "ssim")


class VQVAE2Module(AutoencoderModule):
    def __init__(self, model_config: dict, learning_rate: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant", channels_last: bool = True, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()  # plain dicts and numbers only: checkpoints load with weights_only=True
        self.model = VQVAE2(VQVAE2Config(**model_config))
        m = self.model
        self._place_model(channels_last, [m.encoder_bottom, m.encoder_top, m.decoder_top, m.decoder] if compile else [])
        c = self.model.config
        self.register_buffer("top_counts", torch.zeros(c.codebook_size_top, dtype=torch.float64), persistent=False)
        self.register_buffer("bottom_counts", torch.zeros(c.codebook_size_bottom, dtype=torch.float64), persistent=False)
        self.register_buffer("train_sums", torch.zeros(len(_SUMS) + 1, dtype=torch.float64), persistent=False)
        self.register_buffer("val_sums", torch.zeros(len(_SUMS) + 1, dtype=torch.float64), persistent=False)

    def _step(self, batch: dict, sums: torch.Tensor):
        x = self._images(batch)
        out = self.model(x)
        with torch.no_grad():
            with torch.autocast(device_type=x.device.type, enabled=False):  # SSIM of inputs in [0, 1], in fp32
                ssim = structural_similarity_index_measure(out.reconstruction.detach().float().clamp(0, 1), x.float(), data_range=1.0, reduction="none").sum()
            n = x.shape[0]
            parts = [out.loss * n, out.reconstruction_loss * n, out.top.loss * n, out.bottom.loss * n, ssim]
            sums += torch.stack([p.detach().to(sums) for p in parts] + [torch.tensor(float(n), dtype=sums.dtype, device=sums.device)])
        return out, n

    def on_train_epoch_start(self) -> None:
        self.top_counts.zero_()
        self.bottom_counts.zero_()
        self.train_sums.zero_()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out, n = self._step(batch, self.train_sums)
        self.top_counts += torch.bincount(out.top.indices.flatten(), minlength=self.top_counts.numel()).to(self.top_counts)
        self.bottom_counts += torch.bincount(out.bottom.indices.flatten(), minlength=self.bottom_counts.numel()).to(self.bottom_counts)
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out, n = self._step(batch, self.val_sums)
        self.log("val/loss", out.loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=n)

    def epoch_summary(self) -> dict[str, float]:
        """Mean losses and SSIM, and code usage per level, of the finished epoch, reduced over all processes."""
        summary: dict[str, float] = {}
        for prefix, sums in (("train", self.reduce_sum(self.train_sums)), ("val", self.reduce_sum(self.val_sums))):
            n = float(sums[-1])
            if n > 0:
                summary.update({f"{prefix}_{name}": float(sums[i]) / n for i, name in enumerate(_SUMS)})
        for level, counts in (("top", self.reduce_sum(self.top_counts)), ("bottom", self.reduce_sum(self.bottom_counts))):
            perplexity, used = code_usage(counts)
            summary[f"perplexity_{level}"], summary[f"codes_used_{level}"] = perplexity, used
        return summary


def training_module(config) -> VQVAE2Module:
    """The LightningModule of a run config: this folder's entry point for the registry (``Method.training_module``)."""
    return VQVAE2Module.from_run_config(config)
