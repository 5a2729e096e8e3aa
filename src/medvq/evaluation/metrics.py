"""Anomaly-detection metrics as plain numpy functions.

Image level (one score per image, ``labels`` 0/1 with 1 = abnormal):
:func:`image_auroc`, :func:`image_auprc`, :func:`sensitivity_at_specificity`,
:func:`roc_points`, :func:`grouped_auroc`.

Pixel level (anomaly maps against ground-truth masks, shape ``(N, H, W)``):
:func:`pixel_auroc`, :func:`aupro`, :func:`best_dice`, and :func:`reduce_map`
to turn maps into image scores (``medvq.scoring.reduce``, where calibration uses it).

Every function accepts numpy arrays, torch tensors (any device; they are detached
and copied to the CPU) or nested lists, never modifies its inputs, and raises
``ValueError`` with a message naming the problem for bad inputs (shape mismatch,
a single class, NaN/inf scores, ...).

Pixel-level conventions:

* A pixel is predicted abnormal at threshold ``t`` when ``map >= t``.
* ``valid`` (optional bool, same shape as the masks) restricts which pixels
  count; pixels where it is False are ignored entirely, and may hold NaN in the map.
* Maps of shape ``(H, W)`` are treated as one image, ``(N, 1, H, W)`` is squeezed
  to ``(N, H, W)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from medvq.scoring.reduce import as_mask, check_finite, reduce_map, to_numpy

__all__ = [
    "image_auroc",
    "image_auprc",
    "sensitivity_at_specificity",
    "roc_points",
    "pixel_auroc",
    "aupro",
    "best_dice",
    "reduce_map",
    "grouped_auroc",
    "pointing_game",
    "bootstrap_auroc_interval",
    "bootstrap_pixel_auroc_interval",
]


# --------------------------------------------------------------------------- helpers


def _as_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """1-D int array of 0/1 labels."""
    y = to_numpy(labels, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per image), got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty")
    return as_mask(y, name, "0 (normal) and 1 (abnormal)").astype(np.int64)


def _as_scores(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    """1-D finite float64 array of length n."""
    s = to_numpy(scores, name)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per image), got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"shape mismatch: {n} labels but {s.shape[0]} {name}")
    if s.dtype == bool or not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"{name} must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    check_finite(s, name)
    return s


def _require_both_classes(y: np.ndarray, what: str = "labels") -> None:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "abnormal (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"only one class present in {what}: all {y.size} are {present}; "
            "the metric needs both normal and abnormal examples"
        )


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _require_both_classes(y)
    return y, s


def _to_nhw(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 2:
        return a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) (or (H, W) / (N, 1, H, W)), got {a.shape}")
    return a


def _pixel_inputs(
    masks: Any, maps: Any, valid: Any | None, *, need_both: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (masks bool, maps float64, valid bool), all of shape (N, H, W).

    Maps only need to be finite where ``valid`` is True.
    """
    m = _to_nhw(as_mask(masks, "masks"), "masks")
    a = to_numpy(maps, "maps")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"maps must be real numbers, got dtype {a.dtype}")
    a = _to_nhw(a, "maps").astype(np.float64)
    if a.shape != m.shape:
        raise ValueError(f"shape mismatch: masks {m.shape} vs maps {a.shape}")
    if valid is None:
        v = np.ones(m.shape, dtype=bool)
    else:
        v = _to_nhw(as_mask(valid, "valid"), "valid")
        if v.shape != m.shape:
            raise ValueError(f"shape mismatch: masks {m.shape} vs valid {v.shape}")
        if not v.any():
            raise ValueError("valid is False everywhere: no pixel left to evaluate")
    check_finite(a[v], "maps", " at valid pixels")
    if need_both:
        y = m[v]
        n_pos = int(y.sum())
        if n_pos == 0:
            raise ValueError(
                "only one class present in masks: no abnormal (True) pixel among the valid pixels"
            )
        if n_pos == y.size:
            raise ValueError(
                "only one class present in masks: every valid pixel is abnormal, none is normal"
            )
    return m, a, v


def _count_at_or_above(thresholds: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None,
                       strict: bool = False) -> np.ndarray:
    """For sorted ascending ``thresholds``, the (weighted) number of ``values`` >= each threshold
    (``> `` when ``strict``). One searchsorted + bincount, O(len(values) * log(len(thresholds)))."""
    m = thresholds.size
    # number of thresholds t with t <= v (non-strict) or t < v (strict)
    idx = np.searchsorted(thresholds, values, side="left" if strict else "right")
    hist = np.bincount(idx, weights=weights, minlength=m + 1)
    tail = np.cumsum(hist[::-1])[::-1]  # tail[j] = sum(hist[j:])
    return tail[1:]  # value counts for threshold j iff idx > j


# --------------------------------------------------------------------------- image level


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores (labels 1 = abnormal = positive); ties count 1/2."""
    y, s = _image_inputs(labels, scores)
    return float(roc_auc_score(y, s))


def image_auprc(labels: Any, scores: Any) -> float:
    """Average precision (area under the precision-recall curve, step-wise) with abnormal = positive.

    Uses sklearn's ``average_precision_score`` (no interpolation); chance level is the abnormal fraction.
    """
    y, s = _image_inputs(labels, scores)
    return float(average_precision_score(y, s))


def sensitivity_at_specificity(labels: Any, scores: Any, specificity: float = 0.95) -> float:
    """Largest sensitivity (TPR) reachable at a threshold whose specificity (TNR) is >= ``specificity``.

    The threshold is chosen on these same data (an optimistic, in-sample operating point); images are
    called abnormal when ``score >= threshold``.
    """
    specificity = float(specificity)
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    y, s = _image_inputs(labels, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    allowed = fpr <= (1.0 - specificity) + 1e-12  # tolerance for 1 - 0.95 != 0.05 in floating point
    return float(tpr[allowed].max())  # the first ROC point (fpr 0, tpr 0) is always allowed


def roc_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` for plotting, starting at (0, 0) and ending at (1, 1)."""
    y, s = _image_inputs(labels, scores)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def grouped_auroc(labels: Any, scores: Any, groups: Any, min_per_class: int = 2) -> dict[str, float]:
    """AUROC computed separately within each group (e.g. original image width or scanner).

    Keys are ``str(group value)``, in sorted group order. Groups with fewer than ``min_per_class``
    normal or fewer than ``min_per_class`` abnormal images are omitted (an empty dict if none qualifies).
    """
    if int(min_per_class) < 1:
        raise ValueError(f"min_per_class must be >= 1, got {min_per_class}")
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    g = to_numpy(groups, "groups")
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D (one group per image), got shape {g.shape}")
    if g.shape[0] != y.size:
        raise ValueError(f"shape mismatch: {y.size} labels but {g.shape[0]} groups")
    try:
        values, inverse = np.unique(g, return_inverse=True)
    except TypeError as exc:
        raise ValueError(f"groups values cannot be compared/sorted: {exc}") from exc
    inverse = inverse.reshape(-1)
    out: dict[str, float] = {}
    for k, value in enumerate(values.tolist()):
        sel = inverse == k
        yk = y[sel]
        n_pos = int(yk.sum())
        if n_pos < min_per_class or yk.size - n_pos < min_per_class:
            continue
        out[str(value)] = float(roc_auc_score(yk, s[sel]))
    return out


def _weighted_aurocs(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under each row of image weights (B, N) at once (Mann-Whitney, ties 1/2); NaN where a row
    leaves no normal or no abnormal weight."""
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted, w = s[order], y[order], weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # groups of tied scores
    pos = np.add.reduceat(w * y_sorted, starts, axis=1)  # (B, G) abnormal weight per tie group
    neg = np.add.reduceat(w * (1 - y_sorted), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # normal weight strictly below each group
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def _group_resamples(groups: np.ndarray, n: int, n_resamples: int, confidence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's group index (n,) and how often each group is drawn in each resample (B, G): whole
    groups drawn with replacement, as many draws as there are groups."""
    if groups.shape != (n,):
        raise ValueError(f"groups must be 1-D with one entry per image ({n}), got shape {groups.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    _, group = np.unique(groups.astype(str), return_inverse=True)
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1
    return group, np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=int(n_resamples))


def _percentile_interval(aurocs: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of resampled AUROCs; resamples without both classes (NaN) are dropped."""
    aurocs = aurocs[np.isfinite(aurocs)]
    if aurocs.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(aurocs, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_auroc_interval(
    labels: Any, scores: Any, groups: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the image AUROC, resampling whole groups (patients) with replacement.

    Scans of one patient are not independent, so resampling images would give intervals that are too
    narrow; a patient drawn k times counts each of their scans k times. Resamples without both classes are
    dropped. Pass one group per image (e.g. ``np.arange(n)``) to resample images instead.
    """
    y, s = _image_inputs(labels, scores)
    patient, counts = _group_resamples(to_numpy(groups, "groups"), y.size, n_resamples, confidence, seed)
    return _percentile_interval(_weighted_aurocs(y, s, counts[:, patient]), confidence)


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(
    masks: Any,
    maps: Any,
    valid: Any | None = None,
    max_pixels: int | None = 2_000_000,
    seed: int = 0,
) -> float:
    """Pixel-wise AUROC of anomaly ``maps`` (N, H, W) against boolean ``masks`` over valid pixels.

    When more than ``max_pixels`` valid pixels exist, the AUROC is computed on a seeded random
    subsample of ``max_pixels`` pixels drawn without replacement, stratified by class: normal and
    abnormal pixels are each sampled uniformly, in proportion to their counts (at least one of each).
    AUROC does not depend on the class ratio, so this is an unbiased estimate whose sampling error
    shrinks roughly like 1/sqrt(number of sampled abnormal pixels) (about 0.002 with 20,000 of them).
    The same ``seed`` gives the same subsample. ``max_pixels=None`` always uses every pixel.
    """
    m, a, v = _pixel_inputs(masks, maps, valid)
    y = m[v]
    s = a[v]
    idx = _pixel_subsample(y, max_pixels, seed)
    if idx is not None:
        y, s = y[idx], s[idx]
    return _auroc_by_ranks(y, s)


def _pixel_subsample(y: np.ndarray, max_pixels: int | None, seed: int) -> np.ndarray | None:
    """Indices of a seeded subsample of ``max_pixels`` pixels stratified by class (see :func:`pixel_auroc`);
    None when every pixel is used."""
    n = y.size
    if max_pixels is None:
        return None
    max_pixels = int(max_pixels)
    if max_pixels < 2:
        raise ValueError(f"max_pixels must be >= 2 or None, got {max_pixels}")
    if n <= max_pixels:
        return None
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    k_pos = int(round(max_pixels * pos.size / n))
    k_pos = min(max(k_pos, 1), pos.size, max_pixels - 1)
    k_neg = min(max_pixels - k_pos, neg.size)
    return np.concatenate([rng.choice(pos, size=k_pos, replace=False), rng.choice(neg, size=k_neg, replace=False)])


def bootstrap_pixel_auroc_interval(
    masks: Any,
    maps: Any,
    groups: Any,
    valid: Any | None = None,
    max_pixels: int | None = 2_000_000,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`pixel_auroc`, resampling whole groups of images (``groups``:
    one entry per image, e.g. its patient; ``np.arange(N)`` resamples images) with replacement.

    Pixels of one image, and images of one patient, are far from independent, so pixels are never
    resampled one by one. Exact and cheap at any pixel count: the normal-abnormal pixel pairs each group
    pair wins (ties 1/2) are counted once, a (G, G) table, and a resample drawing group g c_g times has
    AUROC c' W c / ((c . abnormal) (c . normal)). The pixels are the same (subsampled) ones
    :func:`pixel_auroc` uses with this ``max_pixels`` and ``seed``. Resamples without both classes are dropped.
    """
    m, a, v = _pixel_inputs(masks, maps, valid)
    image, counts = _group_resamples(to_numpy(groups, "groups"), m.shape[0], n_resamples, confidence, seed)
    y, s = m[v], a[v]
    pixel_group = np.broadcast_to(image[:, None, None], m.shape)[v]
    keep = _pixel_subsample(y, max_pixels, seed)
    if keep is not None:
        y, s, pixel_group = y[keep], s[keep], pixel_group[keep]
    return _percentile_interval(_group_pair_aurocs(counts, *_group_pair_wins(y, s, pixel_group, counts.shape[1])), confidence)


def _group_pair_wins(y: np.ndarray, s: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels with labels ``y``, scores ``s`` and group indices: (G, G) ``wins[i, j]``, the pairs (abnormal
    pixel of group i, normal pixel of group j) the abnormal one scores above (ties 1/2), and the abnormal
    and normal pixel counts per group."""
    abnormal = np.bincount(group[y], minlength=n_groups).astype(np.float64)
    normal = np.bincount(group[~y], minlength=n_groups).astype(np.float64)
    wins = np.zeros((n_groups, n_groups))
    pos_s, pos_g = s[y], group[y]
    neg_s, neg_g = s[~y], group[~y]
    order = np.lexsort((neg_s, neg_g))  # normal pixels by group, each group's scores ascending
    neg_s, bounds = neg_s[order], np.searchsorted(neg_g[order], np.arange(n_groups + 1))
    for j in np.flatnonzero(normal):
        neg = neg_s[bounds[j] : bounds[j + 1]]
        below, up_to = np.searchsorted(neg, pos_s, side="left"), np.searchsorted(neg, pos_s, side="right")
        wins[:, j] = np.bincount(pos_g, weights=below + 0.5 * (up_to - below), minlength=n_groups)
    return wins, abnormal, normal


def _group_pair_aurocs(counts: np.ndarray, wins: np.ndarray, abnormal: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """AUROC of each resample (a row of ``counts``: how often each group is drawn); NaN without both classes."""
    c = counts.astype(np.float64)
    won = np.einsum("bi,ij,bj->b", c, wins, c)
    total = (c @ abnormal) * (c @ normal)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, won / np.where(total > 0, total, 1.0), np.nan)


def _auroc_by_ranks(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic with mid-ranks for ties (identical to sklearn's
    trapezoidal ROC AUC, about twice as fast on millions of pixels)."""
    ranks = rankdata(s)  # average ranks, float64
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (float(n_pos) * n_neg))


def _pro_regions(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Label ground-truth regions (8-connectivity within each image).

    Returns (region id per valid abnormal pixel (0-based, compacted), region sizes in valid pixels,
    number of regions). Regions are found on the full mask; only their valid pixels count.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected in-plane, never across images
    labels, n_labels = ndimage.label(m, structure=structure)
    region_of_pixel = labels[m & v]  # 1..n_labels
    sizes = np.bincount(region_of_pixel, minlength=n_labels + 1)
    keep = sizes > 0
    keep[0] = False  # background
    compact = np.cumsum(keep) - 1  # old label -> new 0-based id (only meaningful where keep)
    return compact[region_of_pixel], sizes[keep], int(keep.sum())


def _pro_curve(
    m: np.ndarray, a: np.ndarray, v: np.ndarray, fpr_limit: float, num_thresholds: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) operating points sorted by decreasing threshold, from (0, 0) to past ``fpr_limit``."""
    region_id, sizes, n_regions = _pro_regions(m, v)
    if n_regions == 0:
        raise ValueError("masks contain no abnormal region among the valid pixels; AUPRO needs at least one")
    normal = a[~m & v]
    n_normal = normal.size
    if n_normal == 0:
        raise ValueError("masks leave no normal (False) valid pixel; AUPRO needs normal pixels for the FPR")
    region_vals = a[m & v]
    weights = 1.0 / (sizes[region_id] * n_regions)  # each region weighs 1/n_regions in total

    # Thresholds: the k-th largest normal values, k on an even grid from 0 (max -> FPR ~ 0) to the first
    # index whose FPR exceeds fpr_limit, so the curve is sampled evenly in FPR over [0, fpr_limit] and
    # the crossing at fpr_limit can be interpolated. num_thresholds=None: every such k (exact curve).
    k_max = min(math.ceil(fpr_limit * n_normal), n_normal - 1)
    if num_thresholds is None or num_thresholds >= k_max + 1:
        ks = np.arange(k_max + 1)
    else:
        ks = np.unique(np.round(np.linspace(0, k_max, num_thresholds)).astype(np.int64))
    asc_idx = n_normal - 1 - ks  # positions in ascending order
    if ks.size == k_max + 1 and k_max + 1 > 64:
        picked = np.sort(np.partition(normal, asc_idx[-1])[asc_idx[-1]:])  # the top k_max+1 values
        thresholds = np.unique(picked)
    else:
        thresholds = np.unique(np.partition(normal, asc_idx)[asc_idx])

    # Two exact operating points per threshold t: "map > t" and "map >= t". Between them lie only
    # pixels equal to t (ties), joined by a straight line as in the MVTec AD reference; points at
    # "> t" also capture the vertical rise from regions whose values fall between two thresholds.
    fpr_ge = _count_at_or_above(thresholds, normal) / n_normal
    fpr_gt = _count_at_or_above(thresholds, normal, strict=True) / n_normal
    pro_ge = _count_at_or_above(thresholds, region_vals, weights)
    pro_gt = _count_at_or_above(thresholds, region_vals, weights, strict=True)

    # order by decreasing threshold: (gt, ge) of the largest threshold first
    fpr = np.empty(2 * thresholds.size + 1)
    pro = np.empty_like(fpr)
    fpr[0] = pro[0] = 0.0  # threshold above every value
    fpr[1::2], fpr[2::2] = fpr_gt[::-1], fpr_ge[::-1]
    pro[1::2], pro[2::2] = pro_gt[::-1], pro_ge[::-1]
    # guard against 1 + 1e-16 style rounding of the weight sums
    np.clip(pro, 0.0, 1.0, out=pro)
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x non-decreasing) from x[0] to ``x_max``,
    interpolating the curve exactly at ``x_max``. Vertical steps (repeated x) are allowed."""
    inside = np.flatnonzero(x <= x_max)
    last = inside[-1]  # x is non-decreasing so ``inside`` is a prefix
    xs, ys = x[: last + 1], y[: last + 1]
    if xs[-1] < x_max and last + 1 < x.size:
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs = np.append(xs, x_max)
        ys = np.append(ys, y_at)
    return float(np.trapezoid(ys, xs))


def aupro(
    masks: Any,
    maps: Any,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = 200,
    valid: Any | None = None,
) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit`` (Bergmann et al.,
    MVTec AD, IJCV 2021).

    Regions are the 8-connected components of each image's ground-truth mask. At each threshold, PRO
    is the mean over ALL regions (of all images, each weighing the same regardless of size) of the
    fraction of the region's pixels with ``map >= threshold``; FPR is the fraction of normal pixels
    (mask False) of all images at or above it. Only ``valid`` pixels count (a region's size is its
    number of valid pixels; regions with none are dropped). The PRO-vs-FPR curve, with ties joined
    linearly, is integrated by the trapezoid rule from FPR 0 to ``fpr_limit`` (interpolated at the
    limit) and divided by ``fpr_limit``: a perfect map gives 1.0, a constant map ``fpr_limit / 2``.

    The curve is sampled at ``num_thresholds`` normal-pixel quantiles evenly spaced in FPR over
    [0, fpr_limit] (two exact operating points each, "> t" and ">= t"); the sampling error is at most
    about ``1 / num_thresholds``, typically far less. ``num_thresholds=None`` uses every normal value
    (the exact curve). Fully vectorised: a few sorts/searchsorted over the pixels.
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and int(num_thresholds) < 2:
        raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
    m, a, v = _pixel_inputs(masks, maps, valid, need_both=False)
    fpr, pro = _pro_curve(m, a, v, fpr_limit, None if num_thresholds is None else int(num_thresholds))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def best_dice(
    masks: Any, maps: Any, num_thresholds: int | None = 100, valid: Any | None = None
) -> tuple[float, float]:
    """Best Dice over one global threshold, pooled over all valid pixels of all images.

    Dice at threshold ``t`` is ``2 TP / (#(map >= t) + #abnormal)`` computed on all pixels together.
    The optimum always lies at the map value of some abnormal pixel, so candidate thresholds are
    ``num_thresholds`` quantiles of the abnormal pixels' values (data values, min and max included);
    ``num_thresholds=None`` tries every distinct abnormal value (exact optimum). Returns
    ``(dice, threshold)``; this is an optimistic, in-sample upper bound ("best possible Dice").
    """
    if num_thresholds is not None and int(num_thresholds) < 1:
        raise ValueError(f"num_thresholds must be >= 1 or None, got {num_thresholds}")
    m, a, v = _pixel_inputs(masks, maps, valid, need_both=False)
    pos_vals = a[m & v]
    if pos_vals.size == 0:
        raise ValueError("masks contain no abnormal (True) pixel among the valid pixels; Dice is undefined")
    all_vals = a[v]
    if num_thresholds is None:
        thresholds = np.unique(pos_vals)
    else:
        q = np.linspace(0.0, 1.0, int(num_thresholds))
        thresholds = np.unique(np.quantile(pos_vals, q, method="inverted_cdf"))
    tp = _count_at_or_above(thresholds, pos_vals)
    predicted = _count_at_or_above(thresholds, all_vals)
    dice = 2.0 * tp / (predicted + pos_vals.size)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def pointing_game(masks: Any, maps: Any, valid: Any | None = None, tolerance: float = 0.0) -> float:
    """Pointing game (Zhang et al. 2016): share of images with a lesion whose map peak lies on it.

    The peak is the first maximum of the map over valid pixels; it is a hit when a lesion pixel lies within
    ``tolerance`` pixels (Euclidean) of it. Images without lesion pixels are skipped; NaN if none has any.
    """
    if float(tolerance) < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    m, a, v = _pixel_inputs(masks, maps, valid, need_both=False)
    hits, n = 0, 0
    for mi, ai, vi in zip(m, a, v):
        lesion = mi & vi
        if not lesion.any():
            continue
        n += 1
        peak = np.unravel_index(int(np.argmax(np.where(vi, ai, -np.inf))), ai.shape)
        if tolerance == 0:
            hits += bool(lesion[peak])
        else:
            rows, cols = np.nonzero(lesion)
            hits += bool(((rows - peak[0]) ** 2 + (cols - peak[1]) ** 2).min() <= float(tolerance) ** 2)
    return hits / n if n else float("nan")


