import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvq.evaluation.metrics import _weighted_aurocs, bootstrap_auroc_interval


def test_weighted_auroc_equals_sklearn_with_repeated_images():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.normal(size=40) + y, 1)  # ties included
    w = rng.integers(0, 3, size=(5, 40))
    for row in w:
        keep = np.repeat(np.arange(40), row)
        expected = roc_auc_score(y[keep], s[keep]) if len(set(y[keep])) == 2 else np.nan
        np.testing.assert_allclose(_weighted_aurocs(y, s, row[None])[0], expected)


def _clustered(seed=0, patients=6, scans=12):
    """Each patient's scans score almost the same: the patient, not the scan, is the unit of evidence."""
    rng = np.random.default_rng(seed)
    y, s, g = [], [], []
    for label in (0, 1):
        for p in range(patients):
            level = rng.normal(0.8 * label)  # patient effect: the classes overlap at the patient level
            y += [label] * scans
            s += list(level + 0.01 * rng.normal(size=scans))
            g += [f"{label}-{p}"] * scans
    return np.array(y), np.array(s), np.array(g)


def test_patient_bootstrap_is_wider_than_image_bootstrap_on_clustered_scans():
    y, s, g = _clustered()
    auc = roc_auc_score(y, s)
    lo_p, hi_p = bootstrap_auroc_interval(y, s, g, seed=1)
    lo_i, hi_i = bootstrap_auroc_interval(y, s, np.arange(y.size), seed=1)
    assert lo_p <= auc <= hi_p and lo_i <= auc <= hi_i
    assert hi_p - lo_p > 2 * (hi_i - lo_i)  # 12 patients, not 144 independent scans
    # how often does each interval cover the AUROC of the population these patients come from?
    truth = np.mean([roc_auc_score(*_clustered(seed=1000 + k, patients=200, scans=1)[:2]) for k in range(3)])
    covered_p = covered_i = 0
    for seed in range(40):
        y, s, g = _clustered(seed=seed)
        lo, hi = bootstrap_auroc_interval(y, s, g, n_resamples=300)
        covered_p += lo <= truth <= hi
        lo, hi = bootstrap_auroc_interval(y, s, np.arange(y.size), n_resamples=300)
        covered_i += lo <= truth <= hi
    assert covered_p >= 30 and covered_i < covered_p - 10  # image resampling misses the truth far more often


def test_bootstrap_is_seeded_and_checks_its_inputs():
    y, s, g = _clustered()
    assert bootstrap_auroc_interval(y, s, g, seed=3) == bootstrap_auroc_interval(y, s, g, seed=3)
    with pytest.raises(ValueError, match="one entry per image"):
        bootstrap_auroc_interval(y, s, g[:-1])
    with pytest.raises(ValueError, match="only one class"):
        bootstrap_auroc_interval(np.zeros(5, int), np.arange(5.0), np.arange(5))


def test_group_pair_aurocs_equal_sklearn_on_repeated_pixels():
    from medvq.evaluation.metrics import _group_pair_aurocs, _group_pair_wins

    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)  # ties included
    group = rng.integers(0, 7, 300)
    counts = rng.integers(0, 3, size=(6, 7))
    aurocs = _group_pair_aurocs(counts, *_group_pair_wins(y, s, group, 7))
    for row, auc in zip(counts, aurocs):
        keep = np.repeat(np.arange(300), row[group])  # every pixel of a group drawn k times, k times
        expected = roc_auc_score(y[keep], s[keep]) if 0 < y[keep].sum() < keep.size else np.nan
        np.testing.assert_allclose(auc, expected)


def _clustered_maps(patients=6, scans=5, seed=0):
    """Lesion scans whose lesions stand out more or less by patient; one patient's scans are near copies."""
    rng = np.random.default_rng(seed)
    masks, maps, groups = [], [], []
    for p in range(2 * patients):
        lesion = p >= patients
        contrast = rng.normal(1.0, 0.8)  # the patient effect
        base = rng.normal(size=(16, 16))
        for _ in range(scans):
            m = np.zeros((16, 16), bool)
            if lesion:
                m[4:10, 4:10] = True
            maps.append(base + 0.05 * rng.normal(size=(16, 16)) + contrast * m)
            masks.append(m)
            groups.append(p)
    return np.array(masks), np.array(maps), np.array(groups)


def test_pixel_bootstrap_by_patient_is_wider_than_by_image_and_holds_the_pixel_auroc():
    from medvq.evaluation.metrics import bootstrap_pixel_auroc_interval, pixel_auroc

    masks, maps, groups = _clustered_maps()
    auc = pixel_auroc(masks, maps)
    lo_p, hi_p = bootstrap_pixel_auroc_interval(masks, maps, groups)
    lo_i, hi_i = bootstrap_pixel_auroc_interval(masks, maps, np.arange(len(groups)))
    assert lo_p <= auc <= hi_p and lo_i <= auc <= hi_i
    assert hi_p - lo_p > 1.8 * (hi_i - lo_i)  # 12 patients, not 60 independent scans
    separated = np.where(masks, 5.0, 0.0) + 0.1 * np.random.default_rng(1).random(masks.shape)
    assert bootstrap_pixel_auroc_interval(masks, separated, groups) == (1.0, 1.0)
    with pytest.raises(ValueError, match="one entry per image"):
        bootstrap_pixel_auroc_interval(masks, maps, groups[:-1])


def test_evaluation_resamples_patients_for_the_pixel_auroc_and_scans_without_patient_ids():
    from medvq.evaluation.evaluate import BOOTSTRAP_RESAMPLES, compute_metrics
    from medvq.evaluation.metrics import bootstrap_pixel_auroc_interval

    masks, maps, groups = _clustered_maps(patients=3, scans=2)
    labels = ["CNV" if m.any() else "NORMAL" for m in masks]
    scores = {"s": maps.reshape(len(maps), -1).max(axis=1)}
    patients = np.array([f"P{g}" for g in groups])
    for given, unit, resampled in ((patients, "patient", groups), (np.full(len(groups), ""), "image", np.arange(len(groups)))):
        m = compute_metrics(labels, scores, "NORMAL", masks=masks, maps={"s": maps}, patients=given, pixel_patients=given)["s"]
        assert m["pixel_auroc_ci_by"] == unit
        assert m["pixel_auroc_ci"] == list(bootstrap_pixel_auroc_interval(masks, maps, resampled, n_resamples=BOOTSTRAP_RESAMPLES))
