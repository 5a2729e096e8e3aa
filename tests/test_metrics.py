"""Tests for medvq.evaluation.metrics: known cases, hand-computed values and a slow reference AUPRO."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from medvq.evaluation.metrics import (
    aupro,
    best_dice,
    grouped_auroc,
    image_auprc,
    image_auroc,
    pixel_auroc,
    reduce_map,
    roc_points,
    sensitivity_at_specificity,
)

# --------------------------------------------------------------------------- helpers


def blob_masks(n: int, h: int, w: int, seed: int, level: float = 0.9) -> np.ndarray:
    """Random smooth blobs: several connected regions per image."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 2, 2))
    field /= field.std()
    return field > level


def reference_aupro(masks, maps, fpr_limit=0.3, valid=None) -> float:
    """Slow, obviously-correct AUPRO: every distinct value is a threshold, loops everywhere."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=float)
    valid = np.ones_like(masks) if valid is None else np.asarray(valid, dtype=bool)
    regions = []  # list of arrays of map values, one per region
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            vals = maps[i][(lab == r) & valid[i]]
            if vals.size:
                regions.append(vals)
    normal = maps[~masks & valid]
    thresholds = [np.inf] + sorted(set(maps[valid].tolist()), reverse=True)
    fprs, pros = [], []
    for t in thresholds:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# --------------------------------------------------------------------------- image level


def test_image_auroc_known_cases():
    y = [0, 0, 1, 1]
    assert image_auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    # hand: pairs (pos, neg): (0.35>0.1) yes, (0.35>0.4) no, (0.8>0.1) yes, (0.8>0.4) yes -> 3/4
    assert image_auroc(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auprc_hand_computed():
    # ranked: 0.8 (abn) P=1 R=1/2; 0.4 (norm); 0.35 (abn) P=2/3 R=1 -> AP = 1/2*1 + 1/2*2/3
    assert image_auprc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)
    assert image_auprc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)


def test_sensitivity_at_specificity_hand_worked():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.8, 0.95]
    # spec 1.0: threshold above 0.9 -> only 0.95 found -> 1/4
    assert sensitivity_at_specificity(labels, scores, 1.0) == pytest.approx(0.25)
    # spec >= 0.8 still forbids the one false positive (0.9) -> 1/4
    assert sensitivity_at_specificity(labels, scores, 0.8) == pytest.approx(0.25)
    # spec 0.75 allows the normal 0.9 above threshold: threshold 0.4 -> all abnormal found
    assert sensitivity_at_specificity(labels, scores, 0.75) == pytest.approx(1.0)
    assert sensitivity_at_specificity(labels, scores, 0.0) == pytest.approx(1.0)


def test_sensitivity_at_default_95_specificity_float_boundary():
    # 20 normals: exactly one false positive allowed (specificity 19/20 = 0.95, despite 1-0.95 != 0.05)
    labels = [0] * 20 + [1] * 4
    scores = list(np.arange(20) / 20) + [0.99, 0.5, 0.96, 0.2]  # top normal is 0.95
    assert sensitivity_at_specificity(labels, scores) == pytest.approx(0.5)  # 0.99, 0.96 are >= 0.95


def test_roc_points():
    fpr, tpr = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_grouped_auroc_skips_groups_without_both_classes():
    labels = [0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0]
    scores = [0.1, 0.2, 0.8, 0.9, 0.3, 0.4, 0.5, 0.6, 0.9, 0.1, 0.2, 0.9, 0.1, 0.2, 0.8, 0.9]
    groups = [512] * 4 + [768] * 4 + [1024] * 4 + [256] * 4
    out = grouped_auroc(labels, scores, groups)
    # 768: no abnormal; 1024: a single abnormal (< 2) -> omitted; 256: inverted
    assert out == {"256": 0.0, "512": 1.0}
    assert list(out) == ["256", "512"]
    out1 = grouped_auroc(labels, scores, groups, min_per_class=1)
    assert set(out1) == {"256", "512", "1024"}
    assert out1["1024"] == pytest.approx(2.5 / 3)  # abnormal 0.9 beats 0.1, 0.2 and ties 0.9
    assert grouped_auroc(labels, scores, ["a"] * 16) == {"a": pytest.approx(image_auroc(labels, scores))}
    assert grouped_auroc([0, 0, 0], [1, 2, 3], [1, 1, 2]) == {}


def test_torch_and_list_inputs_match_numpy_and_are_not_mutated():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.3, 0.7, 0.4, 0.2, 0.9, 0.1], dtype=np.float32)
    y0, s0 = y.copy(), s.copy()
    expected = image_auroc(y, s)
    assert image_auroc(torch.tensor(y), torch.tensor(s, requires_grad=True)) == expected
    assert image_auroc(y.tolist(), s.tolist()) == pytest.approx(expected)
    assert image_auroc(torch.tensor(y).bool(), torch.tensor(s).to(torch.bfloat16)) == pytest.approx(expected)
    assert np.array_equal(y, y0) and np.array_equal(s, s0)

    masks = blob_masks(3, 16, 16, seed=1)
    maps = np.random.default_rng(1).random(masks.shape)
    valid = np.ones_like(masks)
    valid[:, :2] = False
    copies = [masks.copy(), maps.copy(), valid.copy()]
    tm, tp, tv = torch.from_numpy(masks), torch.from_numpy(maps), torch.from_numpy(valid)
    assert aupro(tm, tp, valid=tv) == pytest.approx(aupro(masks, maps, valid=valid))
    assert pixel_auroc(tm, tp, valid=tv) == pytest.approx(pixel_auroc(masks, maps, valid=valid))
    assert best_dice(tm, tp, valid=tv) == pytest.approx(best_dice(masks, maps, valid=valid))
    np.testing.assert_allclose(reduce_map(tp, valid=tv), reduce_map(maps, valid=valid))
    for f in (aupro, pixel_auroc, best_dice):
        f(masks, maps, valid=valid)
    reduce_map(maps, valid=valid)
    for before, after in zip(copies, [masks, maps, valid]):
        assert np.array_equal(before, after)


# --------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_perfect_and_noise():
    masks = blob_masks(20, 64, 64, seed=2)
    assert 0.02 < masks.mean() < 0.5
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks) == 0.0
    noise = np.random.default_rng(3).random(masks.shape)
    assert pixel_auroc(masks, noise) == pytest.approx(0.5, abs=0.02)


def test_pixel_auroc_valid_excludes_pixels():
    masks = blob_masks(4, 32, 32, seed=4)
    maps = masks.astype(float)
    valid = np.ones_like(masks)
    valid[:, :, :8] = False
    maps[:, :, :8] = np.where(masks[:, :, :8], -1.0, 5.0)  # wrong everywhere outside valid
    maps[:, :, :4] = np.nan  # NaN outside valid is allowed
    assert pixel_auroc(masks, maps, valid=valid) == 1.0


def test_pixel_auroc_subsample_seeded_and_close():
    masks = blob_masks(10, 32, 32, seed=5)
    maps = masks + np.random.default_rng(6).normal(scale=1.0, size=masks.shape)
    full = pixel_auroc(masks, maps, max_pixels=None)
    a = pixel_auroc(masks, maps, max_pixels=3000, seed=1)
    assert a == pixel_auroc(masks, maps, max_pixels=3000, seed=1)
    assert a != pixel_auroc(masks, maps, max_pixels=3000, seed=2)
    assert a == pytest.approx(full, abs=0.03)
    # rare positives still get sampled (stratified), so no single-class failure
    rare = np.zeros((1, 100, 100), dtype=bool)
    rare[0, 50, 50:53] = True
    assert pixel_auroc(rare, rare.astype(float), max_pixels=100) == 1.0


# --------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_map():
    masks = blob_masks(5, 32, 32, seed=7)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, masks.astype(float), fpr_limit=0.05) == pytest.approx(1.0)


def test_aupro_one_region_found_one_missed_is_half():
    rng = np.random.default_rng(8)
    maps = rng.uniform(0.2, 0.8, size=(2, 20, 20))
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:4, 2:4] = True  # small region (4 px): ranked above every normal pixel
    masks[1, 5:15, 5:15] = True  # large region (100 px): ranked below every normal pixel
    maps[0, 2:4, 2:4] = 1.0
    maps[1, 5:15, 5:15] = 0.0
    # PRO averages regions, not pixels: 0.5 for every FPR in (0, 1)
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-9)
    assert pixel_auroc(masks, maps) == pytest.approx(4 / 104, abs=1e-9)  # pixel-weighted, for contrast


def test_aupro_constant_map():
    # A constant map has just two operating points: nothing flagged (FPR 0, PRO 0) and everything
    # flagged (1, 1); the tie is joined by a straight line, PRO = FPR, so the area up to L is L^2/2
    # and the normalised AUPRO is L/2.
    masks = blob_masks(4, 24, 24, seed=9)
    const = np.full(masks.shape, 0.7)
    assert aupro(masks, const) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, const, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_matches_slow_reference_on_random_case():
    rng = np.random.default_rng(10)
    masks = blob_masks(4, 20, 20, seed=10)
    maps = ndimage.gaussian_filter(masks.astype(float), (0, 1, 1)) + 0.8 * rng.random(masks.shape)
    for m in (maps, np.round(maps, 2)):  # distinct values, then plenty of ties
        for limit in (0.3, 0.05, 1.0):
            ref = reference_aupro(masks, m, fpr_limit=limit)
            assert 0.2 < ref < 0.99
            assert aupro(masks, m, fpr_limit=limit) == pytest.approx(ref, abs=1e-2)
            # every normal value as threshold: the exact curve
            assert aupro(masks, m, fpr_limit=limit, num_thresholds=None) == pytest.approx(ref, abs=1e-9)
    maps = np.round(maps, 2)
    # same with a valid mask cutting through regions, NaN outside valid
    valid = np.ones_like(masks)
    valid[:, :, 7:10] = False
    maps_nan = maps.copy()
    maps_nan[~valid] = np.nan
    ref = reference_aupro(masks, maps, valid=valid)
    assert aupro(masks, maps_nan, valid=valid, num_thresholds=None) == pytest.approx(ref, abs=1e-9)
    assert aupro(masks, maps_nan, valid=valid) == pytest.approx(ref, abs=1e-2)


def test_aupro_regions_are_8_connected_per_image():
    # two diagonal pixels form ONE region (8-connectivity); identical positions in two images are two
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    masks[1, 1, 1] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1] = 1.0  # half of the diagonal region
    maps[1, 1, 1] = 1.0  # all of image 1's region
    maps[0, 2, 2] = 0.0
    # PRO = (1/2 + 1)/2 = 0.75 for every FPR in (0, 1)
    assert aupro(masks, maps) == pytest.approx(0.75, abs=1e-9)


def test_aupro_on_200_maps_of_128_rises_with_the_signal():
    rng = np.random.default_rng(11)
    masks = blob_masks(200, 128, 128, seed=11, level=1.2)
    noise = rng.normal(scale=0.8, size=masks.shape)
    weak, strong = aupro(masks, (0.5 * masks + noise).astype(np.float32)), aupro(masks, (masks + noise).astype(np.float32))
    assert 0.0 < weak < strong < 1.0


# --------------------------------------------------------------------------- Dice


def test_best_dice_of_mask_is_one():
    masks = blob_masks(3, 32, 32, seed=12)
    dice, thr = best_dice(masks, masks.astype(float))
    assert dice == pytest.approx(1.0)
    assert thr == 1.0


def test_best_dice_partial_overlap_squares():
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 2:6, 2:6] = True  # 16 px
    maps = np.zeros((1, 10, 10))
    maps[0, 2:6, 4:8] = 1.0  # 16 px, 8 overlap -> Dice 2*8/(16+16)
    dice, thr = best_dice(masks, maps)
    assert dice == pytest.approx(0.5)
    assert thr == 1.0


def test_best_dice_graded_map_hand_computed():
    masks = np.array([[[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0, 0, 0, 0]]])
    # thresholds 0.9: 2*1/(1+4)=0.4; 0.8: 2*2/(3+4); 0.3: 2*3/(4+4); 0.2: 2*4/(5+4)=8/9
    assert best_dice(masks, maps) == pytest.approx((8 / 9, 0.2))
    assert best_dice(masks, maps, num_thresholds=None) == pytest.approx((8 / 9, 0.2))
    valid = np.ones_like(masks)
    valid[0, 0, 4] = False  # drop the false positive 0.85
    assert best_dice(masks, maps, valid=valid) == pytest.approx((1.0, 0.2))
    # pooled over images, not averaged per image
    two = np.concatenate([masks, masks])
    assert best_dice(two, np.concatenate([maps, maps]))[0] == pytest.approx(8 / 9)


# --------------------------------------------------------------------------- reduce_map


def test_reduce_map_hand_example_with_valid():
    maps = np.array(
        [
            [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
            [[6.0, 0.0, 0.0], [0.0, 0.0, np.nan]],
        ]
    )
    valid = np.ones(maps.shape, dtype=bool)
    valid[1, 1, 2] = False  # the NaN never counts
    np.testing.assert_allclose(reduce_map(maps, "mean", valid=valid), [3.5, 1.2])
    np.testing.assert_allclose(reduce_map(maps, "max", valid=valid), [6.0, 6.0])
    # ceil(0.34*6)=3 -> (6+5+4)/3 ; ceil(0.34*5)=2 -> (6+0)/2
    np.testing.assert_allclose(reduce_map(maps, "topk", 0.34, valid=valid), [5.0, 3.0])
    np.testing.assert_allclose(reduce_map(maps, "topk", 0.01, valid=valid), [6.0, 6.0])  # >= 1 pixel
    np.testing.assert_allclose(reduce_map(maps, "topk", 1.0, valid=valid), [3.5, 1.2])
    # an invalid maximum must be ignored
    valid2 = valid.copy()
    valid2[0, 1, 2] = False
    np.testing.assert_allclose(reduce_map(maps, "max", valid=valid2), [5.0, 6.0])
    np.testing.assert_allclose(reduce_map(maps[:1], "topk", 0.4, valid=valid2[:1]), [4.5])  # ceil(2.0)=2


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), "shape mismatch"),
        (lambda: image_auroc([1, 1, 1], [0.1, 0.2, 0.3]), "only one class"),
        (lambda: image_auprc([0, 0], [0.1, 0.2]), "only one class"),
        (lambda: image_auroc([0, 1, 1], [0.1, np.nan, 0.3]), "NaN"),
        (lambda: image_auroc([0, 1, 2], [0.1, 0.2, 0.3]), "only 0 (normal) and 1"),
        (lambda: image_auroc([[0, 1]], [[0.1, 0.2]]), "1-D"),
        (lambda: sensitivity_at_specificity([0, 1], [0.1, 0.2], 1.5), "specificity"),
        (lambda: grouped_auroc([0, 1], [0.1, 0.2], [1]), "shape mismatch"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5))), "shape mismatch"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))), "only one class"),
        (lambda: pixel_auroc(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4))), "only one class"),
        (lambda: pixel_auroc(np.eye(4)[None], np.full((1, 4, 4), np.nan)), "NaN"),
        (lambda: pixel_auroc(np.eye(4)[None], np.eye(4)[None], valid=np.ones((1, 4, 3), bool)), "valid"),
        (lambda: aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))), "no abnormal region"),
        (lambda: aupro(np.eye(4)[None], np.eye(4)[None], fpr_limit=0.0), "fpr_limit"),
        (lambda: aupro(np.eye(4)[None], np.eye(4)[None, :3]), "shape mismatch"),
        (lambda: best_dice(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))), "no abnormal"),
        (lambda: reduce_map(np.zeros((2, 3, 3)), how="median"), "how must be"),
        (lambda: reduce_map(np.zeros((2, 3, 3)), valid=np.zeros((2, 3, 3), bool)), "no valid pixel"),
        (lambda: reduce_map(np.full((2, 3, 3), np.inf)), "infinite"),
        (lambda: reduce_map(np.zeros((2, 3, 3)), "topk", topk_fraction=0.0), "topk_fraction"),
    ],
)
def test_bad_inputs_raise_informative_value_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
