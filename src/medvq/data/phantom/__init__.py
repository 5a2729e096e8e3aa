"""Synthetic retinal OCT B-scans with pixel-exact lesion masks.

The phantom imitates Kermany OCT2017 B-scans (log-compressed, 8-bit): a curved,
layered retina with a foveal pit, vessel shadows, choroid texture, speckle and
white registration padding. Lesions (drusen, diabetic macular oedema cysts,
choroidal neovascularisation with subretinal fluid) are drawn by inserting
material into the tissue and displacing the layers around it.

The mask of a scan is the set of pixels the lesion changed: the lesion material
(drusen, cysts, fluid, fibrovascular tissue), the retina it pushed aside by at
least ``PhantomConfig.mask_min_shift`` pixels, and the tissue it shadows. Outside
the mask the scan is bit-identical to the same scan drawn without lesions (same
speckle, same padding); padding is never lesion.

The package: ``config`` (PhantomConfig), ``anatomy`` (the retina), ``lesions``, ``render`` (one scan and
its mask), ``writer`` (a dataset on disk).
"""

from medvq.data.phantom.config import CLASSES, LABEL_CNV, LABEL_DRUSEN, LABEL_FLUID, LABEL_FOCUS, LABEL_NONE, SPLITS, PhantomConfig
from medvq.data.phantom.render import _render, make_scan  # noqa: F401  (_render: a scan with and without its lesions, for the tests)
from medvq.data.phantom.writer import write_phantom

__all__ = ["CLASSES", "SPLITS", "LABEL_NONE", "LABEL_FLUID", "LABEL_DRUSEN", "LABEL_CNV", "LABEL_FOCUS", "PhantomConfig", "make_scan", "write_phantom"]
