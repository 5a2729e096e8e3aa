"""``medvq explain``: a classifier's explanation map for each scan, as .npy and overlay, with its prediction.

Writes, per scan, ``OUT/maps/<name>_<method>.npy`` (the smoothed map on the scan's own pixel grid, in the
map's own units: Grad-CAM activation, or the rollout share of the CLS token's attention),
``OUT/overlays/<name>_<method>.png``, and one row of ``OUT/explanations.csv`` (predicted class, P(abnormal),
every class probability, where the map peaks). With the run's own settings, overlays show the
normal-calibrated map from 0 (the mean of normal scans) to the larger of the normal scans' 99th-percentile
score and this scan's peak: a scan within the normal range stays dim, and an abnormal scan, whose whole map
can lie far above the normal range (a gradient map grows with the evidence), still shows where it peaks.
With other settings (--rollout-head-fusion, --rollout-discard-ratio, --gradcam-layer, --explain-target) that calibration does not apply and
each overlay is scaled from 0 to its own maximum. Either way the colour scale is for display only: no score
is computed from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pydantic import ValidationError
from rich.console import Console

from medvq.data.samples import collect_images
from medvq.detector import Detector
from medvq.errors import MedvqError
from medvq.inference import output_stem
from medvq.io import atomic_path, atomic_write_csv, mark_output, result_folders
from medvq.maps.gradcam import LayerCapture
from medvq.models.registry import methods
from medvq.report.figures import overlay

METHODS = {"rollout": "rollout", "gradcam": "gradcam", "grad-cam": "gradcam", "gradient-rollout": "gradient_rollout", "gradient_rollout": "gradient_rollout"}


def _settings(head_fusion: str | None, discard_ratio: float | None, layer: str | None, target: str | None) -> dict:
    given = {"rollout_head_fusion": head_fusion, "rollout_discard_ratio": discard_ratio, "gradcam_layer": layer, "explain_target": target}
    return {k: v for k, v in given.items() if v is not None}


def explaining_detector(detector: Detector, name: str, overrides: dict, run_dir: str | Path) -> Detector:
    """A detector that computes explanation ``name`` with the settings ``overrides`` (head fusion, discard ratio,
    layer, target) over the loaded one's weights; ``detector`` itself is left as it was."""
    config = detector.config
    try:
        model_config = type(config.model).model_validate({**config.model.model_dump(), **overrides})
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise MedvqError(f"invalid explanation setting: {problems}") from None
    if "gradcam_layer" in overrides:
        try:
            LayerCapture(detector.model.net, overrides["gradcam_layer"])
        except ValueError as err:
            raise MedvqError(f"--gradcam-layer: {err}", path=run_dir, fix="name a module of the network") from None
    model = detector.method.build_model(model_config)
    model.load_state_dict(detector.model.state_dict())
    calibration = detector.calibration
    if calibration is not None and calibration.guard is not None:
        # the out-of-distribution guard describes a scan by every calibrated map; an explanation computes one (infer applies the guard)
        calibration = dataclasses.replace(calibration, guard=None)
    explained = config.model_copy(update={"model": model_config, "score": config.score.model_copy(update={"maps": [name], "combine": []})})
    return Detector(model, explained, calibration, detector.device, detector.inference)


def _explain_scan(detector: Detector, sample, name: str, out: Path, used: set[str], classes: list[str], vmax: float | None) -> dict | None:
    """Write one scan's map and overlay; its explanations.csv row (None for a scan without a valid pixel).
    ``vmax``: the calibrated overlay's least upper end; None shows the raw map from 0 to its maximum."""
    image, prepared = detector.preprocessor.load(sample)
    if not bool(prepared.valid.any()):
        return None
    pred = detector.predict(prepared.image[None], prepared.valid[None])
    raw = detector.preprocessor.to_original(pred.raw_maps[name][0, 0].cpu().numpy(), prepared.geometry)
    stem = output_stem(sample, used)
    if vmax is not None:
        shown = detector.preprocessor.to_original(pred.maps[name][0, 0].cpu().numpy(), prepared.geometry)
        top = max(vmax, float(shown.max()))
        picture, scale = overlay(image, shown, 0.0, top), f"normal-calibrated 0..{top:.2f}"
    else:
        top = float(raw.max())
        picture, scale = overlay(image, raw, 0.0, top if top > 0 else 1.0), "per-scan 0..max (display only)"
    with atomic_path(out / "overlays" / f"{stem}_{name}.png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    with atomic_path(out / "maps" / f"{stem}_{name}.npy") as tmp:
        np.save(tmp, raw.astype(np.float32))
    probabilities = pred.extras["probabilities"][0].float().cpu().numpy()
    peak = np.unravel_index(int(np.argmax(raw)), raw.shape)
    return {
        "path": str(sample.path),
        "name": stem,
        "predicted": classes[int(probabilities.argmax())],
        "p_abnormal": float(pred.model_scores["p_abnormal"][0]),
        **{f"p_{c}": float(p) for c, p in zip(classes, probabilities)},
        "map": name,
        "peak_row": int(peak[0]),
        "peak_col": int(peak[1]),
        "overlay_scale": scale,
    }


def explain(
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "gradcam",
    head_fusion: str | None = None,
    discard_ratio: float | None = None,
    layer: str | None = None,
    target: str | None = None,
    device: str = "cpu",
    console: Console | None = None,
) -> list[dict]:
    console = console or Console(stderr=True)
    loaded = Detector.load(run_dir, device=device)
    config = loaded.config
    if not loaded.method.explains:
        able = ", ".join(m.name for m in methods() if m.explains)
        raise MedvqError(f"explain needs a run of a method that explains its predictions ({able}), this is a {config.method} run", path=run_dir, fix="use `medvq infer` for its anomaly maps")
    if method.lower() not in METHODS:
        raise MedvqError(f"unknown explanation map '{method}'", fix="use --map rollout, gradcam or gradient-rollout")
    name = METHODS[method.lower()]
    available = loaded.method.maps(config.model)
    if name not in available:
        raise MedvqError(f"{method} needs attention weights; a {config.model.arch} has only {', '.join(available)}", path=run_dir, fix="use --map gradcam")

    overrides = _settings(head_fusion, discard_ratio, layer, target)
    detector = explaining_detector(loaded, name, overrides, run_dir)
    vmax = None
    if not overrides and detector.calibration is not None and name in detector.calibration.stats:  # the run's own settings: calibrated overlays
        normal_scores = detector.calibration.stats[name].normal_scores
        vmax = max(3.0, float(np.quantile(normal_scores, 0.99)) if normal_scores else 3.0)

    out = Path(out)
    samples = collect_images(inputs, detector.preprocessor.volume, exclude=[out])  # NIfTI slices as the run reads them; earlier results (this --out among them) are not scans
    mark_output(*result_folders(out, inputs, "overlays", "maps"))
    model_config = detector.config.model
    classes = model_config.classes or [str(k) for k in range(model_config.num_classes)]
    rows: list[dict] = []
    used: set[str] = set()
    blank: list[str] = []
    for sample in samples:
        row = _explain_scan(detector, sample, name, out, used, classes, vmax)
        if row is None:
            console.print(f"skipped {sample.name}: no valid pixel (saturated white or blank)", highlight=False, markup=False)
            blank.append(sample.name)
            continue
        rows.append(row)
        if len(rows) % 25 == 0:  # a crash keeps what was explained
            atomic_write_csv(out / "explanations.csv", rows)
    if rows:
        atomic_write_csv(out / "explanations.csv", rows)
    skipped = f" ({len(blank)} without any valid pixel skipped)" if blank else ""
    console.print(f"{len(rows)} scans explained with {name}{skipped} -> {out}")
    return rows
