"""Out-of-distribution guard: does a scan look like the normal scans the run was calibrated on?

An anomaly score answers "how unlike a normal scan of this kind is it?"; it cannot say that the scan is
not of this kind at all (an MRI slice, a photograph, a scan from another device), and such a scan
usually scores as extremely abnormal. The guard describes every scan by a few whole-image features
(intensity quantiles and texture of the model input, and the median of each calibrated map, which stays
near 0 for a scan with a local lesion and rises when the whole scan is foreign), and measures the
largest robust z-score of any feature against the calibration normals (median and MAD). The threshold,
stored at calibration, is ``MARGIN`` times the largest distance of a calibration normal left out of the
statistics, so every calibration normal passes with room to spare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

MARGIN = 1.5  # the threshold over the furthest left-out calibration normal
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


@dataclass
class DistributionGuard:
    feature_names: list[str] = field(default_factory=list)
    median: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    threshold: float = float("inf")
    n_normals: int = 0
    normal_distances: list[float] = field(default_factory=list)  # left-out distance of each calibration normal, sorted

    def fit(self, features: np.ndarray, names: list[str]) -> "DistributionGuard":
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
        return self

    def distance(self, features: np.ndarray, names: list[str]) -> np.ndarray:
        """Largest robust z-score of any feature, per scan (B,)."""
        if list(names) != self.feature_names:
            raise ValueError(f"features {names} do not match the calibrated {self.feature_names}")
        return np.max(np.abs(features - np.asarray(self.median)) / np.asarray(self.scale), axis=1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistributionGuard":
        return cls(**d)
