"""NIfTI data (nibabel): 2D slice files and 3D / 4D volumes read slice by slice.

What a file becomes
- A **slice file** (data with two axes longer than 1, e.g. HipMRI ``case_<pid>_week_<w>_slice_<s>.nii.gz``
  of 256x128 or 256x144 voxels): one sample, read as stored. Patient id = the case id of a HipMRI name,
  else the file stem.
- A **3D volume** (X, Y, Z): reoriented to RAS+ (``nibabel.as_closest_canonical``) and cut along
  ``data.slice_axis`` (axial = Z, coronal = Y, sagittal = X); one sample per non-empty slice, with
  ``Sample.frame`` its index. Slices are shown with the superior (axial: anterior) side up. Patient id =
  the file stem (the subject), so every slice of a volume lands in the same split.
- A **4D series** (X, Y, Z, T): the fourth axis is a series of volumes (time points, repetitions); every
  volume is sliced, only the first, or their voxel-wise mean (``data.series_volumes``). A frame indexes
  volume and slice together: ``frame = t * n_slices + s``. Data whose extra axes hold vector or matrix
  components (a NIfTI vector/matrix intent code, or a fifth axis) is refused.

Intensities -> [0, 1] (the model's input range in training and inference alike)
- Foreground voxels are the finite voxels above the volume's minimum (the background: 0 in most MRI).
- ``data.intensity_scope = volume`` (default): the low / high percentiles (``intensity_low_percentile``,
  ``intensity_high_percentile``, default 0.5 / 99.5) of the foreground of the whole 3D volume (each
  volume of a series on its own) clip and scale every slice, so slices keep their relative brightness.
  ``slice``: the percentiles come from each slice's own foreground. A slice file is its own volume.
- NaN and -inf become the background, +inf the high clip level; percentiles use finite voxels only.
- Slices with fewer foreground voxels than ``data.min_foreground_fraction`` of the slice are skipped
  when a volume is listed (the slices outside the head, for example).

Files that cannot be used (unreadable or truncated, no finite voxels, zero-filled, unexpected axes, slices
shorter than the model's stride) raise :class:`~medvq.errors.ImageReadError` naming the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from medvq.data.config import DataConfig, from_data_config
from medvq.data.sample import SPLIT_ALIASES, Sample
from medvq.errors import DatasetError, ImageReadError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS+ voxel axes after reorientation
HIPMRI_NAME = re.compile(r"^case_(?P<case>[^_]+)_week_(?P<week>[^_]+)_slice_(?P<slice>\d+)\.nii(\.gz)?$", re.IGNORECASE)
# Intent codes whose extra axes hold components of one voxel, not volumes of a series.
COMPONENT_INTENTS = {
    "vector", "displacement vector", "rgb vector", "rgba vector", "symmetric matrix", "general matrix",
    "pointset", "triangle", "quaternion",
}  # fmt: skip


_DATA = DataConfig.model_fields  # defaults come from the one config


@dataclass(frozen=True)
class VolumeOptions:
    """How NIfTI files are sliced and normalised; built from ``DataConfig`` (see its field descriptions)."""

    slice_axis: str = _DATA["slice_axis"].default
    series_volumes: str = _DATA["series_volumes"].default  # all | first | mean
    intensity_scope: str = _DATA["intensity_scope"].default  # volume | slice
    intensity_low_percentile: float = _DATA["intensity_low_percentile"].default
    intensity_high_percentile: float = _DATA["intensity_high_percentile"].default
    min_foreground_fraction: float = _DATA["min_foreground_fraction"].default
    min_side: int = 8  # shortest slice side accepted: the model's stride, and never below 8 px

    def __post_init__(self) -> None:
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {', '.join(SLICE_AXES)}, got {self.slice_axis!r}")
        if self.series_volumes not in ("all", "first", "mean"):
            raise ValueError(f"series_volumes must be all, first or mean, got {self.series_volumes!r}")
        if self.intensity_scope not in ("volume", "slice"):
            raise ValueError(f"intensity_scope must be volume or slice, got {self.intensity_scope!r}")
        if not 0 <= self.intensity_low_percentile < self.intensity_high_percentile <= 100:
            raise ValueError(
                f"need 0 <= intensity_low_percentile < intensity_high_percentile <= 100, got {self.intensity_low_percentile}, {self.intensity_high_percentile}"
            )

    @classmethod
    def from_config(cls, data: DataConfig, stride: int = 1) -> "VolumeOptions":
        return from_data_config(cls, data, min_side=max(8, int(stride)))


# --- names --------------------------------------------------------------------------------------
def is_nifti(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def nifti_stem(path: str | Path) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def subject_id(path: str | Path) -> str:
    """Patient id of a NIfTI file: the case id of a HipMRI slice name, else the file stem (the subject)."""
    match = HIPMRI_NAME.match(Path(path).name)
    return match.group("case") if match else nifti_stem(path)


# --- loading ------------------------------------------------------------------------------------
def _open(path: Path):
    import nibabel as nib

    if not path.exists():
        raise ImageReadError("file not found", path=path)
    if not path.is_file():
        raise ImageReadError("not a file", path=path)
    if path.stat().st_size == 0:
        raise ImageReadError("empty file (0 bytes)", path=path, fix="remove it or replace it with the real volume")
    try:
        img = nib.load(path)
    except Exception as err:
        raise ImageReadError(f"cannot read NIfTI header: {err.__class__.__name__}: {err}", path=path, fix="is the file complete and really NIfTI?") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"not a NIfTI image ({type(img).__name__})", path=path, fix="convert it to .nii or .nii.gz")
    return img


def _kind(img, path: Path) -> tuple[str, tuple[int, ...]]:
    """('slice' | 'volume', shape without meaningless trailing axes); refuses component axes."""
    shape = tuple(int(d) for d in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise ImageReadError(
            f"unexpected axis: {len(shape)}D data of shape {shape} (the axes after the fourth hold per-voxel components)",
            path=path,
            fix="medvq reads 2D slices, 3D volumes and 4D series of volumes (X, Y, Z, T); save one component as its own file",
        )
    intent = str(img.header.get_intent()[0]).lower()
    if len(shape) == 4 and intent in COMPONENT_INTENTS:
        raise ImageReadError(
            f"unexpected axis: the 4th axis of shape {shape} holds {intent} components (NIfTI intent '{intent}'), not a series of volumes",
            path=path,
            fix="medvq reads 4D files as series of volumes (X, Y, Z, T); save one component as its own 3D file",
        )
    spatial = [d for d in shape[:3] if d > 1]
    if len(shape) <= 3 and len(spatial) == 2:
        return "slice", shape
    if len(spatial) < 2 and (len(shape) < 4 or shape[3] == 1):
        raise ImageReadError(f"no 2D image data (shape {shape})", path=path)
    return "volume", shape


def _read_data(img, path: Path) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except Exception as err:  # truncated gzip, short file, bad scaling
        raise ImageReadError(
            f"cannot read NIfTI data: {err.__class__.__name__}: {err}", path=path, fix="the file is corrupt or truncated; copy it again"
        ) from err


def _check_side(shape: tuple[int, int], path: Path, what: str, options: VolumeOptions) -> None:
    if min(shape) < options.min_side:
        raise ImageReadError(
            f"{what} is {shape[1]}x{shape[0]} px, smaller than the model stride ({options.min_side} px per side at least)",
            path=path,
            fix="choose another --slice-axis, or leave this file out",
        )


@dataclass(frozen=True)
class _Stats:
    background: float  # minimum finite value: NaN / -inf become this
    low: float  # intensity that maps to 0
    high: float  # intensity that maps to 1


def _stats(values: np.ndarray, options: VolumeOptions, fallback: _Stats | None = None) -> _Stats | None:
    """Percentile clip levels from the foreground (finite, above the minimum) of ``values``."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return fallback
    background = float(finite.min())
    foreground = finite[finite > background]
    if foreground.size == 0:
        return fallback
    low, high = np.percentile(foreground, [options.intensity_low_percentile, options.intensity_high_percentile])
    if not high > low:  # e.g. a binary image: every foreground voxel equal
        low, high = background, float(foreground.max())
    return _Stats(background, float(low), float(high))


def _normalise(image: np.ndarray, stats: _Stats) -> np.ndarray:
    x = np.where(np.isnan(image) | np.isneginf(image), stats.background, image)
    x = np.where(np.isposinf(x), stats.high, x)
    return ((np.clip(x, stats.low, stats.high) - stats.low) / (stats.high - stats.low)).astype(np.float32)


def _foreground_fraction(slices: np.ndarray, background: float) -> np.ndarray:
    """(S, H, W) -> (S,) share of finite voxels above the background."""
    with np.errstate(invalid="ignore"):
        fg = np.isfinite(slices) & (slices > background)
    return fg.reshape(len(slices), -1).mean(axis=1)


@dataclass(frozen=True)
class _Volume:
    slices: np.ndarray  # (T, S, H, W) float32 in display orientation, raw intensities (NaN kept)
    stats: tuple[_Stats, ...]  # per volume of the series
    foreground: np.ndarray  # (T, S) share of foreground voxels per slice
    spacing_mm: float  # distance between neighbouring slices


def _display(volume: np.ndarray, axis: int) -> np.ndarray:
    """RAS+ (X, Y, Z) -> (S, H, W): slices along ``axis``, the later remaining axis pointing up."""
    moved = np.moveaxis(volume, axis, 0)  # (S, P, Q), P before Q in RAS order
    return np.ascontiguousarray(moved.transpose(0, 2, 1)[:, ::-1, :])  # (S, Q, P), rows from +Q down


@lru_cache(maxsize=2)
def _load_volume(path_str: str, mtime_ns: int, size: int, slice_axis: str, series_volumes: str, low: float, high: float) -> _Volume:
    import nibabel as nib

    path = Path(path_str)
    img = _open(path)
    _, shape = _kind(img, path)
    img = nib.as_closest_canonical(img)  # may permute and flip the spatial axes
    data = _read_data(img, path)
    while data.ndim > 4 or (data.ndim == 4 and data.shape[-1] == 1 and len(shape) == 3):
        data = data[..., 0]  # trailing axes of length 1
    if data.ndim == 3:
        data = data[..., None]  # (X, Y, Z, T=1)
    if series_volumes == "first":
        data = data[..., :1]
    elif series_volumes == "mean":
        with np.errstate(invalid="ignore"):
            data = np.nanmean(np.where(np.isinf(data), np.nan, data), axis=3, keepdims=True)
    axis = SLICE_AXES[slice_axis]
    options = VolumeOptions(intensity_low_percentile=low, intensity_high_percentile=high)
    slices, stats, foreground = [], [], []
    for t in range(data.shape[3]):
        vol = data[..., t]
        s = _stats(vol, options)
        if s is None:
            finite = vol[np.isfinite(vol)]
            problem = "no finite voxels (all NaN or inf)" if finite.size == 0 else f"every voxel is {finite.flat[0]:g} (zero-filled or constant volume)"
            where = f" in volume {t} of the series" if data.shape[3] > 1 else ""
            raise ImageReadError(problem + where, path=path, fix="the file holds no image; remove it from the data folder")
        shown = _display(vol, axis)
        slices.append(shown)
        stats.append(s)
        foreground.append(_foreground_fraction(shown, s.background))
    zooms = img.header.get_zooms()
    spacing = float(zooms[axis]) if len(zooms) > axis and zooms[axis] > 0 else 1.0
    return _Volume(np.stack(slices), tuple(stats), np.stack(foreground), spacing)


def _volume(path: Path, options: VolumeOptions) -> _Volume:
    if not path.is_file():
        _open(path)  # raises the error that names the problem
    st = path.stat()
    levels = (options.intensity_low_percentile, options.intensity_high_percentile)
    return _load_volume(str(path.resolve()), st.st_mtime_ns, st.st_size, options.slice_axis, options.series_volumes, *levels)


# --- listing ------------------------------------------------------------------------------------
def scan_nifti_file(path: str | Path, options: VolumeOptions, *, label: str = "", split: str | None = None) -> list:
    """The samples of one NIfTI file: itself (a slice file) or its non-empty slices (a volume / series)."""
    path = Path(path)
    img = _open(path)
    kind, shape = _kind(img, path)
    pid = subject_id(path)
    if kind == "slice":
        _check_side(tuple(d for d in shape if d > 1), path, "the slice", options)
        return [Sample(path=path, label=label, patient_id=pid, split=split)]
    vol = _volume(path, options)
    n_volumes, n_slices = vol.foreground.shape
    _check_side(vol.slices.shape[-2:], path, f"each {options.slice_axis} slice", options)
    samples = []
    for t in range(n_volumes):
        for s in range(n_slices):
            if vol.foreground[t, s] >= options.min_foreground_fraction and vol.foreground[t, s] > 0:
                samples.append(
                    Sample(
                        path=path,
                        label=label,
                        patient_id=pid,
                        split=split,
                        frame=t * n_slices + s,
                        meta={"volume": t, "slice": s, "position_mm": s * vol.spacing_mm},
                    )
                )
    if not samples:
        raise ImageReadError(
            f"no {options.slice_axis} slice has {options.min_foreground_fraction:.0%} foreground voxels",
            path=path,
            fix="lower --min-foreground-fraction or choose another --slice-axis",
        )
    return samples


def nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def holds_nifti(root: str | Path) -> bool:
    """True for a NIfTI file, or a folder holding NIfTI files directly or in split folders."""
    root = Path(root)
    if root.is_file():
        return is_nifti(root)
    if not root.is_dir():
        return False
    if nifti_files(root):
        return True
    return any(d.is_dir() and d.name.lower() in SPLIT_ALIASES and nifti_files(d) for d in root.iterdir())


def scan_nifti(root: str | Path, options: VolumeOptions, splits: Sequence[str] | None = None) -> list:
    """Unlabelled slice samples of a NIfTI dataset.

    Layouts: ``ROOT/{train,validate|val,test}/*.nii[.gz]`` (HipMRI), ``ROOT/*.nii[.gz]`` (a folder of
    subjects, split later by patient) or a single file.
    """
    root = Path(root)
    if root.is_file():
        return scan_nifti_file(root, options)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_ALIASES}
    layout = {s: d for s, d in split_dirs.items() if nifti_files(d)} or {None: root}
    samples = []
    for split, folder in layout.items():
        if splits is not None and split is not None and split not in splits:
            continue
        for path in nifti_files(folder):
            samples.extend(scan_nifti_file(path, options, split=split))
    if not samples:
        raise DatasetError("no NIfTI slices found", path=root, fix="expected ROOT/{train,validate,test}/*.nii.gz or ROOT/*.nii.gz")
    return samples


# --- reading ------------------------------------------------------------------------------------
def read_nifti(path: str | Path, frame: int | None, options: VolumeOptions) -> np.ndarray:
    """One slice as float32 (H, W) in [0, 1], normalised as the module docstring says."""
    path = Path(path)
    if frame is None:
        img = _open(path)
        kind, shape = _kind(img, path)
        if kind != "slice":
            raise ImageReadError(
                f"a volume of shape {shape}, read here as a single image",
                path=path,
                fix="list its slices (medvq reads volumes through data folders, `medvq infer` or nifti.scan_nifti_file)",
            )
        image = _read_data(img, path).reshape([d for d in shape if d > 1])
        _check_side(image.shape, path, "the slice", options)
        stats = _stats(image, options)
        if stats is None:
            finite = image[np.isfinite(image)]
            problem = "no finite voxels (all NaN or inf)" if finite.size == 0 else f"every voxel is {finite.flat[0]:g} (zero-filled slice)"
            raise ImageReadError(problem, path=path, fix="the file holds no image; remove it from the data folder")
        return np.ascontiguousarray(_normalise(image, stats))
    vol = _volume(path, options)
    n_volumes, n_slices = vol.foreground.shape
    if not 0 <= frame < n_volumes * n_slices:
        raise ImageReadError(
            f"frame {frame} does not exist ({n_volumes} x {n_slices} {options.slice_axis} slices)",
            path=path,
            fix="was the data listed with another slice axis or series setting?",
        )
    t, s = divmod(int(frame), n_slices)
    image = vol.slices[t, s]
    stats = vol.stats[t]
    if options.intensity_scope == "slice":
        stats = _stats(image, options, fallback=stats)
    _check_side(image.shape, path, f"{options.slice_axis} slice {s}", options)
    return np.ascontiguousarray(_normalise(image, stats))


# --- a position split for a single volume -------------------------------------------------------
def split_by_position(samples: Sequence, fractions: dict[str, float], gap_mm: float) -> dict[str, list]:
    """Cut the slices of ONE volume into contiguous slabs (in the order of ``fractions``) with at least
    ``gap_mm`` between any two slices of different slabs; slices inside the gaps are left out.

    For studies of a single subject (e.g. the Colin27 benchmark): slices of one volume are never
    independent, so neighbouring slabs are kept apart by the gap.
    """
    if not samples:
        raise ValueError("no samples to split")
    paths = {(s.path, s.meta.get("volume", 0)) for s in samples}
    if len(paths) != 1 or any(s.frame is None for s in samples):
        raise ValueError("split_by_position needs the slices of exactly one volume")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total}")
    ordered = sorted(samples, key=lambda s: s.meta["position_mm"])
    positions = np.array([s.meta["position_mm"] for s in ordered])
    spacing = float(np.median(np.diff(positions))) if len(positions) > 1 else 1.0
    skip = max(0, math.ceil(gap_mm / spacing - 1e-9) - 1)  # slices left out between slabs
    usable = len(ordered) - skip * (len(fractions) - 1)
    if usable < len(fractions):
        raise ValueError(f"{len(ordered)} slices cannot make {len(fractions)} slabs {gap_mm} mm apart")
    out: dict[str, list] = {}
    names, index = list(fractions), 0
    for i, name in enumerate(names):
        if i:  # the next slab starts gap_mm beyond the last slice of the previous one (by position)
            last = positions[index - 1]
            while index < len(ordered) and positions[index] < last + gap_mm - 1e-6:
                index += 1
        count = len(ordered) if i == len(names) - 1 else max(1, round(fractions[name] * usable))
        out[name] = ordered[index : index + count]
        if not out[name]:
            raise ValueError(f"{len(ordered)} slices cannot make {len(fractions)} slabs {gap_mm} mm apart")
        index += len(out[name])
    return out
