"""Thin Lightning wrapper of feature-space VQ: k-means codebook from a sample of streamed patch features, code-prior training.

Before the first epoch, one pass over the training scans keeps a bounded uniform sample of their patch
features (``PatchSample``) and the codebook is set to its k-means centres; when the sample is full (the scans
hold more patches), a second pass moves every code to the mean of all training patches nearest it. Each step then: frozen patch
features of the batch -> the quantizer (EMA step of the codebook while ``codebook_epochs`` last, then
frozen) -> the code prior's cross-entropy, with a random share of the context hidden. Nothing is kept
across batches but the sample and running sums, so memory does not depend on the number of training
scans. Under DDP the sample is the one a single process would draw, and the codebook statistics are summed
over processes (``VectorQuantizer.synchronise_across_processes``).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from medvq.models.featvq.model import FeatVQ, FeatVQConfig
from medvq.models.lightning import TrainingModule
from medvq.models.quantizer import CodeMeans, PatchSample, code_usage, sample_keys, synchronise_quantizers

# loss * n, quantisation distance per patch * n, correct code predictions, positions, n
_SUMS = 5


class FeatVQModule(TrainingModule):
    def __init__(self, model_config: dict, learning_rate: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant"):
        super().__init__()
        self.save_hyperparameters()  # plain dicts and numbers only: checkpoints load with weights_only=True
        self.model = FeatVQ(FeatVQConfig(**model_config))
        k = self.model.config.codebook_size
        self.register_buffer("code_counts", torch.zeros(k, dtype=torch.float64), persistent=False)
        self.register_buffer("train_sums", torch.zeros(_SUMS, dtype=torch.float64), persistent=False)
        self.register_buffer("val_sums", torch.zeros(_SUMS, dtype=torch.float64), persistent=False)

    @classmethod
    def from_run_config(cls, config) -> "FeatVQModule":
        t = config.train
        module = cls(config.model.model_dump(mode="json"), learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule)
        module.model.features.load_imagenet()
        return module

    def setup(self, stage: str) -> None:
        synchronise_quantizers(self.model)  # the process group exists from here on

    def on_train_start(self) -> None:
        """k-means initialisation of the codebook from a uniform sample of every training scan's patch features,
        then the prior's code groups (skipped when resuming: both are then restored)."""
        c = self.model.config
        if self.trainer.ckpt_path:  # resuming: the codebook and its groups come from the checkpoint
            return
        if c.kmeans_init:
            self._initialise_codebook()
        self.model.group_codes(c.kmeans_iters)  # the prior's vocabulary, from the codebook as it now is

    def _initialise_codebook(self) -> None:
        quantizer, c = self.model.quantizer, self.model.config
        sample = PatchSample(c.kmeans_sample_patches)
        for batch in self.trainer.train_dataloader:
            features = self.model.encode(batch["image"].to(self.device))  # (B, D, h, w)
            positions = features.shape[-2] * features.shape[-1]
            sample.add(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), sample_keys(batch["index"], positions))
        patches = sample.gathered()
        counts = quantizer.initialise_by_kmeans(patches.to(self.device), c.kmeans_iters, seed=0, seeding=c.kmeans_seeding)
        if self.global_rank == 0:
            print(f"codebook: k-means ({c.kmeans_seeding} seeding, {c.kmeans_iters} iterations) of {len(patches)} sampled patch features "
                  f"into {c.codebook_size} codes, {int((counts == 0).sum())} empty", flush=True)
        if c.codebook_refit and len(patches) >= c.kmeans_sample_patches:  # a full sample: the scans hold patches it left out
            started = time.perf_counter()
            counts = self._refit_codebook()
            if self.global_rank == 0:
                print(f"codebook: codes moved to the means of {int(counts.sum())} training patch features, {int((counts == 0).sum())} empty "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)

    def _refit_codebook(self) -> torch.Tensor:
        """One Lloyd step of the codebook on every training scan's patch features (each scan once, though an epoch
        padded to its minimum size repeats some); returns the codes' member counts (K,)."""
        means, seen = CodeMeans(self.model.quantizer.codebook), set()
        for batch in self.trainer.train_dataloader:
            fresh = [i for i, index in enumerate(batch["index"].tolist()) if index not in seen]
            seen.update(batch["index"].tolist())
            if fresh:
                features = self.model.encode(batch["image"][fresh].to(self.device))  # (B, D, h, w)
                means.add(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
        centres, counts = means.centres(self.reduce_sum)
        self.model.quantizer.set_codebook(centres, counts)
        return counts

    @property
    def codebook_learning(self) -> bool:
        return self.current_epoch < self.model.config.codebook_epochs

    def _step(self, batch: dict, sums: torch.Tensor, training: bool) -> torch.Tensor:
        x = batch["image"]
        features = self.model.encode(x)
        self.model.quantizer.train(training and self.codebook_learning)
        with torch.no_grad():
            out = self.model.quantize(features)
        codes = out.codes
        hidden = None
        ratio = self.model.config.prior_mask_ratio
        if training and ratio > 0:
            hidden = torch.rand(codes.shape, device=codes.device) < ratio
        targets, queries = self.model.prior_tokens(codes), None
        m = self.model.config.prior_train_queries
        if training and 0 < m < codes[0].numel():  # a random subset of positions to predict; all stay context
            queries = torch.rand(codes.shape[0], codes[0].numel(), device=codes.device).argsort(dim=1)[:, :m]  # (B, M)
            targets = targets.flatten(1).gather(1, queries)
        logits = self.model.prior_logits(codes, hidden, queries)
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            n = x.shape[0]
            one = lambda v: torch.tensor(float(v), device=sums.device, dtype=torch.float64)
            correct = (logits.argmax(dim=1) == targets).sum()
            sums += torch.stack([loss.detach().double() * n, out.distances.mean().double() * n, correct.double(), one(targets.numel()), one(n)])
            if training:
                self.code_counts += torch.bincount(codes.flatten(), minlength=self.code_counts.numel()).to(self.code_counts)
        return loss

    def on_train_epoch_start(self) -> None:
        self.code_counts.zero_()
        self.train_sums.zero_()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, self.train_sums, training=True)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._step(batch, self.val_sums, training=False)  # the prior's NLL of the held-out normal codes, nothing hidden
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def epoch_summary(self) -> dict[str, float]:
        """Mean prior NLL (nats per position), quantisation distance, code accuracy and codebook usage, reduced over processes."""
        perplexity, used = code_usage(self.reduce_sum(self.code_counts))
        summary: dict[str, float] = {"perplexity": perplexity, "codes_used": used}
        for prefix, sums in (("train", self.reduce_sum(self.train_sums)), ("val", self.reduce_sum(self.val_sums))):
            n = float(sums[4])
            if n > 0:
                summary.update(
                    {f"{prefix}_loss": float(sums[0]) / n, f"{prefix}_distance": float(sums[1]) / n, f"{prefix}_code_accuracy": float(sums[2]) / float(sums[3])}
                )
        return summary

    @torch.no_grad()
    def sample_rows(self, x: torch.Tensor) -> list[tuple[str, object, str, float]]:
        """Per-epoch samples: input, quantisation distance and NLL (nats) on the patch grid."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(x.float())
            nll = self.model.code_nll(out.codes)
        finally:
            self.model.train(was_training)
        up = lambda m: F.interpolate(m[:, None], size=tuple(x.shape[-2:]), mode="nearest")[:, 0].cpu().numpy()
        distance = out.distances
        return [
            ("input", x[:, 0].float().cpu().numpy(), "gray", 1.0),
            ("quantisation distance", up(distance), "inferno", float(distance.quantile(0.99)) or 1.0),
            ("NLL (nats)", up(nll), "inferno", math.log(self.model.config.codebook_size)),
        ]

    def trainable_parameters(self):
        return self.model.prior.parameters()


def training_module(config) -> FeatVQModule:
    """The LightningModule of a run config: this folder's entry point for the registry (``Method.training_module``)."""
    return FeatVQModule.from_run_config(config)
