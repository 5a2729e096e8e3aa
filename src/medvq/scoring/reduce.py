"""Image scores from anomaly maps (:func:`reduce_map`), and the input checks that the metrics share.

Every function accepts numpy arrays, torch tensors (any device; detached and copied to the CPU) or nested
lists, never modifies its inputs, and raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or (nested) list to a numpy array (no copy of numpy input)."""
    if x is None:
        raise ValueError(f"{name} is None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # e.g. bfloat16 has no numpy dtype
            return t.float().numpy()
    try:
        arr = np.asarray(x)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name} cannot be converted to an array: {exc}") from exc
    return arr


def check_finite(values: np.ndarray, name: str, where: str = "") -> None:
    finite = np.isfinite(values)
    if not finite.all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int((~finite).sum()) - n_nan
        parts = []
        if n_nan:
            parts.append(f"{n_nan} NaN")
        if n_inf:
            parts.append(f"{n_inf} infinite")
        raise ValueError(f"{name} contain {' and '.join(parts)} value(s){where}; all scores must be finite")


def as_mask(x: Any, name: str, values: str = "0 and 1") -> np.ndarray:
    """A bool array from bools or the numbers 0 and 1 (``values`` names them in the error)."""
    m = to_numpy(x, name)
    if m.dtype == bool:
        return m
    if not np.issubdtype(m.dtype, np.number):
        raise ValueError(f"{name} must be bool or 0/1, got dtype {m.dtype}")
    bad = ~np.isin(m, (0, 1))
    if bad.any():
        examples = np.unique(m[bad])[:5].tolist()
        raise ValueError(f"{name} must be bool or contain only {values}, found {examples}")
    return m.astype(bool)


def reduce_map(
    maps: Any, how: str = "topk", topk_fraction: float = 0.01, valid: Any | None = None
) -> np.ndarray:
    """Image scores (float64, shape (N,)) from anomaly maps (N, H, W) or (N, ...).

    ``how``: ``"mean"`` or ``"max"`` of the valid pixels, or ``"topk"``: the mean of the largest
    ``ceil(topk_fraction * n_valid)`` valid pixels of each image (at least one). Pixels where ``valid``
    is False never count (and may be NaN); every image needs at least one valid pixel.
    """
    if how not in ("mean", "max", "topk"):
        raise ValueError(f"how must be 'mean', 'max' or 'topk', got {how!r}")
    a = to_numpy(maps, "maps")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"maps must be real numbers, got dtype {a.dtype}")
    if a.ndim < 2:
        raise ValueError(f"maps must have shape (N, H, W) or (N, ...), got {a.shape}")
    n = a.shape[0]
    flat = a.reshape(n, -1).astype(np.float64)  # astype copies: the input is never touched
    if valid is None:
        vf = np.ones(flat.shape, dtype=bool)
    else:
        v = as_mask(valid, "valid")
        if v.shape != a.shape:
            raise ValueError(f"shape mismatch: maps {a.shape} vs valid {v.shape}")
        vf = v.reshape(n, -1)
    n_valid = vf.sum(axis=1)
    if (n_valid == 0).any():
        empty = np.flatnonzero(n_valid == 0)[:5].tolist()
        raise ValueError(f"image(s) {empty} have no valid pixel; cannot reduce their maps")
    check_finite(flat[vf], "maps", " at valid pixels")
    if how == "mean":
        return np.where(vf, flat, 0.0).sum(axis=1) / n_valid
    if how == "max":
        return np.where(vf, flat, -np.inf).max(axis=1)
    topk_fraction = float(topk_fraction)
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    k = np.maximum(1, np.ceil(topk_fraction * n_valid - 1e-9)).astype(np.int64)
    k = np.minimum(k, n_valid)
    kmax = int(k.max())
    neg = np.where(vf, -flat, np.inf)  # ascending order of neg = valid values descending, invalid last
    if kmax < neg.shape[1]:  # only the kmax largest need sorting
        neg = np.partition(neg, kmax - 1, axis=1)[:, :kmax]
    csum = np.cumsum(-np.sort(neg, axis=1)[:, :kmax], axis=1)
    return csum[np.arange(n), k - 1] / k
