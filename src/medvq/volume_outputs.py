"""Writing the per-volume verdicts of ``medvq infer``: volumes.csv, volumes.json and the en-face maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from rich.console import Console

from medvq.data.samples import Sample
from medvq.io import atomic_path, atomic_write_csv, atomic_write_text, mark_output, unique_stem
from medvq.report.figures import colorize
from medvq.scoring.volume import VolumeVerdict, describe, en_face, group_volumes, verdict

ENFACE_MIN_HEIGHT = 128  # en-face PNGs repeat each B-scan row up to about this height (the .npy keeps one row per B-scan)


def write_volume_verdicts(
    out: Path,
    samples: Sequence[Sample],
    scores: Sequence[float],
    column_maxima: Sequence[np.ndarray],
    normal_scores: Sequence[float],
    *,
    score_name: str,
    map_name: str,
    fraction: float,
    vmax: float,
    threshold: float | None = None,
    operating_point: str = "",
    normal_class: str = "NORMAL",
    stems: dict[str, str] | None = None,
    out_of_distribution: Sequence[bool] | None = None,
    console: Console | None = None,
) -> list[VolumeVerdict]:
    """One verdict per volume among ``samples`` (scored with ``scores``, the calibrated B-scan scores of
    ``score_name``, called abnormal above ``threshold``, the stored B-scan threshold ``operating_point``;
    ``column_maxima`` from the map ``map_name``; ``out_of_distribution`` per B-scan, when the run has a guard:
    each volume counts its B-scans unlike the calibration normals); writes OUT/volumes.csv, OUT/volumes.json and
    OUT/volumes/<stem>_enface.{npy,png}."""
    groups = group_volumes(samples)
    if not groups:
        return []
    scores = np.asarray(scores, dtype=np.float64)
    folder = out / "volumes"
    mark_output(folder)  # en-face PNGs are results, never scans (also when OUT is the input folder)
    verdicts, used, rows = [], set(), []
    for key, idx in groups.items():
        v = verdict(key, [samples[i] for i in idx], scores[idx], normal_scores, threshold=threshold, normal_class=normal_class, fraction=fraction)
        verdicts.append(v)
        foreign = None if out_of_distribution is None else sum(bool(out_of_distribution[i]) for i in idx)
        rows.append(v.row() | {"out_of_distribution_bscans": "" if foreign is None else foreign})
        stem = (stems or {}).get(key) or _stem(samples[idx[0]], used)
        enface = en_face([column_maxima[i] for i in idx])
        with atomic_path(folder / f"{stem}_enface.npy") as tmp:
            np.save(tmp, enface)
        repeat = max(1, round(ENFACE_MIN_HEIGHT / len(idx)))
        with atomic_path(folder / f"{stem}_enface.png") as tmp:
            Image.fromarray(colorize(np.repeat(enface, repeat, axis=0), 0.0, vmax)).save(tmp, format="PNG")
        if console is not None:
            where = " ".join(x for x in (v.patient_id, v.eye, v.visit) if x)
            decided = f", {v.decision} ({operating_point or 'threshold'} {v.threshold:.3g})" if v.decision else ""
            if v.frames[0] is not None:  # B-scans of one volume file: by frame number
                name, top = f"{Path(v.path).name}{f' ({where})' if where else ''}", ", ".join(str(v.frames[i]) for i in v.most_abnormal)
            else:  # 2D scans that a manifest groups by patient, eye and visit: by file name (they have no frame number)
                name, top = where, ", ".join(Path(samples[idx[i]].path).name for i in v.most_abnormal)
            # a volume of scans unlike the calibration normals (an MRI given to an OCT model) gets a verdict all the same: say so on its line
            unlike = f"; {foreign} of {len(idx)} B-scans OUT OF DISTRIBUTION: not to be trusted" if foreign else ""
            console.print(
                f"volume {name}: {len(idx)} B-scans, score {v.score:.3g} "
                f"(z {v.z:.2f}, above {v.normal_percentile:.0f}% of normal B-scans){decided}; most abnormal B-scans: {top}{unlike}",
                highlight=False,
            )
    atomic_write_csv(out / "volumes.csv", rows)
    payload = {
        "score": score_name,
        "operating_point": operating_point,
        "threshold": threshold,
        "decision": "abnormal when the volume score is above the B-scan threshold of the operating point" if threshold is not None else "no threshold",
        "en_face_map": map_name,
        "aggregation": describe(fraction),
        "en_face": "per B-scan and A-scan column, the maximum of the calibrated map over depth; rows = B-scans in file order",
        "volumes": [{**row, "label": v.label, "frames": v.frames, "bscan_scores": v.bscan_scores} for row, v in zip(rows, verdicts)],
    }
    atomic_write_text(out / "volumes.json", json.dumps(payload, indent=1))
    return verdicts


def _stem(sample: Sample, used: set[str]) -> str:
    from medvq.data.nifti import is_nifti, nifti_stem

    stem = nifti_stem(sample.path) if is_nifti(sample.path) else (sample.path.stem if sample.frame is not None else f"{sample.patient_id}_{sample.eye}_{sample.visit}")
    series = sample.meta.get("volume", 0) if sample.meta else 0
    return unique_stem(stem + (f"_volume{series}" if series else ""), used)
