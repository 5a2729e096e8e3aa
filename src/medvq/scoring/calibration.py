"""Normal calibration: turn raw anomaly maps into comparable maps and image scores.

Statistics come only from held-out NORMAL images (never from the image being scored, never per-image
min-max). Each map is standardised with the mean and standard deviation of its pixels over the normal
images; ``combined`` is the average of the standardised maps named in ``combine`` (and each name 'a+b' of
``combinations`` the average of the standardised maps a and b); an image score is a
reduction (top-k mean by default) of a standardised map over valid pixels. Image scores are then
located among the normal images' scores (z-score and percentile), which gives every score a meaning a
user can read: "3.1 normal standard deviations above the normal mean, higher than 99 % of normals".

Decisions are made here too, without test data: per score, the thresholds at 95 % and 99 % specificity on
the calibration normals (``thresholds``), stored with the number of normals behind them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import math

import numpy as np
import torch

from medvq.config import ScoreConfig
from medvq.errors import CheckpointError
from medvq.io import atomic_write_text
from medvq.scoring.reduce import reduce_map
from medvq.scoring.ood import DistributionGuard

COMBINED = "combined"
# Operating points stored at calibration: name -> specificity on the calibration normals.
OPERATING_POINTS = {"spec95": 0.95, "spec99": 0.99}


def threshold_at_specificity(normal_scores: np.ndarray | list[float], specificity: float) -> float:
    """The smallest normal score t with at least ``specificity`` of the normals at or below it.

    A scan is called abnormal when its score is above t, so at most a share 1 - specificity of the
    calibration normals would be called abnormal (specificity on them >= ``specificity``).
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no normal scores to set a threshold on")
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity must lie strictly between 0 and 1, got {specificity}")
    return float(s[max(math.ceil(specificity * s.size - 1e-9) - 1, 0)])


def normals_needed(specificity: float) -> int:
    """Normals needed before at least one of them lies above the threshold (20 for 95 %, 100 for 99 %);
    with fewer, the threshold is simply the highest normal score and its specificity is not measured."""
    return math.ceil(1.0 / (1.0 - specificity) - 1e-9)


@dataclass
class Threshold:
    specificity: float  # on the calibration normals
    value: float  # scores above it are called abnormal
    n_normals: int  # calibration normals behind it

    @property
    def reliable(self) -> bool:
        return self.n_normals >= normals_needed(self.specificity)

    def to_dict(self) -> dict:
        return {**asdict(self), "reliable": self.reliable}

    @classmethod
    def fit(cls, normal_scores: list[float], specificity: float) -> "Threshold":
        return cls(specificity, threshold_at_specificity(normal_scores, specificity), len(normal_scores))


@dataclass
class MapStatistics:
    pixel_mean: float
    pixel_std: float
    normal_scores: list[float] = field(default_factory=list)  # image scores of the calibration normals, sorted
    thresholds: dict[str, Threshold] = field(default_factory=dict)  # operating point name (spec95, spec99) -> threshold

    def fit_thresholds(self) -> None:
        self.thresholds = {name: Threshold.fit(self.normal_scores, q) for name, q in OPERATING_POINTS.items()}

    def to_dict(self) -> dict:
        return {**asdict(self), "thresholds": {k: t.to_dict() for k, t in self.thresholds.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "MapStatistics":
        thresholds = {k: Threshold(t["specificity"], t["value"], t["n_normals"]) for k, t in d.get("thresholds", {}).items()}
        return cls(d["pixel_mean"], d["pixel_std"], list(d.get("normal_scores", [])), thresholds)

    @property
    def score_mean(self) -> float:
        return float(np.mean(self.normal_scores)) if self.normal_scores else 0.0

    @property
    def score_std(self) -> float:
        return float(np.std(self.normal_scores)) + 1e-12 if len(self.normal_scores) > 1 else 1.0


_SCORE = ScoreConfig.model_fields  # the defaults of how maps become image scores, from the one config


@dataclass
class NormalCalibration:
    reducer: str = _SCORE["reducer"].default
    topk_fraction: float = _SCORE["topk_fraction"].default
    combine: list[str] = field(default_factory=lambda: ["residual", "alm"])
    combinations: list[str] = field(default_factory=list)  # further named combinations 'a+b': the mean of the standardised maps a and b
    stats: dict[str, MapStatistics] = field(default_factory=dict)
    n_images: int = 0
    settings: dict = field(default_factory=dict)  # the run's method, data, model and score settings it was fitted under
    # The run's primary map (used by infer, overlays and the API unless another is asked for) and why
    # (medvq.scoring.decision.choose_primary); None for runs calibrated before it was recorded.
    primary_map: str | None = None
    primary_reason: str = ""
    validation_auroc: dict[str, float] = field(default_factory=dict)
    guard: DistributionGuard | None = None  # out-of-distribution guard (medvq.scoring.ood); None for older runs

    def standardize(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw maps -> standardised maps (plus 'combined' when all its parts are present)."""
        out = {}
        for name, m in maps.items():
            if name not in self.stats:
                raise KeyError(f"no calibration for map '{name}' (calibrated: {', '.join(self.stats)})")
            s = self.stats[name]
            out[name] = (m.float() - s.pixel_mean) / s.pixel_std
        parts = [out[n] for n in self.combine if n in out]
        if self.combine and len(parts) == len(self.combine):
            out[COMBINED] = torch.stack(parts).mean(dim=0)
        for name in self.combinations:
            parts = [out[n] for n in name.split("+") if n in out]
            if len(parts) == len(name.split("+")):
                out[name] = torch.stack(parts).mean(dim=0)
        return out

    def image_scores(self, standardized: dict[str, torch.Tensor], valid: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        v = valid[:, 0].cpu().numpy() if valid is not None else None
        return {
            name: reduce_map(m[:, 0].cpu().numpy(), how=self.reducer, topk_fraction=self.topk_fraction, valid=v)
            for name, m in standardized.items()
        }

    def fit(self, raw_maps: dict[str, torch.Tensor], valid: torch.Tensor | None = None) -> "NormalCalibration":
        """Fit on raw maps {name: (N, 1, H, W)} of held-out normal images."""
        if not raw_maps:
            raise ValueError("no maps to calibrate")
        n = next(iter(raw_maps.values())).shape[0]
        if n < 2:
            raise ValueError(f"calibration needs at least 2 held-out normal images, got {n}")
        keep = valid.bool() if valid is not None else None
        self.stats = {}
        for name, m in raw_maps.items():
            values = m[keep] if keep is not None else m.reshape(-1)
            values = values.double()
            self.stats[name] = MapStatistics(float(values.mean()), float(values.std()) + 1e-12)
        scores = self.image_scores(self.standardize(raw_maps), valid)
        for name, s in scores.items():
            if name not in self.stats:  # combined: a standardised map already, so identity pixel stats
                self.stats[name] = MapStatistics(0.0, 1.0)
            self.stats[name].normal_scores = sorted(float(x) for x in s)
            self.stats[name].fit_thresholds()
        self.n_images = int(n)
        return self

    def fit_scores(self, scores: dict[str, np.ndarray]) -> "NormalCalibration":
        """Add image scores a model gives itself (e.g. a classifier's P(abnormal)) on the same normal images."""
        for name, s in scores.items():
            if name in self.stats:
                raise ValueError(f"score '{name}' clashes with a map of the same name")
            self.stats[name] = MapStatistics(0.0, 1.0, sorted(float(x) for x in np.asarray(s)))
            self.stats[name].fit_thresholds()
        return self

    @property
    def thresholds_stored(self) -> bool:
        """False for runs calibrated before thresholds were stored (their thresholds are derived on request)."""
        return all(st.thresholds for st in self.stats.values())

    def threshold(self, name: str, operating_point: str) -> Threshold:
        """The stored threshold of score ``name`` at ``operating_point`` (spec95, spec99); for an older
        calibration.json without stored thresholds, derived from its stored normal scores (callers say so)."""
        if name not in self.stats:
            raise KeyError(f"no calibration for '{name}' (calibrated: {', '.join(self.stats)})")
        if operating_point not in OPERATING_POINTS:
            raise KeyError(f"unknown operating point '{operating_point}' (stored: {', '.join(OPERATING_POINTS)})")
        st = self.stats[name]
        if operating_point in st.thresholds:
            return st.thresholds[operating_point]
        return Threshold.fit(st.normal_scores, OPERATING_POINTS[operating_point])

    def score_table(self, scores: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """For each map: the score, its z-score among normals and the share of normals scoring lower."""
        out = {}
        for name, s in scores.items():
            st = self.stats[name]
            ref = np.asarray(st.normal_scores)
            out[name] = {
                "score": s,
                "z": (s - st.score_mean) / st.score_std,
                "normal_percentile": np.searchsorted(ref, s, side="right") / max(len(ref), 1) * 100.0,
            }
        return out

    # --- persistence: JSON only -------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "reducer": self.reducer,
            "topk_fraction": self.topk_fraction,
            "combine": self.combine,
            "combinations": self.combinations,
            "n_images": self.n_images,
            "settings": self.settings,
            "primary_map": self.primary_map,
            "primary_reason": self.primary_reason,
            "validation_auroc": self.validation_auroc,
            "ood_guard": self.guard.to_dict() if self.guard is not None else None,
            "stats": {k: v.to_dict() for k, v in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NormalCalibration":
        return cls(
            reducer=d["reducer"],
            topk_fraction=d["topk_fraction"],
            combine=list(d["combine"]),
            combinations=list(d.get("combinations", [])),
            n_images=d.get("n_images", 0),
            settings=dict(d.get("settings", {})),
            primary_map=d.get("primary_map"),
            primary_reason=d.get("primary_reason", ""),
            validation_auroc=dict(d.get("validation_auroc", {})),
            guard=DistributionGuard.from_dict(d["ood_guard"]) if d.get("ood_guard") else None,
            stats={k: MapStatistics.from_dict(v) for k, v in d["stats"].items()},
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "NormalCalibration":
        """Read calibration.json; a damaged or hand-edited file is refused, naming what is wrong."""
        try:
            calibration = cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"damaged calibration ({err.__class__.__name__}: {err})", path=path, fix="calibrate again with `medvq train --resume` on the run") from None
        empty = [name for name, s in calibration.stats.items() if not s.normal_scores or not np.all(np.isfinite(s.normal_scores))]
        if not calibration.stats or empty:
            what = f"no normal scores for {', '.join(empty)}" if empty else "no maps"
            raise CheckpointError(f"incomplete calibration: {what}", path=path, fix="calibrate again with `medvq train --resume` on the run")
        return calibration
