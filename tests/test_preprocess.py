import numpy as np
import pytest
import torch

from medvq.data.preprocess import Preprocessor, find_padding
from medvq.data.readers import read_image


def _scan_with_wedge(h=200, w=300, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.05, 0.3, size=(h, w)).astype(np.float32)
    img[120:130] = 0.9  # a bright retinal band reaching both side edges (must not count as padding)
    yy, xx = np.mgrid[:h, :w]
    wedge = yy < 40 - xx * 40 / w  # top-left registration wedge
    img[wedge] = 1.0
    return img, wedge


def test_padding_wedge_found_and_excluded_from_valid():
    img, wedge = _scan_with_wedge()
    pad = find_padding(img)
    assert (pad & wedge).sum() / wedge.sum() > 0.97
    assert not pad[100:].any(), "the bright retinal band is not padding"
    prepared = Preprocessor(image_size=64)(img)
    assert prepared.image.shape == (1, 64, 64) and prepared.valid.shape == (1, 64, 64)
    assert not prepared.valid[0, 0, 0] and prepared.valid[0, -1, -1]
    assert prepared.image.max() < 0.95, "padding was filled, the bright band is thin after resizing"


def _plain_scan(h=200, w=300):
    img = np.random.default_rng(1).uniform(0.05, 0.3, size=(h, w)).astype(np.float32)
    img[120:130] = 0.9
    return img


def test_full_padding_bars_are_cropped():
    img = _plain_scan()
    barred = np.concatenate([np.ones((30, img.shape[1]), np.float32), img, np.ones((2, img.shape[1]), np.float32)])
    g = Preprocessor(image_size=64)(barred).geometry
    assert (g.top, g.bottom) == (30, 30 + img.shape[0])


def test_real_kermany_padding(kermany):
    img = read_image(kermany / "CNV" / "CNV-4483343-1.jpeg")  # a large white registration wedge
    pad = find_padding(img)
    assert pad.mean() > 0.2
    assert img[pad].min() >= 0.8
    prepared = Preprocessor(image_size=128)(img)
    assert prepared.geometry.top > 100, "rows that are mostly padding are cropped"
    assert (~prepared.valid).float().mean() > 0.03, "the rest of the wedge is left out of scoring"


def test_mask_follows_the_image_geometry():
    img = _plain_scan()
    mask = np.zeros_like(img, bool)
    mask[150:180, 200:260] = True  # lower right block
    p = Preprocessor(image_size=100)(img, mask)
    m = p.mask[0].numpy()
    ys, xs = np.nonzero(m)
    h, w = img.shape
    assert abs(ys.mean() / 100 - 165 / h) < 0.02 and abs(xs.mean() / 100 - 230 / w) < 0.02
    assert abs(m.mean() - mask.mean()) < 0.01


def test_to_original_round_trip():
    img, _ = _scan_with_wedge()
    pre = Preprocessor(image_size=64)
    p = pre(img)
    back = pre.to_original(p.image[0].numpy(), p.geometry)
    assert back.shape == img.shape
    keep = ~find_padding(img)
    assert np.abs(back - img)[keep].mean() < 0.08


def test_acquisition_width_does_not_reach_the_model(kermany):
    """The same retina scanned with 1024 or 512 A-scans must give (nearly) the same model input.

    A 512-wide scan of the same field is simulated by averaging neighbouring A-scans of a real 1024-wide
    scan. With the default field of view both become the same tensor; keeping the pixel spacing
    ('crop') shows anatomy at a width-dependent scale, which this test would catch.
    """
    full = read_image(kermany / "NORMAL" / "NORMAL-1256555-1.jpeg")
    assert full.shape[1] == 1024
    half = full.reshape(full.shape[0], 512, 2).mean(axis=2)
    for size in (64, 128):
        pre = Preprocessor(image_size=size)
        a, b = pre(full).image, pre(half).image
        assert a.shape == b.shape == (1, size, size)
        assert (a - b).abs().mean() < 0.01, "stretch: input depends on the acquisition width"
        crop = Preprocessor(image_size=size, fov="crop")
        assert (crop(full).image - crop(half).image).abs().mean() > 3 * (a - b).abs().mean()


def test_output_never_padded_to_keep_aspect(kermany):
    """No constant bars whose size would encode the original aspect ratio."""
    for name in ("NORMAL/NORMAL-1256555-1.jpeg", "DRUSEN/DRUSEN-228939-1.jpeg"):
        x = Preprocessor(image_size=128)(read_image(kermany / name)).image[0]
        for edge in (x[:, :3], x[:, -3:], x[:3], x[-3:]):
            assert edge.std() > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="fov"):
        Preprocessor(fov="pad")
    with pytest.raises(ValueError, match="2D"):
        Preprocessor()(np.zeros((3, 20, 20), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        Preprocessor()(np.zeros((20, 20), np.float32), np.zeros((10, 10), bool))


def test_nan_and_inf_handled():
    img = np.full((40, 40), 0.2, np.float32)
    img[5, 5], img[6, 6] = np.nan, np.inf
    out = Preprocessor(image_size=32)(img).image
    assert torch.isfinite(out).all()
