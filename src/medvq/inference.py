"""Scoring unlabelled scans: overlays, maps and a scores table, written file by file."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from rich.console import Console

from medvq.data.nifti import is_nifti, nifti_stem
from medvq.data.samples import Sample, collect_images
from medvq.detector import Detector
from medvq.io import atomic_path, atomic_write_csv
from medvq.report.figures import overlay
from medvq.volume_outputs import write_volume_verdicts


def output_stem(sample: Sample, used: set[str]) -> str:
    """A file stem for the outputs of one scan (NIfTI slices get their frame), unique within ``used``."""
    stem = nifti_stem(sample.path) if is_nifti(sample.path) else sample.path.stem
    if sample.frame is not None:
        stem = f"{stem}_frame{sample.frame:03d}"
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate


def infer(
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "cpu",
    save_npy: bool = True,
    console: Console | None = None,
) -> list[dict]:
    """Write OUT/overlays/<name>.png, OUT/maps/<name>_<map>.npy and OUT/scores.csv; return the rows.
    Volumes among the inputs (OCT volume files, NIfTI volumes, a manifest's eye-and-visit groups) also get
    a verdict each: OUT/volumes.csv, volumes.json and en-face maps (``medvq.volume_outputs``)."""
    console = console or Console(stderr=True)
    detector = Detector.load(run_dir, device=device)
    samples = collect_images(inputs, detector.preprocessor.volume)  # NIfTI volumes: their slices, as in training
    has_frames = any(s.frame is not None for s in samples)
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    key = "combined" if "combined" in detector.calibration.stats else next(iter(detector.calibration.stats))
    vmax = max(3.0, float(np.quantile(detector.calibration.stats[key].normal_scores, 0.99)) if detector.calibration.stats[key].normal_scores else 3.0)
    rows, used = [], set()
    column_maxima = []  # per scan, the calibrated map's maximum over depth per A-scan column (en-face rows)
    from rich.progress import track

    for sample in track(samples, description="scoring", console=console, transient=True, disable=not console.is_terminal):
        result = detector.predict_files([sample])[0]
        name = output_stem(sample, used)
        with atomic_path(out / "overlays" / f"{name}.png") as tmp:
            Image.fromarray(overlay(result.image, result.maps[key], 0.0, vmax)).save(tmp, format="PNG")
        if save_npy:
            (out / "maps").mkdir(exist_ok=True)
            for map_name, m in result.maps.items():
                with atomic_path(out / "maps" / f"{name}_{map_name}.npy") as tmp:
                    np.save(tmp, m.astype(np.float32))
        row = {"path": str(sample.path), "name": name}
        if has_frames:
            row["frame"] = "" if sample.frame is None else sample.frame
        for map_name, s in result.scores.items():
            row[map_name] = s["score"]
            row[f"{map_name}_z"] = s["z"]
            row[f"{map_name}_normal_percentile"] = s["normal_percentile"]
        rows.append(row)
        column_maxima.append(result.maps[key].max(axis=0))
        if len(rows) % 25 == 0:  # a crash keeps what was scored
            atomic_write_csv(out / "scores.csv", rows)
    if rows:
        atomic_write_csv(out / "scores.csv", rows)
        write_volume_verdicts(
            out, samples, [r[key] for r in rows], column_maxima, detector.calibration.stats[key].normal_scores,
            score_name=key, vmax=vmax, normal_class=detector.config.data.normal_class, console=console,
        )  # fmt: skip
    return rows
