"""The phantom's settings (PhantomConfig), classes, splits and material labels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("NORMAL", "CNV", "DME", "DRUSEN")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Reference geometry: all sizes below are fractions of a 496 x 512 scan.
_REF_H, _REF_W = 496, 512
_MIN_SIZE = 32

# Labels of the internal material map (used by tests and diagnostics).
LABEL_NONE, LABEL_FLUID, LABEL_DRUSEN, LABEL_CNV, LABEL_FOCUS = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class PhantomConfig:
    """How phantom scans are drawn.

    ``speckle`` is the standard deviation of the multiplicative speckle and
    ``noise_floor`` that (grey levels) of the additive noise that dominates dark
    regions such as the vitreous, both at the native 496x512 scale; smaller images
    get less, as a downsampled scan would. ``lesion_size`` is the range of a
    log-uniform size multiplier drawn per lesion. Tissue a lesion moves by less
    than ``mask_min_shift`` pixels is left as it was and stays out of the mask.
    """

    height: int = 496
    width: int = 512
    speckle: float = 0.08
    noise_floor: float = 14.0
    padding_probability: float = 0.3
    lesion_size: tuple[float, float] = (0.6, 1.6)
    mask_min_shift: float = 0.5
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < _MIN_SIZE:
                raise ValueError(f"{name} must be an integer >= {_MIN_SIZE}, got {value!r}")
        for name in ("speckle", "noise_floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.padding_probability <= 1.0:
            raise ValueError(f"padding_probability must be in [0, 1], got {self.padding_probability!r}")
        lo, hi = self.lesion_size
        if not 0 < lo <= hi:
            raise ValueError(f"lesion_size must be (low, high) with 0 < low <= high, got {self.lesion_size!r}")
        if not self.mask_min_shift > 0:
            raise ValueError(f"mask_min_shift must be > 0, got {self.mask_min_shift!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality!r}")

