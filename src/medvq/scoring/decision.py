"""From calibrated scores to decisions: the primary map of a run and the abnormal / normal call.

Every number here comes from the calibration normals and the validation patients, never from test data:
the threshold of an operating point (``spec95``: 95 % specificity on the calibration normals) is stored
in calibration.json at training time, and the primary map is chosen on the validation patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medvq.errors import MedvqError
from medvq.scoring.calibration import OPERATING_POINTS, NormalCalibration, Threshold

MIN_RELIABLE_ABNORMAL = 10  # fewer abnormal scans than this make an AUROC (and a choice made on it) unreliable


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold a decision uses: a stored operating point (spec95, spec99) or a value the user gave."""

    name: str  # 'spec95', 'spec99' or 'value'
    value: float
    specificity: float | None = None  # on the calibration normals (None for a user value)
    n_normals: int | None = None
    reliable: bool = True


def operating_point(calibration: NormalCalibration, score: str, choice: str) -> OperatingPoint:
    """``choice``: 'spec95', 'spec99' or a number (a threshold in the score's own units)."""
    if choice in OPERATING_POINTS:
        t: Threshold = calibration.threshold(score, choice)
        return OperatingPoint(choice, t.value, t.specificity, t.n_normals, t.reliable)
    try:
        value = float(choice)
    except ValueError:
        raise MedvqError(f"unknown threshold '{choice}'", fix=f"use {', '.join(OPERATING_POINTS)} or a number in the score's units") from None
    if not np.isfinite(value):
        raise MedvqError(f"threshold '{choice}' is not a finite number", fix=f"use {', '.join(OPERATING_POINTS)} or a finite number")
    return OperatingPoint("value", value)


def is_abnormal(scores: np.ndarray, point: OperatingPoint) -> np.ndarray:
    """Scores above the threshold are called abnormal."""
    return np.asarray(scores) > point.value


@dataclass(frozen=True)
class PrimaryChoice:
    name: str
    reason: str
    validation_auroc: dict[str, float] | None = None  # every candidate's AUROC on the validation patients


def auroc_against_normals(normal_scores: np.ndarray, abnormal_scores: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count 1/2) of abnormal against normal scores."""
    n, a = np.asarray(normal_scores, float), np.asarray(abnormal_scores, float)
    greater = (a[:, None] > n[None, :]).sum() + 0.5 * (a[:, None] == n[None, :]).sum()
    return float(greater / (a.size * n.size))


def choose_primary(
    calibration: NormalCalibration, default: str, abnormal_scores: dict[str, np.ndarray] | None = None, n_abnormal_patients: int = 0
) -> PrimaryChoice:
    """The score with the highest AUROC of the validation patients' abnormal scans against the calibration
    normals; without abnormal validation scans, the method's documented ``default``."""
    candidates = [n for n in calibration.stats if calibration.stats[n].normal_scores]
    if default not in calibration.stats:
        default = "combined" if "combined" in calibration.stats else candidates[0]
    n_abnormal = len(next(iter(abnormal_scores.values()))) if abnormal_scores else 0
    if n_abnormal == 0:
        return PrimaryChoice(default, "the method's default map: the validation patients hold no abnormal scans to choose on")
    aurocs = {n: auroc_against_normals(calibration.stats[n].normal_scores, abnormal_scores[n]) for n in candidates if n in abnormal_scores}
    best = max(aurocs.values())
    # ties go to the method's default, then to the order of the maps
    name = default if aurocs.get(default) == best else next(n for n in aurocs if aurocs[n] == best)
    n_normals = len(calibration.stats[name].normal_scores)
    reason = (
        f"highest validation AUROC ({best:.3f}) of {n_abnormal} abnormal scans ({n_abnormal_patients} patients) "
        f"against {n_normals} calibration normals"
    )
    if n_abnormal < MIN_RELIABLE_ABNORMAL:
        reason += f"; fewer than {MIN_RELIABLE_ABNORMAL} abnormal scans, so the choice is unreliable"
    return PrimaryChoice(name, reason, aurocs)


@dataclass(frozen=True)
class Decision:
    """The call on one scan: its score on the deciding map against an operating point."""

    map: str
    score: float
    normal_percentile: float
    threshold: OperatingPoint
    abnormal: bool
    in_distribution: bool | None = None  # False: the scan looks unlike the calibration normals; None: the run has no guard
    ood_distance: float | None = None  # its distance from them (medvq.scoring.ood), against the guard's threshold
