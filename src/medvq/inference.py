"""Scoring unlabelled scans: overlays, maps and a scores table, written file by file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape

from medvq.config import InferenceConfig
from medvq.data.nifti import is_nifti, nifti_stem
from medvq.data.samples import Sample, collect_images
from medvq.detector import Detector, FileResult
from medvq.errors import CheckpointError, ImageReadError, MedvqError
from medvq.scoring.calibration import normals_needed
from medvq.scoring.decision import operating_point
from medvq.scoring.volume import volume_key
from medvq.io import OutputWriter, atomic_path, atomic_write_bytes, atomic_write_csv, mark_output, result_folders, unique_stem
from medvq.progress import progress_bar
from medvq.report.figures import annotated_overlay, encode_png
from medvq.volume_outputs import write_volume_verdicts


def output_stem(sample: Sample, used: set[str]) -> str:
    """A file stem for the outputs of one scan (NIfTI slices get their frame), unique within ``used``."""
    stem = nifti_stem(sample.path) if is_nifti(sample.path) else sample.path.stem
    if sample.frame is not None:
        stem = f"{stem}_frame{sample.frame:03d}"
    return unique_stem(stem, used)


def decision_figure(result: FileResult, key: str, vmax: float, contour_at: float | None) -> np.ndarray:
    """The overlay of one scan with its colour bar and a caption: file, score, percentile, decision, verdict."""
    d = result.decision
    verdict = "" if d.in_distribution is None else ("; in distribution" if d.in_distribution else "; OUT OF DISTRIBUTION: unlike the calibration normals")
    point = f"{d.threshold.name} threshold {d.threshold.value:.3g}" if d.threshold.name != "value" else f"threshold {d.threshold.value:.3g}"
    caption = [
        f"{result.path.name}" + (f" frame {result.frame}" if result.frame is not None else ""),
        f"{d.map} score {d.score:.3g}, above {d.normal_percentile:.0f} % of calibration normals: {'ABNORMAL' if d.abnormal else 'normal'} at {point}{verdict}",
        f"colour: {key} in standard deviations of normal pixels, 0 to {vmax:.3g}" + (f"; white outline: {key} above {contour_at:.3g}" if contour_at is not None else ""),
    ]
    return annotated_overlay(result.image, result.maps[key], 0.0, vmax, caption, threshold=contour_at, contour=contour_at is not None)


FEW_SCANS, MOSTLY = 5, 0.75  # the note on a folder scored almost wholly above every calibration normal


def _write_scan_outputs(out: Path, name: str, result: FileResult, key: str, vmax: float, contour_at: float | None, save_npy: bool, save_overlays: bool) -> None:
    """One scan's overlay PNG and its maps as .npy on the scan's grid, as asked."""
    if save_overlays:  # zlib level 1 after a fixed row filter (encode_png): a fraction of Pillow's default encoding time
        atomic_write_bytes(out / "overlays" / f"{name}.png", encode_png(decision_figure(result, key, vmax, contour_at)))
    if save_npy:
        (out / "maps").mkdir(exist_ok=True)
        for map_name, m in result.maps.items():
            with atomic_path(out / "maps" / f"{name}_{map_name}.npy") as tmp:
                np.save(tmp, m.astype(np.float32))


def infer(
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "cpu",
    save_npy: bool = True,
    save_overlays: bool = True,
    decide_on: str | None = None,
    threshold: str | None = None,
    contour: bool = False,
    inference: InferenceConfig | None = None,
    console: Console | None = None,
) -> list[dict]:
    """Write OUT/overlays/<name>.png, OUT/maps/<name>_<map>.npy and OUT/scores.csv; return the rows.


    Besides every map's score, z-score and normal percentile, each row holds the decision: ``decision_map``
    (``decide_on``, default the run's primary map), ``operating_point`` (spec95, spec99 or value), its
    ``threshold`` and ``abnormal`` (1 when the score on the decision map is above the threshold), and the
    out-of-distribution verdict ``in_distribution`` (0 for a scan unlike the calibration normals) with its
    ``ood_distance`` (both empty for runs calibrated without a guard). Overlays show the deciding map (a
    score without a map: the run's first map) in calibrated units with a colour bar, a caption strip with the
    decision, and with ``contour`` the outline where the map crosses the threshold.
    Volumes among the inputs (OCT volume files, NIfTI volumes, a manifest's eye-and-visit groups) also get
    a verdict each, on the same score and threshold: OUT/volumes.csv, volumes.json and en-face maps of the
    overlay's map (``medvq.volume_outputs``). ``inference`` sets the batch size, reading workers and
    precision; overlays and maps are written on background threads while the model scores the next scans."""
    console = console or Console(stderr=True)
    detector = Detector.load(run_dir, device=device, inference=inference)
    if detector.calibration is None:
        raise CheckpointError("this run has no calibration.json", path=run_dir, fix="finish training (calibration runs after the last epoch; `medvq train --resume` completes it)")
    for note in detector.notes:
        console.print(f"[yellow]note[/]: {note}")
    out = Path(out)
    # NIfTI volumes: their slices, as in training; earlier results (this --out among them) are not scans
    samples = collect_images(inputs, detector.preprocessor.volume, exclude=[out])
    has_frames = any(s.frame is not None for s in samples)
    decide_on = decide_on or detector.primary_map
    if decide_on not in detector.calibration.stats:
        raise MedvqError(f"this run has no map or score '{decide_on}'", path=run_dir, fix=f"use --map with one of {', '.join(detector.calibration.stats)}")
    point = operating_point(detector.calibration, decide_on, threshold or detector.config.score.operating_point)
    mark_output(*result_folders(out, inputs, *(["overlays"] if save_overlays else []), *(["maps"] if save_npy else [])))
    if not point.reliable:
        console.print(
            f"[yellow]warning[/]: the {point.name} threshold of '{decide_on}' rests on {point.n_normals} calibration normals "
            f"(fewer than {normals_needed(point.specificity)}): it is their highest score, and its specificity is not measured"
        )
    # the overlay shows the deciding map; a score without a map (a classifier's p_abnormal) shows the run's first map
    key = decide_on if decide_on in detector.standardized_maps else detector.standardized_maps[0]
    # the outline in the overlay's own units: the decision threshold when the overlay shows the deciding map
    contour_at = point.value if key == decide_on else operating_point(detector.calibration, key, point.name if point.name != "value" else detector.config.score.operating_point).value
    # one colour scale for every scan of the run: from the normal mean to 1.5x the highest calibration normal's score
    normal_scores = detector.calibration.stats[key].normal_scores
    vmax = max(3.0, 1.5 * max(normal_scores), 1.2 * contour_at) if normal_scores else max(3.0, 1.2 * contour_at)
    rows, used, scored, blank = [], set(), [], set()  # scored: the samples of rows; blank: ids of scans without a valid pixel
    unreadable: list[tuple[Sample, ImageReadError]] = []  # files that could not be read, in input order
    unread_ids: set[int] = set()
    column_maxima = []  # per scan, the calibrated map's maximum over depth per A-scan column (en-face rows)

    def skip(sample: Sample) -> None:  # nothing to score in it; the others go on
        console.print(f"skipped {sample.name}: no valid pixel (saturated white or blank)", highlight=False, markup=False)
        blank.add(id(sample))

    def unread(sample: Sample, err: ImageReadError) -> None:  # one bad file among many: the others are still scored
        unreadable.append((sample, err))
        unread_ids.add(id(sample))

    results = detector.iter_files(samples, decide_on=decide_on, threshold=threshold, on_blank=skip, on_unreadable=unread, keep_originals=save_overlays)
    pending = iter(samples)  # results come in input order, without the blank and unreadable scans
    saved = time.monotonic()
    with OutputWriter() as writer, progress_bar(results, "scoring") as tracked:
        for result in tracked:
            sample = next(s for s in pending if id(s) not in blank and id(s) not in unread_ids)
            scored.append(sample)
            name = output_stem(sample, used)
            if save_overlays or save_npy:
                writer.submit(_write_scan_outputs, out, name, result, key, vmax, contour_at if contour else None, save_npy, save_overlays)
            row = {"path": str(sample.path), "name": name}
            if has_frames:
                row["frame"] = "" if sample.frame is None else sample.frame
            for map_name, s in result.scores.items():
                row[map_name] = s["score"]
                row[f"{map_name}_z"] = s["z"]
                row[f"{map_name}_normal_percentile"] = s["normal_percentile"]
            d = result.decision
            row |= {"decision_map": d.map, "operating_point": d.threshold.name, "threshold": d.threshold.value, "abnormal": int(d.abnormal)}
            row |= {"in_distribution": "" if d.in_distribution is None else int(d.in_distribution), "ood_distance": "" if d.ood_distance is None else d.ood_distance}
            rows.append(row)
            column_maxima.append(result.maps[key].max(axis=0) if volume_key(sample) is not None else None)  # B-scans of volumes only
            if len(rows) % 25 == 0 and time.monotonic() - saved > 2.0:  # a crash keeps what was scored (rewritten at most every 2 s)
                atomic_write_csv(out / "scores.csv", rows)
                saved = time.monotonic()
    if rows:
        atomic_write_csv(out / "scores.csv", rows)
        foreign = sum(r["in_distribution"] == 0 for r in rows)
        if foreign:
            console.print(
                f"[yellow]warning[/]: {foreign} of {len(rows)} scans look unlike the normal scans this run was calibrated on "
                f"(in_distribution = 0 in scores.csv, out-of-distribution distance above {detector.calibration.guard.threshold:.3g}): "
                "their scores and decisions are not to be trusted"
            )
        deciding_normals = detector.calibration.stats[decide_on].normal_scores  # iter_files refused a decide_on without stats
        above = sum(r[decide_on] > max(deciding_normals) for r in rows) if deciding_normals else 0
        if len(rows) >= FEW_SCANS and above >= MOSTLY * len(rows):
            # The guard does not see every change of source (real scans given to a model of synthetic ones pass it):
            # a folder scored almost wholly above every calibration normal is the other sign of that, or of disease.
            console.print(
                f"[yellow]note[/]: {above} of {len(rows)} scans score above every one of the {len(deciding_normals)} calibration normals "
                f"on '{decide_on}'. If most of them are not expected to be abnormal, they probably differ from the scans this run "
                "was trained on (another device, protocol or export): check that before trusting its decisions"
            )
        write_volume_verdicts(
            out, scored, [r[decide_on] for r in rows], column_maxima, deciding_normals,
            score_name=decide_on, map_name=key, fraction=detector.config.score.volume_topk_fraction, vmax=vmax, threshold=point.value, operating_point=point.name,
            normal_class=detector.config.data.normal_class, console=console,
            out_of_distribution=[r["in_distribution"] == 0 for r in rows] if detector.calibration.guard is not None else None,
        )  # fmt: skip
    if blank:
        console.print(f"{len(blank)} scan(s) without any valid pixel skipped (saturated or blank)")
    if unreadable:
        if not rows and not blank:  # nothing at all could be read: the first file's own error, exit status 2
            raise unreadable[0][1]
        first, err = unreadable[0]
        console.print(f"[yellow]warning[/]: {len(unreadable)} file(s) could not be read and were skipped; the first: {escape(f'{first.path}: {err.problem}')}", highlight=False)
    return rows
