"""Score scans with an exported graph (``medvq export``) using onnxruntime, numpy, Pillow and scipy: no torch.

    python -m medvq.onnx_runtime model.onnx scan1.jpeg scan2.png volume.dcm scans/ > scores.csv

    from medvq.onnx_runtime import OnnxScorer
    scorer = OnnxScorer("model.onnx")
    result = scorer.score_files(["scan.jpeg"])[0]
    result.scores["combined"]      # {'score', 'z', 'normal_percentile'}, as Detector.predict_files gives them
    result.abnormal                # the run's primary map above its stored threshold, as `medvq infer` decides
    result.maps["combined"]        # (S, S) calibrated map on the model grid; result.geometry places it on the scan

Preprocessing is medvq's own (``Preprocessor.crop``: white padding found and filled, field of view), followed by
the resizing of ``Preprocessor`` written as numpy matrices: anti-aliased bilinear for the image (the weights
torch and Pillow use) and area coverage >= 1/2 for the valid mask. The settings travel in the graph's metadata.
Inputs are found as `medvq infer` finds them (``collect_images``): an OCT volume gives one result per B-scan,
a NIfTI volume one per slice (sliced and normalised with the run's volume settings), a folder its scans.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from medvq.data.nifti import VolumeOptions, is_nifti
from medvq.data.preprocess import Geometry, Preprocessor
from medvq.data.readers import read_sample
from medvq.data.samples import Sample, collect_images
from medvq.errors import CheckpointError, MedvqError

METADATA_KEY = "medvq"


@lru_cache(maxsize=64)
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) anti-aliased bilinear resampling (align_corners=False), as torch's ``antialias=True``."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0  # the triangle widens with the scale when shrinking
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        t = np.clip(1.0 - np.abs((j - center + 0.5) * inv), 0.0, None)
        w[i, lo:hi] = t / t.sum()
    return w


@lru_cache(maxsize=64)
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) area averaging, as torch's ``mode='area'`` (adaptive average pooling)."""
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape
    out = bilinear_weights(h, size) @ image.astype(np.float64) @ bilinear_weights(w, size).T
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    h, w = mask.shape
    return area_weights(h, size) @ mask.astype(np.float64) @ area_weights(w, size).T >= 0.5


@dataclass
class OnnxResult:
    path: Path
    scores: dict[str, dict[str, float]]  # name -> {score, z, normal_percentile}
    abnormal: bool  # the run's decision map above its stored threshold (meta['decision_map'], meta['threshold'])
    maps: dict[str, np.ndarray]  # calibrated maps (S, S) on the model grid
    geometry: Geometry  # where the model grid sits in the scan
    frame: int | None = None  # the B-scan or slice of a volume file


class OnnxScorer:
    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if (self.path / "config.yaml").is_file():
            raise CheckpointError("is a medvq run folder, not an ONNX model", path=self.path, fix=f"export it first: `medvq export {self.path} --format onnx --out FILE.onnx`")
        if not self.path.is_file():
            raise CheckpointError("no such ONNX file", path=self.path, fix="write one with `medvq export RUN --format onnx --out FILE.onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise CheckpointError(f"not a readable ONNX model ({str(err).splitlines()[0][:120]})", path=self.path, fix="export it again") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise CheckpointError("this ONNX model was not exported by medvq (no preprocessing settings in its metadata)", path=self.path, fix="export it with `medvq export`")
        self.meta = json.loads(meta[METADATA_KEY])
        self.image_size = int(self.meta["image_size"])
        # how NIfTI volumes are sliced and normalised (graphs exported before it travelled: the defaults)
        self.volume = VolumeOptions(**self.meta["volume"]) if "volume" in self.meta else VolumeOptions()
        self.preprocessor = Preprocessor(image_size=self.image_size, fov=self.meta["fov"], remove_padding=self.meta["remove_padding"], volume=self.volume)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, image: np.ndarray, remove_padding: bool | None = None) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """(H, W) scan in [0, 1] -> model input (1, S, S), valid (1, S, S) float32, geometry.
        ``remove_padding`` False: no padding search (NIfTI slices, as ``Preprocessor.load``)."""
        cropped, padding, geometry = self.preprocessor.crop(image, remove_padding)
        s = self.image_size
        x = resize_image(cropped, s)[None]
        valid = (~resize_mask(padding, s) if padding.any() else np.ones((s, s), bool))[None].astype(np.float32)
        return x, valid, geometry

    def run(self, images: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed batch (B, 1, S, S) -> every graph output by name (scan by scan for a fixed-batch graph)."""
        fixed = self.session.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) else len(images)
        parts = [
            self.session.run(None, {"image": images[k : k + step].astype(np.float32), "valid": valid[k : k + step].astype(np.float32)})
            for k in range(0, len(images), step)
        ]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.output_names)}

    def score_files(self, inputs: Sequence[str | Path], batch_size: int = 8) -> list[OnnxResult]:
        """Scans, OCT volumes, NIfTI volumes, folders of them or a manifest CSV -> one result per scan, B-scan or slice."""
        samples: list[Sample] = collect_images(inputs, self.volume)
        results = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            prepared = [self.prepare(read_sample(s, self.volume), remove_padding=False if is_nifti(s.path) else None) for s in chunk]
            outs = self.run(np.stack([p[0] for p in prepared]), np.stack([p[1] for p in prepared]))
            names = [k[len("score_") :] for k in outs if k.startswith("score_")]
            for i, p in enumerate(chunk):
                scores = {
                    _name(n): {"score": float(outs[f"score_{n}"][i]), "z": float(outs[f"z_{n}"][i]), "normal_percentile": float(outs[f"percentile_{n}"][i])}
                    for n in names
                }
                maps = {_name(k[len("map_") :]): outs[k][i, 0] for k in outs if k.startswith("map_")}
                results.append(OnnxResult(p.path, scores, bool(outs["abnormal"][i] > 0.5), maps, prepared[i][2], p.frame))
        return results


def _name(output: str) -> str:
    return output.replace("__", "+")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medvq.onnx_runtime MODEL.onnx SCAN...``: one CSV row per scan on stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        results = OnnxScorer(args[0]).score_files(args[1:])
    except MedvqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        _write_rows(results, sys.stdout)
        sys.stdout.flush()  # here, where a closed pipe can be caught, not at exit
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error; keep Python from reporting it at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _write_rows(results: list[OnnxResult], stream) -> None:
    writer = csv.writer(stream)
    names = list(results[0].scores)
    frames = any(r.frame is not None for r in results)  # a frame column, as in `medvq infer`'s scores.csv, when volumes were given
    writer.writerow(["path", *(["frame"] if frames else []), *(f"{n}{suffix}" for n in names for suffix in ("", "_z", "_normal_percentile")), "abnormal"])
    for r in results:
        frame = [] if not frames else ["" if r.frame is None else r.frame]
        writer.writerow([str(r.path), *frame, *(f"{r.scores[n][k]:.6g}" for n in names for k in ("score", "z", "normal_percentile")), int(r.abnormal)])


if __name__ == "__main__":
    sys.exit(main())
