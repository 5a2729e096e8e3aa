"""What every method's thin LightningModule (``models/<name>/lightning.py``) shares."""

from __future__ import annotations

import lightning as L
import torch

from medvq.models.optim import configure_adamw
from medvq.models.quantizer import synchronise_quantizers


class TrainingModule(L.LightningModule):
    """AdamW with the warm-up schedule over ``trainable_parameters()``; per-epoch sums reduced over processes."""

    def trainable_parameters(self):
        return self.model.parameters()

    def configure_optimizers(self):
        h = self.hparams
        return configure_adamw(self, self.trainable_parameters(), h.learning_rate, h.weight_decay, h.get("lr_schedule", "constant"))

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every process (``t`` itself in a single process)."""
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum") if self.trainer.world_size > 1 else t


class AutoencoderModule(TrainingModule):
    """A VQ autoencoder (VQ-VAE, VQ-VAE-2): channels-last images, optionally compiled parts, codebook
    statistics summed over every process under DDP."""

    def _place_model(self, channels_last: bool, compile_parts: list[torch.nn.Module]) -> None:
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        for part in compile_parts:  # in place, so state-dict keys stay the same
            part.compile()

    @classmethod
    def from_run_config(cls, config):
        t = config.train
        module = cls(config.model.model_dump(), learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule, channels_last=t.channels_last, compile=t.compile)
        if getattr(module.model, "features", None) is not None:  # the perceptual map's frozen network; stored with the run's weights
            module.model.features.load_imagenet()
        return module

    def setup(self, stage: str) -> None:
        synchronise_quantizers(self.model)  # codebook statistics summed over every process under DDP (the group exists from here on)

    def _images(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
