"""A trained detector: model + preprocessing + normal calibration. Scans in, maps and scores out.

    from medvq import Detector
    det = Detector.load("runs/vqvae-20261121-101500")
    result = det.predict_files(["scan.jpeg"])[0]
    result.scores["combined"], result.maps["combined"]        # (H, W) on the original scan's grid
    result.decision.abnormal, result.decision.threshold        # the run's primary map at its stored spec95 threshold
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medvq.config import InferenceConfig, RunConfig
from medvq.data.dataset import ScanDataset
from medvq.data.loader import prepared_batches
from medvq.data.preprocess import Geometry, Preprocessor
from medvq.data.readers import read_sample
from medvq.data.samples import Sample
from medvq.engine.run_dir import RunDir
from medvq.errors import BlankScanError, CheckpointError, ImageReadError, MedvqError
from medvq.maps.smoothing import gaussian_smooth
from medvq.models.checkpoint import load_run_weights, weights_path
from medvq.models.registry import Method, get_method
from medvq.progress import progress_bar
from medvq.scoring.calibration import COMBINED, NormalCalibration
from medvq.scoring.decision import Decision, choose_primary, is_abnormal, operating_point
from medvq.scoring.ood import APPEARANCE_SIZE, APPEARANCE_STAGES, GUARD_WEIGHTS, SHARED_MAX_SIZE, AppearanceFeatures, DistributionGuard, scan_features


@dataclass
class Prediction:
    """Outputs for a batch of preprocessed images (model resolution S x S)."""

    reconstruction: torch.Tensor | None  # (B, 1, S, S) for reconstruction models
    codes: torch.Tensor | None  # (B, h, w) for VQ models
    raw_maps: dict[str, torch.Tensor]  # smoothed, not standardised, (B, 1, S, S)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # standardised (+ combined); empty if uncalibrated
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,)
    model_scores: dict[str, np.ndarray] = field(default_factory=dict)  # image scores the model gives itself (a classifier's P(abnormal)); also in scores
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image outputs of the method, e.g. class probabilities (B, C)
    ood_distance: np.ndarray | None = None  # (B,) distance from the calibration normals (medvq.scoring.ood); None without a guard
    ood_parts: dict[str, np.ndarray] = field(default_factory=dict)  # each guard part's distance (B,), whose largest is ood_distance


class ScanMaps(Mapping):
    """Standardised maps of one scan on its own (H, W) grid, upsampled from the model's grid when first read
    (scoring needs only the model's grid; writing or showing a map asks for the scan's)."""

    def __init__(self, model_grid: dict[str, np.ndarray], geometry: Geometry, preprocessor: Preprocessor):
        self.model_grid = model_grid  # name -> (S, S)
        self.geometry, self._preprocessor, self._cache = geometry, preprocessor, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._preprocessor.to_original(self.model_grid[name], self.geometry)
        return self._cache[name]

    def __iter__(self):
        return iter(self.model_grid)

    def __len__(self) -> int:
        return len(self.model_grid)


@dataclass
class FileResult:
    path: Path
    maps: Mapping[str, np.ndarray]  # standardised maps on the original grid (H, W), computed when read (ScanMaps)
    scores: dict[str, dict[str, float]]  # name -> {score, z, normal_percentile}
    model_input: np.ndarray  # (S, S)
    reconstruction: np.ndarray | None  # (S, S)
    frame: int | None = None  # the slice, for a slice of a NIfTI volume
    decision: Decision | None = None  # abnormal or not, on the deciding map at the operating point
    original: np.ndarray | None = field(default=None, repr=False)  # the scan as read, when scoring kept it
    read_original: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        """(H, W) the scan as read, in [0, 1]: kept from scoring (``keep_originals``), else read again from its
        file on first use (for a NIfTI slice that reads and normalises its volume again)."""
        if self.original is None:
            self.original = self.read_original()
        return self.original


def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has, or a clear error (before anything is read or written).
    ``auto``: the first CUDA GPU when PyTorch sees one, else the CPU; ``gpu`` (the training name): ``cuda``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "gpu":
        device = "cuda"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MedvqError(f"--device {device!r} is not a device name", fix="use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise MedvqError(f"--device {device}: no such CUDA GPU is visible to PyTorch", fix="use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MedvqError("--device mps: Apple's Metal backend is not available here", fix="use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise MedvqError(f"--device {device} is not supported", fix="use auto, cpu, cuda, cuda:1 or mps")
    return device


def scoring_settings(config: RunConfig) -> dict:
    """What a calibration depends on: the method and its data, model and score settings."""
    d = config.model_dump(mode="json")
    return {"method": d["method"], "data": d["data"], "model": d["model"], "score": d["score"]}


def check_calibrated_settings(config: RunConfig, calibration: NormalCalibration, path: Path) -> None:
    """config.yaml must say what the calibration was fitted under (settings added since are not compared)."""
    now = scoring_settings(config)
    changed = []
    for section, recorded in calibration.settings.items():
        current = now.get(section)
        if isinstance(recorded, dict) and isinstance(current, dict):
            changed += [f"{section}.{k}" for k, v in recorded.items() if k in current and current[k] != v]
        elif current is not None and current != recorded:
            changed.append(section)
    if changed:
        raise CheckpointError(
            f"config.yaml differs from the settings the run was calibrated under ({', '.join(changed[:5])})",
            path=path,
            fix="restore config.yaml as training wrote it; train a new run for other settings",
        )


class Detector:
    def __init__(
        self,
        model: torch.nn.Module,
        config: RunConfig,
        calibration: NormalCalibration | None = None,
        device: str | torch.device = "cpu",
        inference: InferenceConfig | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.method: Method = get_method(config.method)
        # networks convolutional end to end (Method.channels_last) run faster on the CPU in NHWC memory
        self.channels_last = config.train.channels_last and self.method.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.config = config
        self.inference = inference or InferenceConfig()
        self.calibration = calibration
        self.preprocessor = Preprocessor.from_config(config.data, getattr(config.model, "stride", 1))
        self._appearance: AppearanceFeatures | None = None  # the guard's frozen network, loaded on first use
        self._shared_stages: list[torch.Tensor] | None = None  # the model's own outputs of those stages, when it has the same network
        self._shares_network: bool | None = None
        self.guard_weights: Path | None = None  # the guard network's weights stored with the run (safetensors), when there are

    @classmethod
    def load(cls, run_dir: str | Path, *, checkpoint: str = "best", device: str | torch.device = "cpu", inference: InferenceConfig | None = None) -> "Detector":
        device = usable_device(device)
        run = RunDir(run_dir)
        config = run.read_config()
        model = run.load_weights(get_method(config.method).build_model(config.model), checkpoint)
        calibration = NormalCalibration.load(run.calibration) if run.calibration.is_file() else None
        if calibration is not None:
            check_calibrated_settings(config, calibration, run.calibration)
        detector = cls(model, config, calibration, device, inference)
        if weights_path(run.root, GUARD_WEIGHTS).is_file():
            detector.guard_weights = weights_path(run.root, GUARD_WEIGHTS)
        return detector

    @property
    def map_names(self) -> list[str]:
        return list(self.config.score.maps or self.method.maps(self.config.model))

    @property
    def standardized_maps(self) -> list[str]:
        """The maps a calibrated prediction holds: the computed ones, 'combined' and the named combinations."""
        names = list(self.map_names)
        if self.calibration is not None:
            names += [n for n in (COMBINED, *self.calibration.combinations) if n in self.calibration.stats and n not in names]
        return names

    @property
    def primary_map(self) -> str:
        """The map (or model score) that decides, recorded at calibration; older runs: the method's default."""
        if self.calibration is not None and self.calibration.primary_map in self.calibration.stats:
            return self.calibration.primary_map
        stats = self.calibration.stats if self.calibration is not None else {}
        default = self.method.primary_map
        return default if default in stats or not stats else ("combined" if "combined" in stats else next(iter(stats)))

    @property
    def notes(self) -> list[str]:
        """What an older run folder lacks and what is used instead (printed by the CLI, never silent)."""
        if self.calibration is None:
            return []
        out = []
        if self.calibration.primary_map is None:
            out.append(f"this run recorded no primary map (calibrated before medvq chose one); using the method's default '{self.primary_map}'")
        if self.calibration.guard is None:
            out.append("this run has no out-of-distribution guard (calibrated before medvq stored one); in_distribution is left empty")
        if not self.calibration.thresholds_stored:
            out.append("this run's calibration.json holds no thresholds (calibrated before medvq stored them); derived from its stored normal scores")
        return out

    @property
    def combine(self) -> list[str]:
        if self.config.score.combine is not None:
            return list(self.config.score.combine)
        return self.map_names if len(self.map_names) > 1 else []

    @property
    def smoothing_sigma(self) -> float:
        return self.config.score.smoothing_sigma * self.config.data.image_size / 128

    def _check(self, images: torch.Tensor) -> None:
        size = self.config.data.image_size
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (size, size):
            raise MedvqError(
                f"expected preprocessed images of shape (B, 1, {size}, {size}), got {tuple(images.shape)}",
                fix="pass scans through detector.preprocessor (or use predict_files) first",
            )
        if not images.is_floating_point():
            raise MedvqError(f"expected float images in [0, 1], got dtype {images.dtype}", fix="pass scans through detector.preprocessor (or use predict_files) first")
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:  # models were trained on [0, 1]
            raise MedvqError(
                f"expected images in [0, 1], got values from {low:.4g} to {high:.4g}",
                fix="divide 8-bit pixels by 255 (or pass scans through detector.preprocessor / use predict_files)",
            )

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The code maps of a VQ model for preprocessed images (B, 1, S, S): {"codes": (B, h, w), and e.g.
        "top_codes"}; empty for a model without codes. No map is computed beyond what the codes need, nothing
        is calibrated (what exporting the training scans' codes needs, at a cost that does not include the maps)."""
        self._check(images)
        out = self.method.compute_maps(self.model, images.to(self.device, torch.float32), ())
        if out.codes is None:
            return {}
        return {"codes": out.codes, **{k: v for k, v in out.extras.items() if k.endswith("codes")}}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None, *, bf16: bool | None = None) -> Prediction:
        """Maps and (if calibrated) scores for preprocessed images (B, 1, S, S) in [0, 1]; ``bf16``
        autocast (default: the detector's ``inference.precision``)."""
        self._check(images)
        bf16 = self.inference.precision == "bf16" if bf16 is None else bf16
        images = images.to(self.device, torch.float32)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        guard = self.calibration.guard if self.calibration is not None else None
        shared = guard is not None and guard.appearance is not None and guard.appearance.input_size == images.shape[-1] and self._share_network()
        self._shared_stages = None
        with autocast:
            out = self.method.compute_maps(self.model, images, self.map_names)
        raw = {name: gaussian_smooth(m.float(), self.smoothing_sigma) for name, m in out.maps.items()}
        recon = out.reconstruction.float() if out.reconstruction is not None else None
        model_scores = {k: v.detach().float().cpu().numpy() for k, v in out.scores.items()}
        pred = Prediction(reconstruction=recon, codes=out.codes, raw_maps=raw, model_scores=model_scores, extras=dict(out.extras))
        if self.calibration is not None:
            pred.maps = self.calibration.standardize(raw)
            pred.scores = self.calibration.image_scores(pred.maps, valid.to(self.device) if valid is not None else None)
            if guard is not None:
                if guard.appearance is None:
                    appearance = None
                elif shared and self._shared_stages is not None:  # the model ran the guard's network on these images
                    appearance = AppearanceFeatures.pool(self._shared_stages, valid.to(self.device) if valid is not None else None, images.shape[-1])
                else:
                    appearance = self.appearance(images, valid, guard.appearance.input_size)
                self._shared_stages = None
                pred.ood_parts = guard.parts(*scan_features(images, valid, pred.maps), appearance)
                pred.ood_distance = guard.combine(pred.ood_parts)
        pred.scores.update(model_scores)
        return pred

    def predict_dataset(self, dataset: ScanDataset, batch_size: int = 32, progress: str | None = None) -> Prediction:
        """Predict every image of a dataset; maps and scores concatenated in dataset order."""
        parts: list[Prediction] = []
        batches = list(range(0, len(dataset), batch_size))
        with progress_bar(batches, progress) as iterator:
            for start in iterator:
                b = dataset.batch(range(start, min(start + batch_size, len(dataset))))
                parts.append(self.predict(b.image, b.valid))
        cat = lambda ts: torch.cat(ts).cpu() if ts and ts[0] is not None else None
        return Prediction(
            reconstruction=cat([p.reconstruction for p in parts]),
            codes=cat([p.codes for p in parts]),
            raw_maps={k: cat([p.raw_maps[k] for p in parts]) for k in parts[0].raw_maps},
            maps={k: cat([p.maps[k] for p in parts]) for k in parts[0].maps},
            scores={k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
            model_scores={k: np.concatenate([p.model_scores[k] for p in parts]) for k in parts[0].model_scores},
            extras={k: cat([p.extras[k] for p in parts]) for k in parts[0].extras},
            ood_distance=np.concatenate([p.ood_distance for p in parts]) if parts[0].ood_distance is not None else None,
            ood_parts={k: np.concatenate([p.ood_parts[k] for p in parts]) for k in parts[0].ood_parts},
        )

    def appearance(self, images: torch.Tensor, valid: torch.Tensor | None = None, size: int = APPEARANCE_SIZE) -> np.ndarray:
        """The out-of-distribution guard's appearance features (medvq.scoring.ood) of images shrunk to
        ``size``, (B, F); the frozen network is loaded on first use."""
        return self.appearance_network()(images.to(self.device), valid.to(self.device) if valid is not None else None, size)

    @property
    def appearance_size(self) -> int:
        """The input side the guard's appearance part sees for this run: the model's own when it lends its stages."""
        return self.config.data.image_size if self._share_network() else min(APPEARANCE_SIZE, self.config.data.image_size)

    def _share_network(self) -> bool:
        """PatchCore and feature-space VQ run the guard's ImageNet EfficientNet-Lite0 stages themselves: a
        hook keeps those outputs, so the guard pools them instead of running the network a second time."""
        if self._shares_network is None:
            backbone = getattr(self.model, "features", None)
            self._shares_network = self.config.data.image_size <= SHARED_MAX_SIZE and AppearanceFeatures.same_network(backbone)
            if self._shares_network:
                wanted = [i for i, stage in enumerate(sorted(backbone.stage_ends.values())) if stage in APPEARANCE_STAGES]
                backbone.register_forward_hook(lambda module, inputs, out: setattr(self, "_shared_stages", [out[i] for i in wanted]))
        return self._shares_network

    def appearance_network(self) -> AppearanceFeatures:
        """The guard's network: from the run's own safetensors file where it has one (nothing unpickled),
        else the ImageNet file of the weights package (at calibration)."""
        if self._appearance is None:
            if self.guard_weights is not None:
                network = AppearanceFeatures(weights=None)
                load_run_weights(network, self.guard_weights.parent.parent, GUARD_WEIGHTS)
            else:
                network = AppearanceFeatures()
            self._appearance = network.to(self.device)
        return self._appearance

    def _dataset_appearance(self, data: ScanDataset, batch_size: int) -> np.ndarray:
        size = self.appearance_size
        return np.concatenate([self.appearance(b.image, b.valid, size) for b in data.batches(batch_size)])

    def calibrate(self, normals: ScanDataset, batch_size: int = 32, abnormals: ScanDataset | None = None, reference: ScanDataset | None = None) -> NormalCalibration:
        """Fit the normal calibration on held-out normal images and keep it; choose the primary map on the
        validation patients' ``abnormals`` against these normals (without them: the method's default).
        The guard's appearance part takes ``reference`` normals (the training normals) besides these."""
        pred = self.predict_dataset(normals, batch_size)
        s = self.config.score
        combinations = [c for c in self.method.combinations if set(c.split("+")) <= set(self.map_names)]
        self.calibration = NormalCalibration(
            reducer=s.reducer, topk_fraction=s.topk_fraction, combine=self.combine, combinations=combinations, settings=scoring_settings(self.config)
        ).fit(pred.raw_maps, normals.valid)
        self.calibration.fit_scores(pred.model_scores)
        standardized = self.calibration.standardize(pred.raw_maps)
        if len(normals) >= 3:  # below that no spread of normal scans can be measured
            looks = self._dataset_appearance(normals, batch_size)
            if reference is not None and len(reference):
                looks = np.concatenate([self._dataset_appearance(reference, batch_size), looks])
            self.calibration.guard = DistributionGuard().fit(*scan_features(normals.images.float(), normals.valid, standardized), looks)
            self.calibration.guard.appearance.input_size = self.appearance_size
        abnormal_scores = self.predict_dataset(abnormals, batch_size).scores if abnormals is not None and len(abnormals) else None
        patients = len({x.patient_id for x in abnormals.samples}) if abnormal_scores else 0
        choice = choose_primary(self.calibration, self.method.primary_map or "combined", abnormal_scores, patients)
        self.calibration.primary_map, self.calibration.primary_reason = choice.name, choice.reason
        self.calibration.validation_auroc = choice.validation_auroc or {}
        return self.calibration

    def predict_files(self, paths: Sequence[str | Path | Sample], **options) -> list[FileResult]:
        """Read, preprocess and score scans (paths, or samples such as the slices of a NIfTI volume that
        ``collect_images`` lists); maps are returned on each scan's own pixel grid. Each result carries a
        decision on ``decide_on`` (default: the run's primary map) at ``threshold`` ('spec95', 'spec99'
        or a number; default: the run's score.operating_point). Options as for ``iter_files``, which
        yields the same results one at a time, holding only a few batches in memory."""
        return list(self.iter_files(paths, **options))

    def iter_files(
        self,
        paths: Sequence[str | Path | Sample],
        *,
        decide_on: str | None = None,
        threshold: str | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        on_blank: Callable[[Sample], None] | None = None,
        on_unreadable: Callable[[Sample, ImageReadError], None] | None = None,
        keep_originals: bool = False,
    ) -> Iterator[FileResult]:
        """``predict_files`` as a stream, in input order: the model scores ``batch_size`` scans at a time
        (default: ``inference.batch_size``) while ``workers`` processes read and prepare the next ones.
        A scan without a valid pixel (saturated or blank) raises BlankScanError, or with ``on_blank`` is
        passed to it and left out of the results; likewise a file that cannot be read raises its
        ImageReadError, or with ``on_unreadable`` is passed to it with the error and left out.
        ``keep_originals``: the workers hand each scan as read over with its result (for overlays, which use
        every one); otherwise ``result.image`` reads it again when first asked for, which costs nothing
        when it is not (handing a 496 x 1024 scan over through shared memory cost 2-3 CPU ms)."""
        if self.calibration is None:
            raise CheckpointError("this run has no calibration.json", fix="finish training (calibration runs after the last epoch)")
        decide_on = decide_on or self.primary_map
        if decide_on not in self.calibration.stats:
            raise MedvqError(f"this run has no map or score '{decide_on}'", fix=f"choose one of {', '.join(self.calibration.stats)}")
        point = operating_point(self.calibration, decide_on, threshold or self.config.score.operating_point)
        if isinstance(paths, (str, Path, Sample)):  # one scan, not a sequence of characters
            paths = [paths]
        samples = [item if isinstance(item, Sample) else Sample(path=Path(item)) for item in paths]
        batches = prepared_batches(
            samples,
            self.preprocessor,
            batch_size=batch_size or self.inference.batch_size,
            workers=self.inference.workers if workers is None else workers,
            keep_originals=keep_originals,
            on_unreadable=on_unreadable,
        )
        for batch in batches:
            blank = ~batch.valid.flatten(1).any(dim=1)
            if bool(blank.any()):
                for j in torch.nonzero(blank).flatten().tolist():
                    if on_blank is None:
                        raise BlankScanError("no valid pixel: the scan is saturated white or blank (all of it looks like registration padding)", path=batch.samples[j].path, fix="nothing in it can be scored; leave it out")
                    on_blank(batch.samples[j])
                batch = batch.subset(torch.nonzero(~blank).flatten().tolist())
                if not batch.samples:
                    continue
            pred = self.predict(batch.images, batch.valid)
            table = self.calibration.score_table(pred.scores)
            maps = {k: m[:, 0].cpu().numpy() for k, m in pred.maps.items()}
            recon = pred.reconstruction[:, 0].cpu().numpy() if pred.reconstruction is not None else None
            for j, sample in enumerate(batch.samples):
                score = table[decide_on]["score"][j]
                yield FileResult(
                    path=sample.path,
                    original=batch.originals[j] if batch.originals is not None else None,
                    read_original=partial(read_sample, sample, self.preprocessor.volume),
                    maps=ScanMaps({k: m[j] for k, m in maps.items()}, batch.geometry[j], self.preprocessor),
                    scores={k: {kk: float(vv[j]) for kk, vv in t.items()} for k, t in table.items()},
                    model_input=batch.images[j, 0].numpy(),
                    reconstruction=recon[j] if recon is not None else None,
                    frame=sample.frame,
                    decision=Decision(
                        decide_on,
                        float(score),
                        float(table[decide_on]["normal_percentile"][j]),
                        point,
                        bool(is_abnormal(score, point)),
                        None if pred.ood_distance is None else bool(pred.ood_distance[j] <= self.calibration.guard.threshold),
                        None if pred.ood_distance is None else float(pred.ood_distance[j]),
                    ),
                )
