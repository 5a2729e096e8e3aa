"""Separation of abnormal from normal scan scores in one or more evaluations (``scores.csv``), per score column.

Validation AUROC saturates on kermany-dev's validation patients (20 normal, 20 abnormal scans), so defaults
are compared by d' = (mean abnormal - mean normal) / sqrt((var abnormal + var normal) / 2) on the same
scans, next to the AUROC:

    medvq evaluate RUN --data ../shared/data/kermany-dev --split val --out RUN/eval-val
    python benchmarks/separation.py RUN/eval-val [OTHER_RUN/eval-val ...]
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

FIXED = {"path", "frame", "class", "patient", "width", "height", "in_distribution", "ood_distance"}


def separation(folder: Path) -> dict[str, tuple[float, float]]:
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    abnormal = np.array([r["class"] != "NORMAL" for r in rows])
    out = {}
    for name in (c for c in rows[0] if c not in FIXED):
        s = np.array([float(r[name]) for r in rows])
        a, n = s[abnormal], s[~abnormal]
        out[name] = ((a.mean() - n.mean()) / math.sqrt(0.5 * (a.var() + n.var()) + 1e-12), roc_auc_score(abnormal, s))
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg)
        for name, (d, auroc) in separation(Path(arg)).items():
            print(f"  {name:40s} d' {d:6.3f}  AUROC {auroc:.3f}")
