"""The fast padding search and background level against the full-resolution originals they replaced.

The reference below is the earlier implementation (scipy morphology and labelling on every pixel, exact
quantiles), kept here only to pin the results of ``medvq.data.preprocess`` on real kermany-dev scans.
"""

import numpy as np
import pytest
from scipy import ndimage

import medvq.data.preprocess as P
from medvq.data.preprocess import PADDING_LEVEL, Preprocessor, background_level, find_padding
from medvq.data.readers import read_image

# Scans with the largest differences between the two searches (thin bright strips along an edge, a
# narrow bar at a side edge, a large wedge), then an even spread over the rest.
HARD = ["NORMAL/NORMAL-2786036-1.jpeg", "CNV/CNV-1472343-1.jpeg", "NORMAL/NORMAL-4981311-1.jpeg", "CNV/CNV-420724-1.jpeg", "CNV/CNV-4483343-1.jpeg"]


def reference_find_padding(image, level=PADDING_LEVEL, min_fraction=0.001):
    bright = image >= level
    padding = np.zeros_like(bright)
    if not bright.any():
        return padding
    h, w = bright.shape
    for axis, size in ((1, h), (0, w)):
        share = bright.mean(axis=axis)
        for order in (range(size), range(size - 1, -1, -1)):
            for k, i in enumerate(order):
                if k >= size // 10 or (share[i] < 0.25 and k >= 3):
                    break
                if share[i] < 0.25:
                    continue
                if axis == 1:
                    padding[i] = bright[i]
                else:
                    padding[:, i] |= bright[:, i]
    opened = ndimage.binary_opening(bright, structure=np.ones((3, 3), bool), iterations=2)
    labels, n = ndimage.label(opened)
    if n:
        edge_labels = np.union1d(labels[0], labels[-1])
        edge_labels = edge_labels[edge_labels > 0]
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=edge_labels)
        keep = edge_labels[sizes >= min_fraction * image.size]
        regions = np.isin(labels, keep)
        padding |= regions | (ndimage.binary_dilation(regions, iterations=3) & (image >= level * 0.85))
    return padding


def reference_background_level(image, padding):
    values = image[~padding]
    if values.size == 0:
        return 0.0
    return float(np.median(values[values <= np.quantile(values, 0.5)]))


def _scans(kermany):
    files = sorted(kermany.glob("*/*.jpeg"))
    return [kermany / name for name in HARD] + files[::40]


def test_padding_agrees_with_the_full_resolution_search(kermany, monkeypatch):
    for path in _scans(kermany):
        image = read_image(path)
        old, new = reference_find_padding(image), find_padding(image)
        differ = old ^ new
        assert differ.mean() <= 0.001, f"{path.name}: {differ.mean():.2%} of the pixels differ"
        # Within a few pixels: differing pixels lie on the old mask's border, except along thin bright
        # strips at an edge that one search opens away and the other keeps.
        depth = np.maximum(ndimage.distance_transform_edt(old), ndimage.distance_transform_edt(~old))
        assert (differ & (depth > 3)).mean() <= 0.0005, path.name
        assert abs(background_level(image, old) - reference_background_level(image, old)) <= 1.5 / 255, path.name
        # What the model sees barely moves.
        pre = Preprocessor(image_size=128)
        got = pre(image)
        with monkeypatch.context() as m:
            m.setattr(P, "find_padding", reference_find_padding)
            m.setattr(P, "background_level", reference_background_level)
            ref = pre(image)
        assert (got.image - ref.image).abs().mean() < 0.005, path.name
        assert (got.valid != ref.valid).float().mean() < 0.005, path.name


@pytest.mark.parametrize("shape", [(1, 1), (2, 9), (9, 2), (5, 5), (30, 40)])
def test_tiny_and_flat_images(shape):
    for fill in (0.0, 1.0):
        image = np.full(shape, fill, np.float32)
        pad = find_padding(image)
        assert pad.shape == shape and pad.dtype == bool
        if fill == 0.0:
            assert not pad.any()
    assert background_level(np.full((20, 20), 0.2, np.float32), np.zeros((20, 20), bool)) == pytest.approx(0.2, abs=0.5 / 255)
    assert background_level(np.ones((4, 4), np.float32), np.ones((4, 4), bool)) == 0.0
