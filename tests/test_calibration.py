import numpy as np
import pytest
import torch

from medvq.scoring.calibration import NormalCalibration


def _normals(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = 0.05 + 0.01 * torch.rand(n, 1, 16, 16, generator=g)
    alm = 10.0 + 2.0 * torch.rand(n, 1, 16, 16, generator=g)  # different units: nats vs squared error
    return {"residual": residual, "alm": alm}


def test_standardised_maps_use_normal_statistics_only():
    cal = NormalCalibration(reducer="mean", combine=["residual", "alm"]).fit(_normals())
    z = cal.standardize(_normals(seed=1))
    for name in ("residual", "alm"):
        assert abs(z[name].mean().item()) < 0.1 and abs(z[name].std().item() - 1) < 0.1
    assert "combined" in z
    torch.testing.assert_close(z["combined"], (z["residual"] + z["alm"]) / 2)


def test_scores_are_comparable_across_images_no_per_image_min_max():
    cal = NormalCalibration(reducer="topk", topk_fraction=0.05).fit(_normals())
    test = _normals(n=3, seed=2)
    test["residual"][1] += 0.05  # image 1 is uniformly worse: per-image min-max would hide this
    test["alm"][1] += 5.0
    scores = cal.image_scores(cal.standardize(test))
    for name in ("residual", "alm", "combined"):
        assert scores[name][1] > scores[name][0] + 1 and scores[name][1] > scores[name][2] + 1


def test_valid_mask_excludes_padding_from_scores():
    cal = NormalCalibration(reducer="max").fit(_normals())
    test = _normals(n=2, seed=3)
    test["residual"][0, 0, 0, 0] = 100.0  # a huge value on padding
    valid = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    valid[0, 0, 0, 0] = False
    with_mask = cal.image_scores(cal.standardize(test), valid)["residual"]
    without = cal.image_scores(cal.standardize(test))["residual"]
    assert without[0] > 100 and with_mask[0] < 10


def test_score_table_places_scores_among_normals():
    cal = NormalCalibration(reducer="mean").fit(_normals(n=50))
    ref = np.array(cal.stats["alm"].normal_scores)
    table = cal.score_table({"alm": np.array([ref.min() - 1, np.median(ref), ref.max() + 1])})["alm"]
    assert table["normal_percentile"][0] == 0 and table["normal_percentile"][2] == 100
    assert 40 <= table["normal_percentile"][1] <= 60
    assert table["z"][2] > 0 > table["z"][0]


def test_json_round_trip(tmp_path):
    cal = NormalCalibration(reducer="topk", topk_fraction=0.1).fit(_normals())
    cal.save(tmp_path / "c.json")
    again = NormalCalibration.load(tmp_path / "c.json")
    test = _normals(n=4, seed=9)
    a = cal.image_scores(cal.standardize(test))
    b = again.image_scores(again.standardize(test))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_needs_normals():
    with pytest.raises(ValueError, match="at least 2"):
        NormalCalibration().fit({"alm": torch.rand(1, 1, 4, 4)})
