"""The evaluation protocol: score a labelled test set with a trained run and write honest metrics.

- Test images come from the data's ``test`` split (split folders) or from the run's own patient split
  (flat folders); any image or patient the run trained or calibrated on is excluded and counted.
- Image level: AUROC of NORMAL vs all abnormal classes pooled, per abnormal class vs NORMAL, within
  each original image width (a guard against width leaking through preprocessing), AUPRC, and the
  sensitivity at 95 % specificity (chosen on the test scans: optimistic). Every image AUROC has a 95 %
  bootstrap interval resampling patients (``*_ci``); a per-class AUROC from fewer than 10 abnormal scans
  is listed in ``unreliable_classes``. Sensitivity and specificity at the threshold stored at calibration
  (``operating_point``) are the honest operating point.
- Pixel level, where masks exist: pixel AUROC, AUPRO up to FPR 0.3, the best Dice over thresholds
  (an upper bound: the threshold is chosen on the test data), and the pointing game (share of lesion
  images whose map peak lies within 15/224 of the image side of a lesion pixel).
- Classifiers (supervised methods) also get ``classification``: accuracy, balanced accuracy, per-class
  sensitivity and specificity, AUROC (normal vs abnormal; one-vs-rest per class for 4 classes), the
  confusion matrix; their image score ``p_abnormal`` = P(abnormal) sits next to the map scores.
- Reconstruction, for methods that reconstruct: SSIM, PSNR and MSE per image (data range 1.0, the range
  of every model input), averaged overall and per class (``medvq.evaluation.reconstruction``).
  Unlabelled data (NIfTI slices) is evaluated for reconstruction only.
Outputs: metrics.json, scores.csv, maps.npz (every scan's calibrated maps, for `medvq view`), reconstruction.csv,
evaluation.npz (gallery arrays) and report.html.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from medvq.config import InferenceConfig
from medvq.data.dataset import ScanDataset
from medvq.data.nifti import VolumeOptions
from medvq.data.samples import Sample, dataset_splits, scan_dataset
from medvq.detector import Detector, Prediction
from medvq.engine.run_dir import RunDir
from medvq.errors import DatasetError, ImageReadError
from medvq.evaluation import metrics as M
from medvq.evaluation.classification import classification_metrics
from medvq.evaluation.reconstruction import reconstruction_metrics, spread_indices, summarize
from medvq.io import atomic_save_npz, atomic_write_text, mark_output
from medvq.models.registry import methods
from medvq.report.html import build_report
from medvq.scoring.decision import OperatingPoint, is_abnormal, operating_point
from medvq.scoring.volume import describe as describe_volume_score
from medvq.scoring.volume import group_volumes, volume_level_scores
from medvq.version import __version__

SPECIFICITY = 0.95
BOOTSTRAP_RESAMPLES = 1000  # patient-level bootstrap resamples behind every AUROC interval
MIN_RELIABLE_ABNORMAL = 10  # a per-class AUROC from fewer abnormal scans is flagged as unreliable
AUPRO_FPR_LIMIT = 0.3
POINTING_TOLERANCE = 15 / 224  # pointing-game tolerance as a share of the image side (15 px at 224 px, Zhang et al. 2016)


@dataclass
class EvaluationSet:
    samples: list[Sample]
    excluded: int


def select_test_samples(run: RunDir, data_root: str | Path, split: str = "test") -> EvaluationSet:
    """Samples of ``data_root`` to score, none of which the run trained on.

    ``test``: the held-out patients, minus any file or (on the same data) patient the run saw in training
    or validation. ``all``: every image under the same rule. ``val``: every image of the run's validation
    patients (all classes), for choosing settings without touching the test patients; their NORMAL images
    were used for early stopping and calibration, so its figures are for comparing runs, not for reporting.
    """
    config = run.read_config()
    d = config.data
    volume = VolumeOptions.from_config(d, getattr(config.model, "stride", 1))  # NIfTI slices listed as in training
    if split in ("test", "val"):
        samples = dataset_splits(
            data_root, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed, volume=volume, patient_pattern=d.patient_pattern
        )[split]
    elif split == "all":
        samples = scan_dataset(data_root, volume=volume, patient_pattern=d.patient_pattern)
    else:
        raise DatasetError(f"unknown split '{split}'", fix="use 'test', 'val' or 'all'")
    record = run.read_split()
    seen_paths, seen_patients = set(), set()
    for name in ("train",) if split == "val" else ("train", "val", "val_abnormal"):
        for item in record.get("splits", {}).get(name, []):
            seen_paths.add((item["path"], item.get("frame")))
            seen_patients.add(item["patient_id"])
    same_data = record.get("data_root") == str(Path(data_root).resolve())
    kept = [s for s in samples if (str(s.path.resolve()), s.frame) not in seen_paths and not (same_data and s.patient_id in seen_patients)]
    return EvaluationSet(samples=kept, excluded=len(samples) - len(kept))


def compute_metrics(
    labels: list[str],
    scores: dict[str, np.ndarray],
    normal_class: str,
    widths: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    maps: dict[str, np.ndarray] | None = None,
    valid: np.ndarray | None = None,
    pointing_tolerance: float = 0.0,
    operating_points: dict[str, OperatingPoint] | None = None,
    patients: np.ndarray | None = None,
    pixel_patients: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics per map. labels: class names; scores: name -> (N,); masks/maps/valid: (M, H, W) over the images
    whose lesion mask is known (any M; pixel metrics need at least one lesion pixel);
    operating_points: name -> the stored threshold at which sensitivity and specificity are reported;
    patients: (N,) patient ids, for 95 % bootstrap intervals by patient on every image AUROC (``*_ci``);
    pixel_patients: (M,) patient ids of the mask rows, for the pixel AUROC's interval by patient (without
    them, or for scans without a patient id, it resamples scans; ``pixel_auroc_ci_by`` says which)."""
    y = np.array([lab != normal_class for lab in labels], dtype=int)
    classes = sorted({lab for lab in labels if lab != normal_class})
    labels_arr = np.array(labels)
    interval = lambda keep, s: list(M.bootstrap_auroc_interval(y[keep], s[keep], patients[keep], BOOTSTRAP_RESAMPLES)) if patients is not None else None
    everything = np.ones(len(labels), bool)
    n_abnormal = {c: int((labels_arr == c).sum()) for c in classes}
    if masks is not None:  # the pixel AUROC resamples patients; a scan whose patient is unknown is a group of its own
        known = np.array([bool(p) for p in pixel_patients]) if pixel_patients is not None else np.zeros(len(masks), bool)
        pixel_groups = np.array([str(p) if k else f"scan {i}" for i, (p, k) in enumerate(zip(pixel_patients if pixel_patients is not None else known, known))])
        pixel_unit = "patient" if known.all() else "image" if not known.any() else "patient, or image where the patient is unknown"
    out: dict[str, dict[str, Any]] = {}
    for name, s in scores.items():
        m: dict[str, Any] = {
            "image_auroc": M.image_auroc(y, s),
            "image_auroc_ci": interval(everything, s),
            "image_auprc": M.image_auprc(y, s),
            f"sensitivity_at_{int(SPECIFICITY * 100)}_specificity": M.sensitivity_at_specificity(y, s, SPECIFICITY),
            "image_auroc_per_class": {},
            "image_auroc_per_class_ci": {},
            "n_abnormal_per_class": n_abnormal,
            "unreliable_classes": [c for c in classes if n_abnormal[c] < MIN_RELIABLE_ABNORMAL],  # fewer than 10 abnormal scans
        }
        for c in classes:
            keep = np.isin(labels_arr, (c, normal_class))
            m["image_auroc_per_class"][c] = M.image_auroc(y[keep], s[keep])
            m["image_auroc_per_class_ci"][c] = interval(keep, s)
        if operating_points and name in operating_points:
            m["operating_point"] = operating_point_metrics(y, s, operating_points[name])
        if widths is not None:
            m["image_auroc_by_width"] = M.grouped_auroc(y, s, widths)
            if patients is not None:
                m["image_auroc_by_width_ci"] = {w: interval(np.asarray(widths).astype(str) == w, s) for w in m["image_auroc_by_width"]}
        if masks is not None and maps is not None and name in maps and masks.any():
            mp = maps[name]
            m["pixel_auroc"] = M.pixel_auroc(masks, mp, valid=valid)
            m["pixel_auroc_ci"] = list(M.bootstrap_pixel_auroc_interval(masks, mp, pixel_groups, valid=valid, n_resamples=BOOTSTRAP_RESAMPLES))
            m["pixel_auroc_ci_by"] = pixel_unit
            m["aupro"] = M.aupro(masks, mp, fpr_limit=AUPRO_FPR_LIMIT, valid=valid)
            dice, threshold = M.best_dice(masks, mp, valid=valid)
            m["dice"], m["dice_threshold"] = dice, threshold
            m["pointing_game"] = M.pointing_game(masks, mp, valid=valid, tolerance=pointing_tolerance)
        out[name] = m
    return out


def provenance(run: RunDir, config) -> dict[str, Any]:
    """What a reader of the report needs to reproduce it: method, seed, medvq version, date, the resolved
    config, and the run's training curve (metrics.csv, one row per epoch)."""
    history = []
    if run.metrics.is_file():
        with open(run.metrics, newline="") as f:
            history = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    return {
        "method": config.method,
        "seed": config.train.seed,
        "medvq_version": __version__,
        "evaluated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": config.model_dump(mode="json"),
        "training_history": history,
    }


def ood_summary(distance: np.ndarray, threshold: float, labels: list[str]) -> dict[str, Any]:
    """How many scans the out-of-distribution guard flags, overall and per class."""
    flagged = distance > threshold
    return {
        "threshold": threshold,
        "flagged": int(flagged.sum()),
        "share_flagged": float(flagged.mean()) if flagged.size else 0.0,
        "flagged_per_class": {(c or "unlabelled"): int(flagged[[lab == c for lab in labels]].sum()) for c in sorted(set(labels))},
    }


def operating_point_metrics(y: np.ndarray, scores: np.ndarray, point: OperatingPoint) -> dict[str, Any]:
    """Sensitivity, specificity and the confusion counts at a threshold chosen without these data."""
    called = is_abnormal(scores, point)
    tp, fn = int((called & (y == 1)).sum()), int((~called & (y == 1)).sum())
    fp, tn = int((called & (y == 0)).sum()), int((~called & (y == 0)).sum())
    return {
        "name": point.name,
        "threshold": point.value,
        "calibration_specificity": point.specificity,
        "calibration_normals": point.n_normals,
        "reliable": point.reliable,
        "sensitivity": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def classify(detector: Detector, pred: Prediction, samples: list[Sample], dataset: ScanDataset) -> dict[str, Any]:
    """Classification metrics of a classifier run on the evaluated images."""
    model_config = detector.config.model
    normal = detector.config.data.normal_class
    unknown = sorted({s.label for s in samples} - set(model_config.classes or [])) if model_config.task == "4class" else []
    if unknown:
        raise DatasetError(f"test classes {', '.join(unknown)} are not among the model's classes {model_config.classes}", fix="evaluate on data with the training classes")
    targets = np.array([model_config.target_index(s.label, normal) for s in samples])
    return classification_metrics(
        targets, pred.extras["probabilities"].numpy(), model_config.classes, groups=dataset.original_widths(), labels=[s.label for s in samples]
    )


def _gallery_indices(labels: list[str], scores: np.ndarray, per_class: int) -> list[int]:
    """Per class, images spread evenly from the highest to the lowest score."""
    chosen = []
    for c in sorted(set(labels)):
        idx = np.array([i for i, lab in enumerate(labels) if lab == c])
        order = idx[np.argsort(-scores[idx], kind="stable")]
        picks = np.unique(np.linspace(0, len(order) - 1, min(per_class, len(order))).round().astype(int))
        chosen.extend(order[picks].tolist())
    return chosen


def write_scores_csv(path: Path, samples: list[Sample], dataset: ScanDataset, scores: dict[str, np.ndarray], ood: tuple[np.ndarray, float] | None = None) -> None:
    """One row per scan: its class, patient, original size and every score; with ``ood`` (distances and the
    guard's threshold) also ``in_distribution`` (1/0) and ``ood_distance``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(scores)
    frames = any(s.frame is not None for s in samples)  # slices of NIfTI volumes
    guard = ["in_distribution", "ood_distance"] if ood is not None else []
    writer.writerow(["path", *(["frame"] if frames else []), "class", "patient", "width", "height", *names, *guard])
    for i, s in enumerate(samples):
        g = dataset.geometry[i]
        frame = ["" if s.frame is None else s.frame] if frames else []
        verdict = [int(ood[0][i] <= ood[1]), f"{ood[0][i]:.6g}"] if ood is not None else []
        writer.writerow([str(s.path), *frame, s.label, s.patient_id, g.width, g.height, *(f"{scores[n][i]:.6g}" for n in names), *verdict])
    atomic_write_text(path, buffer.getvalue())


def volume_metrics(
    samples: list[Sample], scores: dict[str, np.ndarray], normal_class: str, fraction: float, operating_points: dict[str, OperatingPoint] | None = None
) -> dict[str, Any] | None:
    """AUROC and AUPRC per score over volumes (``medvq.scoring.volume``: a volume is abnormal when any of
    its B-scans is; its score is the top-k mean of its B-scan scores), and sensitivity / specificity with
    the stored B-scan threshold applied to volume scores; None without normal and abnormal volumes."""
    found = volume_level_scores(samples, scores, normal_class, fraction)
    if found is None:
        return None
    labels, volume_scores = found
    if normal_class not in labels or all(lab == normal_class for lab in labels):
        return None
    patients = np.array([samples[idx[0]].patient_id for idx in group_volumes(samples).values()])  # the volumes' order
    per_map = compute_metrics(labels, volume_scores, normal_class, operating_points=operating_points, patients=patients)
    return {
        "n_volumes": len(labels),
        "n_patients": len(set(patients.tolist())),
        "counts": {c: labels.count(c) for c in sorted(set(labels))},
        "aggregation": describe_volume_score(fraction),
        "maps": {
            name: {
                "auroc": m["image_auroc"],
                "auroc_ci": m["image_auroc_ci"],  # 95 % bootstrap interval, resampling patients
                "auprc": m["image_auprc"],
                "auroc_per_class": m["image_auroc_per_class"],
                "auroc_per_class_ci": m["image_auroc_per_class_ci"],
                **({"operating_point": m["operating_point"]} if "operating_point" in m else {}),
            }
            for name, m in per_map.items()
        },
    }


def write_scan_maps(path: Path, dataset: ScanDataset, pred: Prediction) -> None:
    """Every scan's calibrated maps (float16, model grid, rows of scores.csv), valid pixels, lesion mask and
    reconstruction where they exist, and the box of the scan each came from (top, bottom, left, right in
    original pixels): what `medvq view` shows without running the model again."""
    arrays = {f"map_{k}": v[:, 0].numpy().astype(np.float16) for k, v in pred.maps.items()}
    arrays["valid"] = dataset.valid[:, 0].numpy()
    arrays["box"] = np.array([(g.top, g.bottom, g.left, g.right) for g in dataset.geometry], dtype=np.int32).reshape(-1, 4)
    if dataset.masks is not None:
        arrays["mask"] = dataset.masks[:, 0].numpy()
    if pred.reconstruction is not None:
        arrays["reconstruction"] = pred.reconstruction[:, 0].clamp(0, 1).numpy().astype(np.float16)
    atomic_save_npz(path, **arrays)


def write_reconstruction_csv(path: Path, samples: list[Sample], per_image: dict[str, np.ndarray]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(per_image)
    writer.writerow(["path", "frame", "class", "patient", *names])
    for i, s in enumerate(samples):
        writer.writerow([str(s.path), "" if s.frame is None else s.frame, s.label, s.patient_id, *(f"{per_image[n][i]:.6g}" for n in names)])
    atomic_write_text(path, buffer.getvalue())


@dataclass
class ScoredTestSet:
    """The first stage: the test scans a run may be evaluated on, read, and scored by its detector."""

    run: RunDir
    data_root: Path
    split: str
    detector: Detector
    dataset: ScanDataset  # the scored scans (blank ones left out)
    pred: Prediction
    excluded_seen: int  # scans the run trained or calibrated on (or of its patients)
    excluded_blank: int  # scans without a valid pixel
    excluded_unreadable: int  # files that could not be read
    unlabelled: bool  # e.g. NIfTI slices: reconstruction metrics only
    anomaly: bool  # normal and abnormal scans: the anomaly-detection metrics apply

    @property
    def samples(self) -> list[Sample]:
        return self.dataset.samples

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.dataset.samples]

    @property
    def maps(self) -> dict[str, np.ndarray]:
        return {k: v[:, 0].numpy() for k, v in self.pred.maps.items()}

    @property
    def masks(self) -> np.ndarray | None:
        return self.dataset.masks[:, 0].numpy() if self.dataset.masks is not None else None

    @property
    def valid(self) -> np.ndarray:
        return self.dataset.valid[:, 0].numpy()


@dataclass
class Measurements:
    """The second stage: every metric of a scored test set."""

    maps: dict[str, dict[str, Any]]  # map name -> image (and pixel) metrics; empty without normal and abnormal scans
    operating_points: dict[str, OperatingPoint]
    pointing_tolerance: float  # pixels of the model grid
    pixel_rows: np.ndarray | None  # the scans whose lesion mask is known (pixel metrics); None without masks
    reconstruction: dict[str, np.ndarray] | None  # SSIM, PSNR, MSE per scan, for methods that reconstruct
    volume_level: dict[str, Any] | None
    classification: dict[str, Any] | None  # supervised methods


def score_test_set(
    run: RunDir, data_root: str | Path, split: str, inference: InferenceConfig, *, device: str = "cpu", progress: bool = True, console: Console
) -> ScoredTestSet:
    detector = Detector.load(run.root, device=device, inference=inference)
    if detector.calibration is None:
        raise DatasetError("run has no calibration.json", path=run.root, fix="finish training first")
    normal = detector.config.data.normal_class
    chosen = select_test_samples(run, data_root, split)
    labels = [s.label for s in chosen.samples]
    unlabelled = bool(chosen.samples) and all(not lab for lab in labels)
    anomaly = normal in labels and any(lab != normal for lab in labels)
    if not anomaly and not unlabelled:
        found = ", ".join(f"{c}: {labels.count(c)}" for c in sorted(set(labels))) or "none"
        raise DatasetError(f"evaluation needs {normal} and abnormal test images; found {found}", path=data_root, fix="check the test split (or use --split all)")

    unreadable: list[tuple[Sample, ImageReadError]] = []  # one bad file among many: the others are still evaluated
    dataset = ScanDataset(
        chosen.samples, detector.preprocessor, load_masks=True, progress="reading test scans" if progress else None, workers=inference.workers,
        on_unreadable=lambda sample, err: unreadable.append((sample, err)),
    )  # fmt: skip
    if unreadable:
        if not len(dataset):  # nothing could be read: the first file's own error, exit status 2
            raise unreadable[0][1]
        first, err = unreadable[0]
        console.print(f"[yellow]warning[/]: {len(unreadable)} test file(s) could not be read and were left out; the first: {escape(f'{first.path}: {err.problem}')}", highlight=False)
    blank = dataset.blank_indices()  # saturated or blank scans: no valid pixel to score
    if blank:
        dataset = dataset.subset([i for i in range(len(dataset)) if i not in set(blank)])
        console.print(f"left out {len(blank)} test scan(s) without any valid pixel (saturated or blank)")
    pred: Prediction = detector.predict_dataset(dataset, inference.batch_size, progress="scoring" if progress else None)
    if unlabelled and pred.reconstruction is None:
        raise DatasetError(
            f"the test images are unlabelled, so only reconstruction metrics apply, and method '{detector.config.method}' does not reconstruct",
            path=data_root,
            fix=f"evaluate a reconstruction model ({', '.join(m.name for m in methods() if m.reconstructs)}), or give the data class folders",
        )
    return ScoredTestSet(run, Path(data_root), split, detector, dataset, pred, chosen.excluded, len(blank), len(unreadable), unlabelled, anomaly)


def measure(scored: ScoredTestSet, console: Console) -> Measurements:
    detector, pred, dataset, labels = scored.detector, scored.pred, scored.dataset, scored.labels
    config = detector.config
    normal = config.data.normal_class
    tolerance = POINTING_TOLERANCE * config.data.image_size
    for note in detector.notes:
        console.print(f"[yellow]note[/]: {note}")
    points = {k: operating_point(detector.calibration, k, config.score.operating_point) for k in pred.scores if k in detector.calibration.stats}
    patients = np.array([s.patient_id for s in scored.samples])
    masks, maps_np, valid = scored.masks, scored.maps, scored.valid
    # Pixel metrics over scans whose mask is known: read from a file, or empty for a NORMAL scan without one;
    # an abnormal scan without a mask file has unknown lesions and is left out of them.
    pixel_rows = (dataset.mask_known.numpy() | np.array([lab == normal for lab in labels])) if masks is not None else None
    pixel = dict(masks=masks[pixel_rows], maps={k: v[pixel_rows] for k, v in maps_np.items()}, valid=valid[pixel_rows]) if masks is not None else {}
    per_map = (
        compute_metrics(
            labels, pred.scores, normal, dataset.original_widths(), pointing_tolerance=tolerance, operating_points=points, patients=patients,
            pixel_patients=patients[pixel_rows] if pixel_rows is not None else None, **pixel,
        )  # fmt: skip
        if scored.anomaly
        else {}
    )
    recon = reconstruction_metrics(pred.reconstruction, dataset.images.float()) if pred.reconstruction is not None else None
    return Measurements(
        maps=per_map,
        operating_points=points,
        pointing_tolerance=tolerance,
        pixel_rows=pixel_rows,
        reconstruction=recon,
        volume_level=volume_metrics(scored.samples, pred.scores, normal, config.score.volume_topk_fraction, points) if scored.anomaly else None,
        classification=classify(detector, pred, scored.samples, dataset) if "classification" in detector.method.metrics else None,
    )


def metrics_record(scored: ScoredTestSet, measured: Measurements) -> dict[str, Any]:
    """The content of metrics.json."""
    detector, pred, samples, labels = scored.detector, scored.pred, scored.samples, scored.labels
    config = detector.config
    has_masks = scored.dataset.masks is not None
    pixel_rows = measured.pixel_rows
    result = {
        "run": str(scored.run.root.resolve()),
        "data": str(scored.data_root.resolve()),
        "split": scored.split,
        "n_images": len(samples),
        "n_patients": len({s.patient_id for s in samples}),
        "counts": _counts(labels),
        "excluded_seen_in_training": scored.excluded_seen,
        "excluded_without_valid_pixels": scored.excluded_blank,
        "excluded_unreadable": scored.excluded_unreadable,
        "has_masks": has_masks,
        **({"pixel_metric_images": int(pixel_rows.sum()), "pixel_metric_left_out": int((~pixel_rows).sum())} if has_masks else {}),
        "image_size": config.data.image_size,
        "fov": config.data.fov,
        "reducer": f"{config.score.reducer}" + (f" ({config.score.topk_fraction:g})" if config.score.reducer == "topk" else ""),
        "calibration_images": detector.calibration.n_images,
        **({"out_of_distribution": ood_summary(pred.ood_distance, detector.calibration.guard.threshold, labels)} if pred.ood_distance is not None else {}),
        "provenance": provenance(scored.run, config),
        "primary_map": detector.primary_map,
        "primary_reason": detector.calibration.primary_reason or "the method's default (the run recorded no choice)",
        "operating_point": config.score.operating_point,
        "maps": measured.maps,
        **({"pointing_tolerance_px": measured.pointing_tolerance} if has_masks else {}),
    }
    if measured.volume_level is not None:
        result["volume_level"] = measured.volume_level
    if measured.reconstruction is not None:
        result["reconstruction"] = summarize(measured.reconstruction, None if scored.unlabelled else labels)
    if measured.classification is not None:
        result["classification"] = measured.classification
    return result


def _counts(labels: list[str]) -> dict[str, int]:
    return {(c or "unlabelled"): labels.count(c) for c in sorted(set(labels))}


def gallery_arrays(scored: ScoredTestSet, recon: dict[str, np.ndarray] | None, per_class: int, reconstruction_gallery: int) -> dict[str, np.ndarray]:
    """evaluation.npz: the report's galleries (per class, the hardest cases, reconstructions)."""
    pred, dataset, samples, labels = scored.pred, scored.dataset, scored.samples, scored.labels
    gallery: dict[str, np.ndarray] = {}
    if recon is not None:  # input / reconstruction / error, from the worst to the best SSIM
        ridx = spread_indices(recon["ssim"], reconstruction_gallery)
        rsel = torch.as_tensor(ridx, dtype=torch.long)
        gallery.update(
            recon_names=np.array([samples[i].name for i in ridx]),
            recon_labels=np.array([labels[i] for i in ridx]),
            recon_image=dataset.images.float()[rsel, 0].numpy(),
            recon_reconstruction=pred.reconstruction[rsel, 0].clamp(0, 1).numpy(),
            **{f"recon_{k}": v[ridx] for k, v in recon.items()},
        )
    if not scored.anomaly:
        return gallery
    normal = scored.detector.config.data.normal_class
    maps_np, masks, valid = scored.maps, scored.masks, scored.valid
    key = scored.detector.primary_map if scored.detector.primary_map in pred.scores else next(iter(pred.scores))
    idx = _gallery_indices(labels, pred.scores[key], per_class)
    class_rows = len(idx)
    # the primary map's hardest cases: the highest-scoring normal and the lowest-scoring abnormal scans
    order = np.argsort(-pred.scores[key], kind="stable")
    hard_normal = [int(i) for i in order if labels[i] == normal][:per_class]
    hard_abnormal = [int(i) for i in order[::-1] if labels[i] != normal][:per_class]
    idx = idx + hard_normal + hard_abnormal
    sel = torch.as_tensor(idx, dtype=torch.long)
    gallery |= {
        "primary_map": np.array(key),
        "class_rows": np.arange(class_rows),
        "hard_normal_rows": np.arange(class_rows, class_rows + len(hard_normal)),
        "hard_abnormal_rows": np.arange(class_rows + len(hard_normal), len(idx)),
        "index": np.array(idx),
        "labels": np.array([labels[i] for i in idx]),
        "paths": np.array([str(samples[i].path) for i in idx]),
        "image": dataset.images[sel, 0].float().numpy(),
        **({"reconstruction": pred.reconstruction[sel, 0].numpy()} if pred.reconstruction is not None else {}),
        "valid": valid[idx],
        **{f"map_{k}": v[idx] for k, v in maps_np.items()},
        **{f"score_{k}": v[idx] for k, v in pred.scores.items()},
    }
    if masks is not None:
        gallery["mask"] = masks[idx]
    gallery["map_vmax"] = np.array([float(np.quantile(maps_np[k][valid], 0.995)) for k in maps_np])
    gallery["map_names"] = np.array(list(maps_np))
    return gallery


def write_evaluation(out: Path, scored: ScoredTestSet, measured: Measurements, result: dict[str, Any], gallery: dict[str, np.ndarray]) -> None:
    """Every file of an evaluation but the report: reconstruction.csv, scores.csv, maps.npz, metrics.json, evaluation.npz."""
    pred, guard = scored.pred, scored.detector.calibration.guard
    mark_output(out)
    if measured.reconstruction is not None:
        write_reconstruction_csv(out / "reconstruction.csv", scored.samples, measured.reconstruction)
    ood = (pred.ood_distance, guard.threshold) if pred.ood_distance is not None else None
    write_scores_csv(out / "scores.csv", scored.samples, scored.dataset, pred.scores, ood)
    write_scan_maps(out / "maps.npz", scored.dataset, pred)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1))
    atomic_save_npz(out / "evaluation.npz", **gallery)


def evaluate_run(
    run_dir: str | Path,
    data_root: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    batch_size: int | None = None,
    inference: InferenceConfig | None = None,
    gallery_per_class: int = 4,
    reconstruction_gallery: int = 8,
    device: str = "cpu",
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate a run on the test patients of ``data_root``: score them, measure, write the files of ``out``
    and the report built from them. Returns metrics.json's content."""
    console = console or Console(stderr=True)
    inference = inference or InferenceConfig()
    if batch_size is not None:
        inference = inference.model_copy(update={"batch_size": batch_size})
    scored = score_test_set(RunDir(run_dir), data_root, split, inference, device=device, progress=progress, console=console)
    measured = measure(scored, console)
    result = metrics_record(scored, measured)
    out = Path(out)
    write_evaluation(out, scored, measured, result, gallery_arrays(scored, measured.reconstruction, gallery_per_class, reconstruction_gallery))
    build_report(out)
    if scored.anomaly:
        console.print(f"evaluated {len(scored.samples)} images ({', '.join(f'{c} {n}' for c, n in result['counts'].items())}) -> {out}")
    else:
        console.print(f"evaluated the reconstruction of {len(scored.samples)} unlabelled images -> {out}")
    return result
