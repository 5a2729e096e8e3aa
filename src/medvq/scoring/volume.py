"""One verdict per volume: B-scan scores aggregated per eye and visit, and the en-face anomaly map.

- A **volume** is the B-scans (or slices) of one file (an OCT volume, a NIfTI volume; each volume of a
  4D series on its own), or the 2D scans a manifest gives the same patient, eye and visit.
- **Volume score** = the mean of the ``k`` highest calibrated B-scan scores, ``k = ceil(fraction x
  n_bscans)`` (at least 1; ``score.volume_topk_fraction``, 10 % by default): a lesion seen on a few
  neighbouring B-scans lifts the volume while one noisy B-scan alone does not decide it. It is in the
  units of the B-scan scores, so it is located among the calibration normals' B-scan scores (z-score and
  normal percentile) and compared with the stored B-scan threshold where the run has one.
- **En-face map**: for each B-scan and each A-scan column the maximum of the B-scan's calibrated map over
  depth, one row per B-scan in file order: an image of B-scans x width, as seen from the front of the eye.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

def volume_key(sample) -> str | None:
    """What volume a sample belongs to, or None for a scan on its own."""
    if sample.frame is not None:  # a B-scan of a volume file, a slice of a NIfTI volume
        series = sample.meta.get("volume", 0) if sample.meta else 0
        return f"{sample.path}" + (f"#volume{series}" if series else "")
    if sample.eye or sample.visit:  # 2D scans of one eye at one visit (a manifest)
        return f"{sample.patient_id}/{sample.eye or '-'}/{sample.visit or '-'}"
    return None


def group_volumes(samples: Sequence) -> dict[str, list[int]]:
    """Volume key -> indices of its samples in B-scan order (volumes in order of first appearance)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        key = volume_key(s)
        if key is not None:
            groups[key].append(i)
    return {k: sorted(v, key=lambda i: (samples[i].frame if samples[i].frame is not None else -1, str(samples[i].path))) for k, v in groups.items()}


def describe(fraction: float) -> str:
    return f"mean of the ceil({fraction:g} x n) highest B-scan scores of a volume (at least 1)"


def topk_count(n: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * n - 1e-9))


def volume_score(bscan_scores: Sequence[float], fraction: float) -> float:
    """Mean of the ``ceil(fraction * n)`` highest B-scan scores."""
    s = np.sort(np.asarray(bscan_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("a volume without B-scan scores")
    return float(s[: topk_count(s.size, fraction)].mean())


def en_face(column_maxima: Sequence[np.ndarray]) -> np.ndarray:
    """(n_bscans, width) from each B-scan's per-column maximum; B-scans of other widths are resampled
    linearly to the most common width (2D scans grouped by a manifest can differ)."""
    widths = [len(c) for c in column_maxima]
    width = max(set(widths), key=widths.count)
    rows = []
    for c in column_maxima:
        c = np.asarray(c, dtype=np.float32)
        if len(c) != width:
            c = np.interp(np.linspace(0, len(c) - 1, width), np.arange(len(c)), c).astype(np.float32)
        rows.append(c)
    return np.stack(rows)


@dataclass
class VolumeVerdict:
    key: str
    path: str
    patient_id: str
    eye: str
    visit: str
    label: str  # the volume's class where known: abnormal if any of its B-scans is
    frames: list[int | None]  # B-scans scored, in order
    bscan_scores: list[float]
    score: float
    z: float
    normal_percentile: float
    threshold: float | None = None
    decision: str = ""  # 'abnormal' | 'normal' | '' without a stored threshold
    most_abnormal: list[int] = field(default_factory=list)  # positions (in ``frames``) of the k highest B-scans, highest first

    def row(self) -> dict:
        top = ";".join(str(self.frames[i] if self.frames[i] is not None else i) for i in self.most_abnormal)
        return {
            "volume": self.key, "path": self.path, "patient": self.patient_id, "eye": self.eye, "visit": self.visit,
            "n_bscans": len(self.frames), "score": round(self.score, 6), "z": round(self.z, 4), "normal_percentile": round(self.normal_percentile, 2),
            "threshold": "" if self.threshold is None else round(self.threshold, 6), "decision": self.decision, "most_abnormal_bscans": top,
        }  # fmt: skip


def verdict(
    key: str,
    samples: Sequence,
    bscan_scores: Sequence[float],
    normal_scores: Sequence[float],
    *,
    threshold: float | None = None,
    normal_class: str = "NORMAL",
    fraction: float,
) -> VolumeVerdict:
    """The verdict of one volume from its samples' calibrated scores (same order)."""
    scores = np.asarray(bscan_scores, dtype=np.float64)
    score = volume_score(scores, fraction)
    ref = np.sort(np.asarray(normal_scores, dtype=np.float64))
    mean, std = (float(ref.mean()), float(ref.std()) + 1e-12) if ref.size > 1 else (0.0, 1.0)
    labels = {s.label for s in samples} - {""}
    label = "" if not labels else (normal_class if labels == {normal_class} else next(lab for lab in sorted(labels) if lab != normal_class))
    first = samples[0]
    return VolumeVerdict(
        key=key,
        path=str(first.path),
        patient_id=first.patient_id,
        eye=first.eye,
        visit=first.visit,
        label=label,
        frames=[s.frame for s in samples],
        bscan_scores=[float(x) for x in scores],
        score=score,
        z=(score - mean) / std,
        normal_percentile=float(np.searchsorted(ref, score, side="right") / max(ref.size, 1) * 100.0),
        threshold=threshold,
        decision="" if threshold is None else ("abnormal" if score > threshold else "normal"),
        most_abnormal=[int(i) for i in np.argsort(-scores, kind="stable")[: topk_count(len(scores), fraction)]],
    )


def volume_level_scores(samples: Sequence, scores: dict[str, np.ndarray], normal_class: str, fraction: float) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """Volume labels and, per score name, volume scores for evaluation; None when the data has no volumes."""
    groups = group_volumes(samples)
    if not groups:
        return None
    labels = []
    for idx in groups.values():
        found = {samples[i].label for i in idx}
        labels.append(normal_class if found == {normal_class} else next(lab for lab in sorted(found) if lab != normal_class))
    return labels, {name: np.array([volume_score(s[idx], fraction) for idx in groups.values()]) for name, s in scores.items()}
