"""Export a trained run's whole scoring path as one ONNX graph.

    medvq export RUN --format onnx --out model.onnx

The graph takes preprocessed images and their valid masks and returns what ``Detector.predict`` returns
after calibration: every standardised map (the method's maps, ``combined`` and the run's named
combinations), each map's image score (the calibrated reducer over valid pixels), the score's z and
normal percentile, and the scores the model gives itself (PatchCore's ``reweighted_max``). Model weights,
the PatchCore memory bank, codebooks and the normal calibration are constants inside the graph.

    inputs : image (B, 1, S, S) float32 in [0, 1]; valid (B, 1, S, S) float32 (1 = scored pixel)
    outputs: map_<name> (B, 1, S, S); score_<name>, z_<name>, percentile_<name> (B,); abnormal (B,) 1.0 / 0.0:
             the run's primary map above its stored threshold at the run's operating point (as ``medvq infer``)

``medvq.onnx_runtime`` runs the graph on image files with onnxruntime, numpy, Pillow and scipy (no torch).
A method declares that it can be exported in the registry (``Method.onnx_export``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from medvq.detector import Detector
from medvq.errors import CheckpointError, MedvqError
from medvq.io import atomic_path
from medvq.maps.smoothing import gaussian_smooth
from medvq.onnx_runtime import METADATA_KEY  # JSON in the model's metadata_props: preprocessing settings and output names
from medvq.scoring.calibration import COMBINED, NormalCalibration
from medvq.scoring.decision import operating_point

OPSET = 17



class ScoringGraph(nn.Module):
    """Preprocessed images -> calibrated maps and image scores, in traceable torch operations only."""

    def __init__(self, detector: Detector):
        super().__init__()
        if detector.calibration is None:
            raise CheckpointError("this run has no calibration.json", fix="finish training (calibration runs after the last epoch)")
        self.decision_map = detector.primary_map
        self.operating_point = operating_point(detector.calibration, self.decision_map, detector.config.score.operating_point)
        self.detector = detector
        self.model = detector.model
        cal: NormalCalibration = detector.calibration
        self.map_names = list(detector.map_names)
        self.reducer, self.topk_fraction = cal.reducer, cal.topk_fraction
        self.sigma = detector.smoothing_sigma
        self.pixel_stats = {n: (cal.stats[n].pixel_mean, cal.stats[n].pixel_std) for n in self.map_names}
        self.combine = list(cal.combine)
        self.combinations = list(cal.combinations)
        # Normal image scores per score name, for the z-score and the percentile; buffers so they sit in the graph.
        self.score_names: list[str] = []
        for name, st in cal.stats.items():
            self.register_buffer(f"normals_{_safe(name)}", torch.tensor(st.normal_scores, dtype=torch.float32), persistent=False)
            self.score_names.append(name)

    def standardize(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: (raw[n] - mean) / std for n, (mean, std) in self.pixel_stats.items()}
        if self.combine and all(n in out for n in self.combine):
            out[COMBINED] = torch.stack([out[n] for n in self.combine]).mean(dim=0)
        for name in self.combinations:
            parts = name.split("+")
            if all(p in out for p in parts):
                out[name] = torch.stack([out[p] for p in parts]).mean(dim=0)
        return out

    def reduce(self, m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) standardised map, valid -> (B,): as ``medvq.evaluation.metrics.reduce_map``."""
        flat, keep = m.flatten(1), valid.flatten(1) > 0.5
        n_valid = keep.sum(dim=1).to(torch.float32)
        if self.reducer == "mean":
            return (flat * keep).sum(dim=1) / n_valid
        low = torch.full_like(flat, -3.0e38)
        masked = torch.where(keep, flat, low)
        if self.reducer == "max":
            return masked.amax(dim=1)
        # top-k mean with k = ceil(fraction * valid pixels) per image: sort once, keep each image's first k ranks
        k = torch.clamp(torch.ceil(n_valid * self.topk_fraction), min=1.0)
        ranked = torch.sort(masked, dim=1, descending=True).values
        rank = torch.arange(flat.shape[1], device=m.device, dtype=torch.float32)[None]
        chosen = rank < k[:, None]
        return torch.where(chosen, ranked, torch.zeros_like(ranked)).sum(dim=1) / k

    def forward(self, image: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.detector.method.compute_maps(self.model, image, self.map_names)
        raw = {n: gaussian_smooth(out.maps[n].float(), self.sigma) for n in self.map_names}
        maps = self.standardize(raw)
        scores = {n: self.reduce(m, valid) for n, m in maps.items()}
        scores.update({n: s.float() for n, s in out.scores.items()})
        result: dict[str, torch.Tensor] = {f"map_{_safe(n)}": m for n, m in maps.items()}
        for name, s in scores.items():
            normals = getattr(self, f"normals_{_safe(name)}")
            result[f"score_{_safe(name)}"] = s
            if normals.numel():
                # the same statistics as NormalCalibration.score_table
                mean = normals.mean()
                std = normals.std(unbiased=False) + 1e-12 if normals.numel() > 1 else torch.ones(())
                result[f"z_{_safe(name)}"] = (s - mean) / std
                result[f"percentile_{_safe(name)}"] = (normals[None, :] <= s[:, None]).sum(dim=1).to(torch.float32) / normals.numel() * 100.0
        result["abnormal"] = (scores[self.decision_map] > self.operating_point.value).to(torch.float32)  # as scoring.decision.is_abnormal
        return result


def _safe(name: str) -> str:
    """ONNX output names: combinations 'a+b' become 'a__b'."""
    return name.replace("+", "__")


def export_onnx(run_dir: str | Path, out: str | Path, *, checkpoint: str = "best", batch_size: int = 1) -> dict:
    """Write ``out`` (an .onnx file) for the run; returns its metadata. ``batch_size`` only sets the example
    used for tracing: the batch dimension of the graph is dynamic, or 1 where the method says its graph
    cannot take any batch (``medvq.onnx_runtime`` then runs such a graph scan by scan)."""
    import onnx

    out = Path(out)
    if out.suffix != ".onnx":
        raise MedvqError("the output of an ONNX export needs the .onnx suffix", path=out, fix="e.g. --out model.onnx")
    detector = Detector.load(run_dir, checkpoint=checkpoint)
    if detector.method.onnx_export is None:
        raise MedvqError(f"method '{detector.config.method}' cannot be exported to ONNX", path=run_dir, fix=f"export a run of {', '.join(exportable_methods())}")
    graph = ScoringGraph(detector).eval()
    any_batch = detector.method.onnx_export(detector.model)
    batch_size = batch_size if any_batch else 1
    size = detector.config.data.image_size
    example = (torch.rand(batch_size, 1, size, size), torch.ones(batch_size, 1, size, size))
    with torch.no_grad():
        names = list(graph(*example))
    out.parent.mkdir(parents=True, exist_ok=True)
    d = detector.config.data
    meta = {
        "method": detector.config.method,
        "image_size": size,
        "fov": d.fov,
        "remove_padding": d.remove_padding,
        "volume": dataclasses.asdict(detector.preprocessor.volume),  # how NIfTI volumes are sliced and normalised
        "outputs": names,
        "decision_map": graph.decision_map,
        "operating_point": graph.operating_point.name,
        "threshold": graph.operating_point.value,
        "reducer": graph.reducer,
        "topk_fraction": graph.topk_fraction,
        "smoothing_sigma_px": graph.sigma,
        "batch": "any" if any_batch else 1,
        "run": str(Path(run_dir).resolve()),
        "checkpoint": checkpoint,
    }
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # the tracer warns about every Python-level check on shapes (input validation); the graph is tested instead
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                graph,
                example,
                str(tmp),
                input_names=["image", "valid"],
                output_names=names,
                dynamic_axes={"image": {0: "batch"}, "valid": {0: "batch"}, **{n: {0: "batch"} for n in names}} if any_batch else None,
                opset_version=OPSET,
                dynamo=False,
            )
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        onnx.save(model, str(tmp))
    return meta


def exportable_methods() -> list[str]:
    """Methods of the registry that claim ONNX export."""
    from medvq.models.registry import get_method, method_names

    return [n for n in method_names() if get_method(n).onnx_export is not None]

