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
from medvq.errors import BlankScanError, CheckpointError
from medvq.io import atomic_path, atomic_write_csv, mark_output
from medvq.report.figures import overlay


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
    """Write OUT/overlays/<name>.png, OUT/maps/<name>_<map>.npy and OUT/scores.csv; return the rows."""
    console = console or Console(stderr=True)
    detector = Detector.load(run_dir, device=device)
    if detector.calibration is None:
        raise CheckpointError("this run has no calibration.json", path=run_dir, fix="finish training (calibration runs after the last epoch; `medvq train --resume` completes it)")
    out = Path(out)
    # NIfTI volumes: their slices, as in training; earlier results (this --out among them) are not scans
    samples = collect_images(inputs, detector.preprocessor.volume, exclude=[out])
    has_frames = any(s.frame is not None for s in samples)
    mark_output(out, out / "overlays", *([out / "maps"] if save_npy else []))
    key = "combined" if "combined" in detector.calibration.stats else next(iter(detector.calibration.stats))
    vmax = max(3.0, float(np.quantile(detector.calibration.stats[key].normal_scores, 0.99)) if detector.calibration.stats[key].normal_scores else 3.0)
    rows, used, blank = [], set(), []
    from rich.progress import track

    for sample in track(samples, description="scoring", console=console, transient=True, disable=not console.is_terminal):
        try:
            result = detector.predict_files([sample])[0]
        except BlankScanError as err:  # nothing to score in it; the others go on
            console.print(f"skipped: {err}", highlight=False, markup=False)
            blank.append(sample.name)
            continue
        name = output_stem(sample, used)
        with atomic_path(out / "overlays" / f"{name}.png") as tmp:
            Image.fromarray(overlay(result.image, result.maps[key], 0.0, vmax)).save(tmp, format="PNG")
        if save_npy:
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
        if len(rows) % 25 == 0:  # a crash keeps what was scored
            atomic_write_csv(out / "scores.csv", rows)
    if rows:
        atomic_write_csv(out / "scores.csv", rows)
    if blank:
        console.print(f"{len(blank)} scan(s) without any valid pixel skipped (saturated or blank): {', '.join(blank[:5])}{' ...' if len(blank) > 5 else ''}")
    return rows
