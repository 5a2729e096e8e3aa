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
