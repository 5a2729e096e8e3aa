"""The one preprocessing function used by training, evaluation and inference alike.

sample -> ``read_sample`` (image files; NIfTI slices percentile-normalised, see ``medvq.data.nifti``)
  -> scan (H, W) in [0, 1]
  -> white registration padding found (bright, flat regions touching the top or bottom edge), filled with
     the scan's background level and remembered in a ``valid`` mask that every score ignores
  -> field of view: ``stretch`` resizes the whole scan to image_size x image_size (anti-aliased);
     ``crop`` scales by height and keeps the central square
  -> float32 tensor (1, S, S) in [0, 1]; masks follow the same geometry.

Why ``stretch`` is the default: in Kermany OCT2017, scans 512 and 1024 A-scans wide cover the same
lateral field (the foveal pit spans the same fraction of the width), so stretching maps every scan to the
same anatomy, and anti-aliased resampling averages the denser scans down to the same lateral sampling.
Keeping the pixel spacing (``crop``) shows anatomy at a width-dependent scale; padding to keep the
aspect ratio would add bars whose size encodes the width. Neither mode hides the width completely:
acquisition protocols differ in speckle texture, and a texture probe still tells 1024- from 512-wide
normal scans (``benchmarks/width_leak.py``: probe AUROC 0.88 with stretch, 0.91 with crop on
kermany-dev at 128 px). That is why ``medvq evaluate`` reports AUROC within each original width next to
the pooled figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from medvq.data.config import DataConfig, from_data_config
from medvq.data.nifti import VolumeOptions, is_nifti
from medvq.data.readers import read_mask, read_sample
from medvq.data.samples import Sample

if TYPE_CHECKING:  # torch is imported where tensors are made, so the numpy stage runs without it (medvq.onnx_runtime)
    import torch

PADDING_LEVEL = 0.96  # registration padding is saturated white (255 in 8-bit files, JPEG-blurred at edges)


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original scan, to map results back onto it."""

    height: int  # original scan size
    width: int
    top: int  # crop box in original pixels (rows/cols kept after removing full padding bars and FOV crop)
    bottom: int
    left: int
    right: int


@dataclass
class Prepared:
    image: torch.Tensor  # (1, S, S) float32 in [0, 1]
    valid: torch.Tensor  # (1, S, S) bool: False on padding
    mask: torch.Tensor | None  # (1, S, S) bool lesion mask, if one was given
    geometry: Geometry


def find_padding(image: np.ndarray, level: float = PADDING_LEVEL, min_fraction: float = 0.001) -> np.ndarray:
    """Bool mask of white padding: bright border lines, and bright flat regions touching the top or bottom.

    Bright retina (a saturated RPE line) can touch the left/right edges but is thin and textured; an
    opening removes thin structures and only large regions reaching the top/bottom edge count. Thin white
    lines along an edge (a quarter or more of the line saturated) are padding too.

    Border lines are found from the edge rows and columns at full resolution. Regions are found on every
    second row and column (a quarter of the pixels; the 3x3 opening there spans 6 px, as the 5x5 opening
    at full resolution did) and mapped back to full resolution through the bright fringe: the mask agrees
    with a full-resolution search to within a few pixels along region borders, in a fraction of its time.
    """
    h, w = image.shape
    padding = np.zeros((h, w), bool)
    for axis, size in ((0, h), (1, w)):  # rows, then columns
        for order in (range(size), range(size - 1, -1, -1)):  # from each edge inwards
            for k, i in enumerate(order):
                if k >= size // 10:
                    break
                line = (image[i] if axis == 0 else image[:, i]) >= level
                if np.count_nonzero(line) < 0.25 * line.size:
                    if k >= 3:  # look past a dark line or two at the edge
                        break
                    continue
                if axis == 0:
                    padding[i] = line
                else:
                    padding[:, i] |= line
    coarse = image[::2, ::2] >= level
    found = _edge_regions(coarse, min_fraction * coarse.size) if coarse.any() else None
    if found is not None:
        # The opening shrinks regions; grow back into the bright fringe (JPEG ringing at the padding edge).
        r0, c0, regions = found
        grown = regions.repeat(2, axis=0).repeat(2, axis=1)
        box = (slice(2 * r0, min(2 * r0 + grown.shape[0], h)), slice(2 * c0, min(2 * c0 + grown.shape[1], w)))
        padding[box] |= grown[: box[0].stop - box[0].start, : box[1].stop - box[1].start] & (image[box] >= level * 0.85)
    return padding


def _shifted(axis: int, d: int, n: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Index pairs (head, tail) of a 2D array, tail = head shifted by +d along ``axis``."""
    head, tail = [slice(None)] * 2, [slice(None)] * 2
    head[axis], tail[axis] = slice(0, n - d), slice(d, n)
    return tuple(head), tuple(tail)


def _opening3(a: np.ndarray) -> np.ndarray:
    """Binary opening by the 3x3 square, outside the image counting as background (as
    ``ndimage.binary_opening(a, np.ones((3, 3)))``): shifted ANDs, then shifted ORs, one axis at a time."""
    out = a.copy()
    for axis in (0, 1):
        n, src = a.shape[axis], out.copy()
        if n > 1:
            head, tail = _shifted(axis, 1, n)
            out[head] &= src[tail]
            out[tail] &= src[head]
        for edge in (0, n - 1):
            out[(edge, slice(None)) if axis == 0 else (slice(None), edge)] = False
    for axis in (0, 1):
        n, src = a.shape[axis], out.copy()
        if n > 1:
            head, tail = _shifted(axis, 1, n)
            out[head] |= src[tail]
            out[tail] |= src[head]
    return out


def _edge_regions(bright: np.ndarray, min_size: float, grow: int = 2) -> tuple[int, int, np.ndarray] | None:
    """Regions of the opened ``bright`` (4-connected) that touch the top or bottom edge and hold at least
    ``min_size`` pixels, dilated by ``grow`` steps of the 3x3 cross: (top, left, mask of that box), or None."""
    h, w = bright.shape
    opened = _opening3(bright)
    rows = np.flatnonzero(opened.any(axis=1))
    if not rows.size or (rows[0] > 0 and rows[-1] < h - 1):
        return None
    cols = np.flatnonzero(opened.any(axis=0))
    labels, _ = ndimage.label(opened[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])  # inside the box of what is left
    edge = np.union1d(labels[0] if rows[0] == 0 else [], labels[-1] if rows[-1] == h - 1 else []).astype(np.int64)
    edge = edge[edge > 0]
    keep = np.zeros(labels.max() + 1, bool)
    keep[edge[np.bincount(labels.ravel())[edge] >= min_size]] = True
    if not keep.any():
        return None
    r0, c0 = max(rows[0] - grow, 0), max(cols[0] - grow, 0)
    out = np.zeros((min(rows[-1] + 1 + grow, h) - r0, min(cols[-1] + 1 + grow, w) - c0), bool)
    out[rows[0] - r0 : rows[0] - r0 + labels.shape[0], cols[0] - c0 : cols[0] - c0 + labels.shape[1]] = keep[labels]
    for _ in range(grow):
        src = out.copy()
        for axis in (0, 1):
            if out.shape[axis] > 1:
                head, tail = _shifted(axis, 1, out.shape[axis])
                out[head] |= src[tail]
                out[tail] |= src[head]
    return int(r0), int(c0), out


def background_level(image: np.ndarray, padding: np.ndarray) -> float:
    """Typical intensity of the dark vitreous/background, used to fill padding: the median of the darker
    half of the unpadded pixels, from a 256-level histogram of every second row and column (exact order
    statistics for 8-bit scans up to the sampling; a fill level, not a measurement)."""
    values = image[::2, ::2][~padding[::2, ::2]]
    if values.size == 0:
        values = image[~padding]
    if values.size == 0:
        return 0.0
    cum = np.cumsum(np.bincount((values * 255 + 0.5).astype(np.intp), minlength=256))
    level = lambda k: int(np.searchsorted(cum, k, side="right"))  # the level of the k-th smallest value (0-based)
    dark = int(cum[level((values.size - 1) // 2)])  # values at or below the median
    return level((dark - 1) // 2) / 255.0


def _resize(t: torch.Tensor, size: tuple[int, int], kind: str) -> torch.Tensor:
    """t (1, 1, h, w) float -> (1, 1, *size). Images anti-aliased; masks by area coverage >= 1/2."""
    import torch.nn.functional as F

    if kind == "image":
        return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    return F.interpolate(t, size=size, mode="area") >= 0.5


_DATA = DataConfig.model_fields  # defaults come from the one config


@dataclass(frozen=True)
class Preprocessor:
    """How a scan becomes a model input; built from ``DataConfig`` (see its field descriptions)."""

    image_size: int = _DATA["image_size"].default
    fov: str = _DATA["fov"].default
    remove_padding: bool = _DATA["remove_padding"].default
    volume: VolumeOptions = field(default_factory=VolumeOptions)  # how NIfTI slices are read and normalised

    def __post_init__(self) -> None:
        if self.fov not in ("stretch", "crop"):
            raise ValueError(f"fov must be 'stretch' or 'crop', got {self.fov!r}")

    @classmethod
    def from_config(cls, data_config, stride: int = 1) -> "Preprocessor":
        """``stride``: the model's; NIfTI slices with a shorter side are refused."""
        return from_data_config(cls, data_config, volume=VolumeOptions.from_config(data_config, stride))

    def load(self, sample: Sample, with_mask: bool = False) -> tuple[np.ndarray, Prepared]:
        """Read a sample and prepare it: the route of training, evaluation and inference alike.

        Returns the scan as read ((H, W) in [0, 1]) and the model input. White registration padding is an
        OCT artefact: NIfTI slices are never searched for it; B-scans of OCT volumes are, like any OCT scan.
        """
        image = read_sample(sample, self.volume)
        mask = read_mask(sample.mask_path, image.shape) if with_mask and sample.mask_path is not None else None
        nifti = is_nifti(sample.path)
        return image, self(image, mask, remove_padding=False if nifti else None)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None, *, remove_padding: bool | None = None) -> Prepared:
        if image.ndim != 2:
            raise ValueError(f"expected a 2D grayscale image, got shape {image.shape}")
        if mask is not None and mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        image, padding, geometry = self.crop(image, remove_padding)
        crop = (slice(geometry.top, geometry.bottom), slice(geometry.left, geometry.right))
        import torch  # here, not at the top: the numpy stage (crop) runs without torch

        size = (self.image_size, self.image_size)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
        out_image = _resize(as_t(image), size, "image")[0]
        valid = ~_resize(as_t(padding), size, "mask")[0] if padding.any() else torch.ones(1, *size, dtype=torch.bool)
        out_mask = _resize(as_t(mask[crop]), size, "mask")[0] if mask is not None else None
        return Prepared(out_image, valid, out_mask, geometry)

    def crop(self, image: np.ndarray, remove_padding: bool | None = None) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """The numpy stage: (H, W) scan -> the crop box's pixels with padding filled, its padding mask, and the box."""
        h, w = image.shape
        image = image.astype(np.float32, copy=False)
        if not np.isfinite(image.sum()):  # one pass for the common case: NaN and inf propagate into the sum
            image = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
        remove_padding = self.remove_padding if remove_padding is None else remove_padding
        padding = find_padding(image) if remove_padding else np.zeros(image.shape, bool)

        # Padding bars (rows/columns that are mostly padding) are cut off rather than filled.
        rows = np.flatnonzero(np.count_nonzero(padding, axis=1) < 0.5 * w)  # the rows' padding share below 1/2
        cols = np.flatnonzero(np.count_nonzero(padding, axis=0) < 0.5 * h)
        top, bottom = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, h)
        left, right = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, w)
        if self.fov == "crop":  # central square at the original pixel spacing
            side = min(bottom - top, right - left)
            top += (bottom - top - side) // 2
            left += (right - left - side) // 2
            bottom, right = top + side, left + side

        crop = (slice(top, bottom), slice(left, right))
        image, padding = image[crop].copy(), padding[crop]
        if padding.any():
            image[padding] = background_level(image, padding)
        return image, padding, Geometry(h, w, top, bottom, left, right)

    def to_original(self, map_: np.ndarray, geometry: Geometry, fill: float = 0.0) -> np.ndarray:
        """A (S, S) map -> the original scan's (H, W) grid (``fill`` outside the crop box)."""
        import torch
        import torch.nn.functional as F

        g = geometry
        t = torch.from_numpy(np.ascontiguousarray(map_, dtype=np.float32))[None, None]
        inner = F.interpolate(t, size=(g.bottom - g.top, g.right - g.left), mode="bilinear", align_corners=False)[0, 0]
        out = np.full((g.height, g.width), fill, dtype=np.float32)
        out[g.top : g.bottom, g.left : g.right] = inner.numpy()
        return out
