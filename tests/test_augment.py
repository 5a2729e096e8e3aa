"""Training-time rescaling and translation of ScanDataset items."""

from __future__ import annotations

import torch

from medvq.data.dataset import ScanDataset


def _dataset(zoom: float, shift: float) -> ScanDataset:
    ds = ScanDataset.__new__(ScanDataset)  # the augmentation needs no files
    ds.zoom, ds.shift = zoom, shift
    return ds


def _square() -> dict[str, torch.Tensor]:
    image = torch.zeros(1, 64, 64)
    image[:, 24:40, 24:40] = 0.8
    return {"image": image, "valid": torch.ones(1, 64, 64, dtype=torch.bool), "mask": image > 0}


def test_zoom_rescales_image_and_mask_together():
    torch.manual_seed(0)
    areas = []
    for _ in range(50):
        out = _dataset(0.4, 0.0)._rescale(_square())
        area = int(out["mask"].sum())
        assert 0.6**2 * 256 - 20 <= area <= 1.4**2 * 256 + 20
        bright = out["image"][0] > 0.4
        assert (bright ^ out["mask"][0]).float().mean() < 0.02, "the mask follows the image"
        assert out["image"].min() >= 0 and out["image"].max() <= 1 and out["valid"].dtype == torch.bool
        areas.append(area)
    assert min(areas) < 180 and max(areas) > 340, "both smaller and larger than the original 256 px"


def test_shift_moves_the_content_and_border_pixels_fill_in():
    torch.manual_seed(1)
    centres = []
    for _ in range(30):
        out = _dataset(0.0, 0.2)._rescale(_square())
        ys, xs = torch.nonzero(out["mask"][0], as_tuple=True)
        assert int(out["mask"].sum()) == 256, "a pure shift keeps the area"
        assert abs(float(xs.float().mean()) - 31.5) <= 0.2 * 64 + 1
        centres.append(float(xs.float().mean()))
        assert bool(out["valid"].all()), "border pixels are repeated, so nothing becomes invalid"
    assert max(centres) - min(centres) > 8
