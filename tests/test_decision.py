import json

import numpy as np
import pytest
import torch

from medvq.errors import MedvqError
from medvq.scoring.calibration import NormalCalibration, normals_needed, threshold_at_specificity
from medvq.scoring.decision import choose_primary, is_abnormal, operating_point


def test_threshold_on_a_known_score_distribution():
    scores = np.arange(1, 101, dtype=float)  # 100 normals scoring 1..100
    assert threshold_at_specificity(scores, 0.95) == 95.0  # 95 normals at or below, 5 above: specificity 0.95
    assert threshold_at_specificity(scores, 0.99) == 99.0
    assert threshold_at_specificity(np.random.default_rng(0).permutation(scores), 0.95) == 95.0  # order does not matter
    assert threshold_at_specificity(np.arange(1, 21, dtype=float), 0.95) == 19.0  # 20 normals: one lies above
    assert threshold_at_specificity(np.arange(1, 31, dtype=float), 0.99) == 30.0  # too few for 99 %: the highest normal
    for n in (7, 20, 31, 100, 257):
        s = np.random.default_rng(n).normal(size=n)
        for q in (0.95, 0.99):
            t = threshold_at_specificity(s, q)
            assert (s <= t).mean() >= q  # specificity on the calibration normals at least q
            assert t == s.min() or (s < t).mean() < q  # and the smallest such threshold
    assert normals_needed(0.95) == 20 and normals_needed(0.99) == 100
    with pytest.raises(ValueError, match="no normal scores"):
        threshold_at_specificity([], 0.95)


def _maps(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return {"residual": 0.1 * torch.rand(n, 1, 8, 8, generator=g) + shift, "alm": torch.rand(n, 1, 8, 8, generator=g)}


def test_calibration_stores_thresholds_with_counts_and_reliability(tmp_path):
    cal = NormalCalibration(reducer="mean").fit(_maps(40, 0))
    stored = json.loads(json.dumps(cal.to_dict()))["stats"]["residual"]["thresholds"]
    assert stored["spec95"]["n_normals"] == 40 and stored["spec95"]["reliable"] is True
    assert stored["spec99"]["n_normals"] == 40 and stored["spec99"]["reliable"] is False  # 99 % from < 100 normals is marked
    assert stored["spec95"]["value"] == threshold_at_specificity(cal.stats["residual"].normal_scores, 0.95)
    cal.save(tmp_path / "c.json")
    again = NormalCalibration.load(tmp_path / "c.json")
    assert again.thresholds_stored and again.threshold("combined", "spec99").value == cal.threshold("combined", "spec99").value


def test_old_calibration_without_thresholds_loads_and_derives_them(tmp_path):
    cal = NormalCalibration(reducer="mean").fit(_maps(30, 0))
    d = cal.to_dict()
    for st in d["stats"].values():
        del st["thresholds"]
    del d["primary_map"]
    old = NormalCalibration.from_dict(d)
    assert not old.thresholds_stored and old.primary_map is None
    assert old.threshold("alm", "spec95").value == cal.threshold("alm", "spec95").value


def test_operating_point_choices_and_decisions():
    cal = NormalCalibration(reducer="mean").fit(_maps(40, 0))
    p95, p99 = operating_point(cal, "alm", "spec95"), operating_point(cal, "alm", "spec99")
    assert p99.value >= p95.value and p95.reliable and not p99.reliable
    normals = np.array(cal.stats["alm"].normal_scores)
    assert is_abnormal(normals, p95).mean() <= 0.05
    value = operating_point(cal, "alm", "0.7")
    assert value.name == "value" and value.value == 0.7
    np.testing.assert_array_equal(is_abnormal(np.array([0.69, 0.7, 0.71]), value), [False, False, True])
    for bad in ("spec90", "abc", "nan"):
        with pytest.raises(MedvqError, match="threshold"):
            operating_point(cal, "alm", bad)


def test_primary_map_chosen_on_validation_abnormals_else_default():
    cal = NormalCalibration(reducer="mean").fit(_maps(30, 0))
    default = choose_primary(cal, "residual")
    assert default.name == "residual" and "no abnormal" in default.reason
    # abnormal scans stand out on alm only
    abnormal = cal.image_scores(cal.standardize({"residual": _maps(12, 1)["residual"], "alm": _maps(12, 1)["alm"] + 1.0}))
    choice = choose_primary(cal, "residual", abnormal, n_abnormal_patients=4)
    assert choice.name == "alm" and choice.validation_auroc["alm"] == 1.0
    assert "12 abnormal scans (4 patients)" in choice.reason and "unreliable" not in choice.reason
    few = choose_primary(cal, "residual", {k: v[:3] for k, v in abnormal.items()}, 2)
    assert few.name == "alm" and "unreliable" in few.reason


def test_annotated_overlay_has_colour_bar_outline_and_caption():
    from medvq.report.figures import annotated_overlay, colorize

    h, w = 120, 200
    image = np.full((h, w), 0.3)
    heat = np.zeros((h, w))
    heat[40:80, 60:120] = 5.0  # a planted lesion above the threshold
    out = annotated_overlay(image, heat, 0.0, 6.0, ["scan.jpeg", "ABNORMAL"], threshold=2.5, contour=True)
    text = max(11, round(h / 32))
    bar_w = max(12, w // 40)
    assert out.shape[1] == w + bar_w + 5 * text + 8 and out.shape[0] > h + 2 * text  # scan, bar and labels; caption strip below
    np.testing.assert_array_equal(out[0, w + 4 + bar_w // 2], colorize(np.array([[6.0]]), 0.0, 6.0, "jet")[0, 0])  # top of the bar: vmax
    np.testing.assert_array_equal(out[h - 1, w + 4 + bar_w // 2], colorize(np.array([[0.0]]), 0.0, 6.0, "jet")[0, 0])  # bottom: vmin
    assert (out[40, 60:120] == 255).all() and (out[60, 60] == 255).all()  # white outline on the lesion's border
    assert not (out[60, 90] == 255).all() and not (out[10, 10] == 255).all()  # not inside it, not on the background
    caption = out[h + 2 :, :w]
    assert (caption.min(axis=2) < 100).any()  # dark text in the caption strip
    plain = annotated_overlay(image, heat, 0.0, 6.0, ["scan.jpeg"], threshold=2.5, contour=False)
    assert not (plain[40, 60:120] == 255).all()


def test_overlay_colours_and_outline_match_matplotlib_and_scipy():
    from matplotlib import colormaps
    from scipy import ndimage

    from medvq.report.figures import _cross_step, colorize, overlay

    rng = np.random.default_rng(0)
    heat = (rng.standard_normal((40, 50)) * 3).astype(np.float32)
    heat[0, :4] = [0.0, 6.0, 1e9, -1e9]  # both limits and beyond them
    image = rng.random((40, 50)).astype(np.float32)
    scaled = np.clip(heat / 6.0, 0, 1)
    for cmap in ("jet", "inferno"):
        expected = (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
        np.testing.assert_array_equal(colorize(heat, 0.0, 6.0, cmap), expected)
        colour = expected.astype(np.float32) / 255
        weight = 0.5 * scaled[..., None]
        blended = (((1 - weight) * image[..., None] + weight * colour).clip(0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(overlay(image, heat, 0.0, 6.0, cmap=cmap), blended)
    for mask in (rng.random((9, 12)) < 0.7, rng.random((1, 6)) < 0.5, heat > 1.0):
        np.testing.assert_array_equal(_cross_step(mask, erode=True), ndimage.binary_erosion(mask))
        np.testing.assert_array_equal(_cross_step(mask, erode=False), ndimage.binary_dilation(mask))


def test_overlay_png_decodes_to_the_same_pixels():
    import io

    from PIL import Image

    from medvq.report.figures import encode_png

    rng = np.random.default_rng(0)
    for rgb in (rng.integers(0, 256, (7, 5, 3), dtype=np.uint8), np.zeros((1, 1, 3), np.uint8), np.full((3, 300, 3), 255, np.uint8)):
        with Image.open(io.BytesIO(encode_png(rgb))) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), rgb)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint8))
