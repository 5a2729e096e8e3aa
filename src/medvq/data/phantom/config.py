"""The phantom's settings (PhantomConfig, a config model of ``medvq.data.config``), classes, splits and material labels."""

from __future__ import annotations

from medvq.data.config import PhantomConfig  # noqa: F401 (with the data layer's other config models; its fields are `medvq phantom`'s flags)

CLASSES: tuple[str, ...] = ("NORMAL", "CNV", "DME", "DRUSEN")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Reference geometry: all sizes below are fractions of a 496 x 512 scan.
_REF_H, _REF_W = 496, 512

# Labels of the internal material map (used by tests and diagnostics).
LABEL_NONE, LABEL_FLUID, LABEL_DRUSEN, LABEL_CNV, LABEL_FOCUS = 0, 1, 2, 3, 4
