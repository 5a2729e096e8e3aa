"""Thin Lightning wrapper: class-weighted cross-entropy, light augmentation, per-epoch statistics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only

from medvq.models.lightning import TrainingModule
from medvq.models.classifier.model import Classifier, ClassifierConfig

AUROC_BINS = 1000  # validation AUROC from summed histograms of P(abnormal): exact up to ties within 1e-3, DDP-safe


def augment(x: torch.Tensor, shift: float = 0.08, zoom: float = 0.08, contrast: float = 0.1, brightness: float = 0.05) -> torch.Tensor:
    """Random zoom/shift (border pixels repeated) and contrast/brightness per image; (B, C, S, S) in [0, 1]."""
    b = x.shape[0]
    u = lambda: torch.rand(b, device=x.device) * 2 - 1
    scale = 1 + zoom * u()
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, 0, 2], theta[:, 1, 2] = shift * u(), shift * u()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + contrast * u()).view(b, 1, 1, 1) + mean + brightness * u().view(b, 1, 1, 1)
    return x.clamp(0, 1)


def histogram_auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """AUROC from score histograms (same bins): P(s+ > s-) + P(tie) / 2. NaN without both classes."""
    p, n = positive.double(), negative.double()
    if p.sum() == 0 or n.sum() == 0:
        return float("nan")
    below = torch.cumsum(n, 0) - n  # negatives in lower bins
    return float(((p * below).sum() + 0.5 * (p * n).sum()) / (p.sum() * n.sum()))


class ClassifierModule(TrainingModule):
    def __init__(
        self,
        model_config: dict,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        channels_last: bool = True,
        compile: bool = False,
        augment: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()  # plain dicts and numbers only: checkpoints load with weights_only=True
        config = ClassifierConfig(**model_config)
        self.model = Classifier(config)
        self.channels_last = channels_last and config.arch != "vit"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:  # in place, so state-dict keys stay the same
            self.model.net.compile()
        c = config.num_classes
        weights = torch.tensor(config.class_weights, dtype=torch.float32) if config.class_weights else torch.ones(c)
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("train_sums", torch.zeros(3, dtype=torch.float64), persistent=False)  # loss*n, correct, n
        self.register_buffer("val_sums", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.register_buffer("val_confusion", torch.zeros(c, c, dtype=torch.float64), persistent=False)  # true x predicted
        self.register_buffer("val_histogram", torch.zeros(2, AUROC_BINS, dtype=torch.float64), persistent=False)  # normal, abnormal

    @classmethod
    def from_run_config(cls, config) -> "ClassifierModule":
        t = config.train
        module = cls(config.model.model_dump(), learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule, channels_last=t.channels_last, compile=t.compile)
        if config.model.pretrained_source is not None:
            from medvq.models.classifier.pretrained import load_pretrained

            report = load_pretrained(module.model)
            _say(
                f"loaded {len(report.loaded)} ImageNet tensors from {report.path}"
                + (f" (adapted: {', '.join(report.adapted)}; new head)" if report.adapted else " (new head)")
            )
        return module

    def _images(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.class_weights)

    @staticmethod
    def _accumulate(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        correct = (logits.argmax(dim=1) == target).sum()
        sums += torch.stack([loss.detach().double() * n, correct.double(), torch.tensor(float(n), device=sums.device, dtype=torch.float64)])

    def on_train_epoch_start(self) -> None:
        self.train_sums.zero_()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = self._images(batch), batch["target"]
        if self.hparams.augment:
            x = augment(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x).logits
        loss = self._loss(logits, y)
        self._accumulate(self.train_sums, loss, logits, y)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums.zero_()
        self.val_confusion.zero_()
        self.val_histogram.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = self._images(batch), batch["target"]
        logits = self.model(x).logits.float()
        loss = self._loss(logits, y)
        self._accumulate(self.val_sums, loss, logits, y)
        c = self.val_confusion.shape[0]
        self.val_confusion += torch.bincount(y * c + logits.argmax(dim=1), minlength=c * c).reshape(c, c).to(self.val_confusion)
        p = self.model.abnormal_probability(logits)
        bins = (p * AUROC_BINS).long().clamp(0, AUROC_BINS - 1)
        self.val_histogram[0] += torch.bincount(bins[y == 0], minlength=AUROC_BINS).to(self.val_histogram)  # normal
        self.val_histogram[1] += torch.bincount(bins[y != 0], minlength=AUROC_BINS).to(self.val_histogram)  # any abnormal class
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def epoch_summary(self) -> dict[str, float]:
        """Mean losses, accuracy, balanced accuracy and AUROC (normal vs abnormal) of the finished epoch, over all processes."""
        train, val, confusion, histogram = self.reduce_sum(self.train_sums), self.reduce_sum(self.val_sums), self.reduce_sum(self.val_confusion), self.reduce_sum(self.val_histogram)
        summary: dict[str, float] = {}
        for prefix, sums in (("train", train), ("val", val)):
            n = float(sums[2])
            if n > 0:
                summary[f"{prefix}_loss"] = float(sums[0]) / n
                summary[f"{prefix}_accuracy"] = float(sums[1]) / n
        if confusion.sum() > 0:
            rows = confusion.sum(dim=1)
            recall = confusion.diagonal()[rows > 0] / rows[rows > 0]
            summary["val_balanced_accuracy"] = float(recall.mean())
            summary["val_auroc"] = histogram_auroc(histogram[1], histogram[0])
        return summary

    @torch.no_grad()
    def sample_rows(self, x: torch.Tensor) -> list[tuple[str, np.ndarray, str, float]]:
        """Rows of the per-epoch sample grid: the inputs and each explanation map (one colour scale per row)."""
        from medvq.models.classifier.anomaly_map import compute_maps, map_names_for

        out = compute_maps(self.model, x.float(), map_names_for(self.model.config))
        rows = [("input", x[:, 0].float().cpu().numpy(), "gray", 1.0)]
        for name, m in out.maps.items():
            m = m[:, 0].cpu().numpy()
            rows.append((name, m, "inferno", float(np.quantile(m, 0.99)) or 1.0))
        return rows


@rank_zero_only
def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False)


def training_module(config) -> ClassifierModule:
    """The LightningModule of a run config: this folder's entry point for the registry (``Method.training_module``)."""
    return ClassifierModule.from_run_config(config)
