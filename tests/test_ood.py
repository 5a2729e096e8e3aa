import numpy as np
import pytest
import torch

from medvq.scoring.ood import MARGIN, DistributionGuard, scan_features


def test_guard_passes_its_normals_and_flags_a_shifted_feature():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(30, 4))
    guard = DistributionGuard().fit(normals, ["a", "b", "c", "d"])
    assert guard.threshold == pytest.approx(MARGIN * max(guard.normal_distances))
    assert (guard.distance(normals, ["a", "b", "c", "d"]) <= guard.threshold).all()
    fresh = rng.normal(size=(200, 4))
    assert (guard.distance(fresh, ["a", "b", "c", "d"]) <= guard.threshold).mean() > 0.97
    foreign = fresh[:10].copy()
    foreign[:, 2] += 20  # one feature far off is enough
    assert (guard.distance(foreign, ["a", "b", "c", "d"]) > guard.threshold).all()
    again = DistributionGuard.from_dict(guard.to_dict())
    np.testing.assert_allclose(again.distance(foreign, list("abcd")), guard.distance(foreign, list("abcd")))
    with pytest.raises(ValueError, match="do not match"):
        guard.distance(foreign, ["a", "b", "c", "x"])
    with pytest.raises(ValueError, match="at least 3"):
        DistributionGuard().fit(normals[:2], list("abcd"))


def test_scan_features_ignore_invalid_pixels():
    images = torch.full((2, 1, 16, 16), 0.2)
    images[1, 0, :4] = 1.0  # white padding rows on the second scan
    valid = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    valid[1, 0, :4] = False
    maps = {"residual": torch.zeros(2, 1, 16, 16)}
    maps["residual"][1, 0, :4] = 50.0
    f, names = scan_features(images, valid, maps)
    assert names[:5] == ["intensity_q05", "intensity_q25", "intensity_q50", "intensity_q75", "intensity_q95"] and names[-1] == "median_residual"
    np.testing.assert_allclose(f[0, :5], f[1, :5])  # padding does not change the intensity quantiles
    assert f[1, -1] == 0.0


def test_scan_features_of_a_batch_equal_those_taken_scan_by_scan():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 12, 12, generator=g)
    valid = torch.rand(4, 1, 12, 12, generator=g) > 0.3
    valid[0] = True
    valid[1] = False  # no valid pixel: every pixel counts
    maps = {"a": torch.randn(4, 1, 12, 12, generator=g), "b": 3 * torch.randn(4, 1, 12, 12, generator=g)}
    f, _ = scan_features(images, valid, maps)
    for i in range(4):
        keep = valid[i, 0] if valid[i].any() else torch.ones(12, 12, dtype=torch.bool)
        quantiles = torch.quantile(images[i, 0][keep], torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
        np.testing.assert_array_equal(f[i, :5], quantiles.numpy().astype(np.float64))
        np.testing.assert_array_equal(f[i, 7:], [float(m[i, 0][keep].median()) for m in maps.values()])
