"""Normal calibration: turn raw anomaly maps into comparable maps and image scores.

Statistics come only from held-out NORMAL images (never from the image being scored, never per-image
min-max). Each map is standardised with the mean and standard deviation of its pixels over the normal
images; ``combined`` is the average of the standardised maps named in ``combine`` (and each name 'a+b' of
``combinations`` the average of the standardised maps a and b); an image score is a
reduction (top-k mean by default) of a standardised map over valid pixels. Image scores are then
located among the normal images' scores (z-score and percentile), which gives every score a meaning a
user can read: "3.1 normal standard deviations above the normal mean, higher than 99 % of normals".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvq.errors import CheckpointError
from medvq.evaluation.metrics import reduce_map
from medvq.io import atomic_write_text

COMBINED = "combined"


@dataclass
class MapStatistics:
    pixel_mean: float
    pixel_std: float
    normal_scores: list[float] = field(default_factory=list)  # image scores of the calibration normals, sorted

    @property
    def score_mean(self) -> float:
        return float(np.mean(self.normal_scores)) if self.normal_scores else 0.0

    @property
    def score_std(self) -> float:
        return float(np.std(self.normal_scores)) + 1e-12 if len(self.normal_scores) > 1 else 1.0


@dataclass
class NormalCalibration:
    reducer: str = "topk"
    topk_fraction: float = 0.02
    combine: list[str] = field(default_factory=lambda: ["residual", "alm"])
    combinations: list[str] = field(default_factory=list)  # further named combinations 'a+b': the mean of the standardised maps a and b
    stats: dict[str, MapStatistics] = field(default_factory=dict)
    n_images: int = 0
    settings: dict = field(default_factory=dict)  # the run's method, data, model and score settings it was fitted under

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
        self.n_images = int(n)
        return self

    def fit_scores(self, scores: dict[str, np.ndarray]) -> "NormalCalibration":
        """Add image scores a model gives itself (e.g. a classifier's P(abnormal)) on the same normal images."""
        for name, s in scores.items():
            if name in self.stats:
                raise ValueError(f"score '{name}' clashes with a map of the same name")
            self.stats[name] = MapStatistics(0.0, 1.0, sorted(float(x) for x in np.asarray(s)))
        return self

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
            "stats": {k: asdict(v) for k, v in self.stats.items()},
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NormalCalibration":
        return cls(
            reducer=d["reducer"],
            topk_fraction=d["topk_fraction"],
            combine=list(d["combine"]),
            combinations=list(d.get("combinations", [])),
            n_images=d.get("n_images", 0),
            stats={k: MapStatistics(**v) for k, v in d["stats"].items()},
            settings=dict(d.get("settings", {})),
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
