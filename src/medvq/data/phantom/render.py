"""One scan: anatomy, lesions, speckle and padding, with the pixel-exact mask of what the lesions changed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medvq.data.phantom.anatomy import _anatomy, _Anatomy, _field, _ramp
from medvq.data.phantom.config import CLASSES, PhantomConfig
from medvq.data.phantom.lesions import _LESIONS, _Gap, _loguniform


# --------------------------------------------------------------------------- rendering


@dataclass
class _Rendered:
    image: np.ndarray  # uint8 (H, W)
    mask: np.ndarray  # bool (H, W)
    label: np.ndarray  # uint8 (H, W), material map (LABEL_*), 0 where padding
    padding: np.ndarray  # bool (H, W)


def _padding(rng: np.random.Generator, an: _Anatomy, cfg: PhantomConfig) -> np.ndarray:
    h, w = an.h, an.w
    pad = np.zeros((h, w), bool)
    if rng.random() >= cfg.padding_probability:
        return pad
    x = np.arange(w) / max(w - 1, 1)
    yy = np.arange(h)[:, None]
    top_room = float(np.min(an.b("ilm"))) - 0.16 * h
    bottom_room = h - float(np.max(an.b("bm"))) - 0.8 * an.choroid_thickness
    for _ in range(1 + int(rng.random() < 0.3)):
        where = int(rng.choice(4, p=[0.45, 0.35, 0.1, 0.1]))
        a, b2 = rng.uniform(0.3, 1.0), rng.uniform(0.0, 1.0)
        if rng.random() < 0.5:
            a, b2 = b2, a
        if rng.random() < 0.6:  # a wedge from one corner rather than a slanted bar
            a, b2 = (a * 0.1, b2) if a < b2 else (a, b2 * 0.1)
        curve = rng.uniform(-0.3, 0.3) if rng.random() < 0.3 else 0.0
        shape = np.clip(a + (b2 - a) * x + 4 * curve * x * (1 - x), 0.0, 1.0)
        if where == 0 and top_room < 3:
            where = 1
        if where == 1 and bottom_room < 3:
            where = 2 + int(rng.random() < 0.5)
        if where == 0:
            pad |= yy < shape[None, :] * top_room
        elif where == 1:
            pad |= yy >= h - shape[None, :] * bottom_room
        else:
            width = max(1, int(round(rng.uniform(0.003, 0.02) * w)))
            if where == 2:
                pad[:, :width] = True
            else:
                pad[:, w - width :] = True
    return pad


def _render(kind: str, rng: np.random.Generator, config: PhantomConfig, *, lesions: bool = True) -> _Rendered:
    """Draw one scan; with ``lesions=False`` the same scan (same draws) without its lesions."""
    if kind not in CLASSES:
        raise ValueError(f"kind must be one of {', '.join(CLASSES)}; got {kind!r}")
    cfg = config
    an = _anatomy(rng, cfg)
    h, w = an.h, an.w

    # Instrument: multiplicative speckle plus an additive noise floor, sharing one
    # correlated field (grain ~2 px at native scale; weaker on smaller images).
    z = _field(rng, (h, w), (max(0.5, 0.85 * an.sy), max(0.5, 0.7 * an.sx)))
    shrink = min(1.0, math.sqrt(3.0 * an.sy * an.sx))
    mult = np.float32(cfg.speckle * shrink * rng.uniform(0.75, 1.25))
    add = np.float32(cfg.noise_floor * shrink * _loguniform(rng, 0.5, 2.0))
    pad = _padding(rng, an, cfg)
    gaps = _LESIONS[kind](rng, an, cfg)

    yy = np.arange(h, dtype=np.float32)[:, None]
    clean = an.base(np.broadcast_to(yy, (h, w)), 0, w, row0=0)
    value = clean
    mask = np.zeros((h, w), bool)
    label = np.zeros((h, w), np.uint8)
    if lesions and gaps:
        value, mask, label = _apply_lesions(an, gaps, clean, cfg.mask_min_shift)

    # The additive part dominates where the signal is near the floor (log display).
    yy_full = np.broadcast_to(yy, (h, w))
    add_map = add * (1.0 - 0.65 * an.deepness(yy_full, 0, w)) * np.exp((an.floor - value) / np.float32(18.0))
    img = value + (np.minimum(add_map, add) + mult * value) * z
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img[pad] = 255
    mask &= ~pad
    label[pad] = 0
    return _Rendered(image=img, mask=mask, label=label, padding=pad)


def _apply_lesions(an: _Anatomy, gaps: list[_Gap], clean: np.ndarray, min_shift: float):
    h, w = an.h, an.w
    c0 = min(g.c0 for g in gaps)
    c1 = max(g.c1 for g in gaps)
    r0 = max(0, int(math.floor(min(g.rows()[0] for g in gaps))))
    rg = min(h, int(math.ceil(max(g.rows()[1] for g in gaps))))  # below rg nothing moves
    r0 = min(r0, rg - 1)
    r1 = h if any(g.shadow is not None for g in gaps) else rg
    y = np.broadcast_to(np.arange(r0, rg, dtype=np.float32)[:, None], (rg - r0, c1 - c0)).copy()
    acc = np.zeros_like(y)
    trans = np.ones_like(y)
    label = np.zeros((r1 - r0, c1 - c0), np.uint8)
    # Composite the lesions front to back: the last inserted is evaluated first.
    for g in reversed(gaps):
        s = slice(g.c0 - c0, g.c1 - c0)
        src, alpha, val, lab = g.apply(y[:, s])
        acc[:, s] += trans[:, s] * alpha * val
        lb = label[: rg - r0, s]
        label[: rg - r0, s] = np.where((lb == 0) & (alpha >= 0.5) & (trans[:, s] >= 0.5), lab, lb)
        trans[:, s] *= 1.0 - alpha
        y[:, s] = src
    rows = np.arange(r0, rg, dtype=np.float32)[:, None]
    # Footprint: lesion material, tissue moved by >= min_shift px, shadowed tissue.
    ilm = an.bounds32[0, c0:c1][None] - 1.0
    moved = (np.abs(y - rows) >= min_shift) & ((y >= ilm) | (rows >= ilm))
    gate = np.zeros((r1 - r0, c1 - c0), bool)
    gate[: rg - r0] = moved | (trans <= 0.98)
    les = np.empty((r1 - r0, c1 - c0), np.float32)
    les[: rg - r0] = acc + trans * an.base(y, c0, c1)
    les[rg - r0 :] = clean[rg:r1, c0:c1]
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]
    for g in gaps:
        if g.shadow is None:
            continue
        # Shadow: the tissue signal below the lesion is attenuated, fading with depth;
        # shadows weaker than 10 % are not counted (and not drawn).
        s = slice(g.c0 - c0, g.c1 - c0)
        depth = rows - g.shadow_from[None]
        strength = g.shadow[None] * _ramp(depth) * np.exp(-np.maximum(depth, 0.0) / (0.8 * an.choroid_thickness))
        strength = np.where(strength >= 0.1, strength, 0.0).astype(np.float32)
        ref = an.floor_at(np.broadcast_to(rows, (r1 - r0, g.c1 - g.c0)), g.c0, g.c1, row0=r0)
        les[:, s] = ref + (les[:, s] - ref) * (1.0 - strength)
        gate[:, s] |= strength > 0
    ref = clean[r0:r1, c0:c1]
    m = gate & (np.abs(les - ref) > 0.5)
    m = ndi.binary_fill_holes(m)
    value = clean.copy()
    value[r0:r1, c0:c1] = np.where(m, les, ref)
    mask = np.zeros((h, w), bool)
    mask[r0:r1, c0:c1] = m
    full_label = np.zeros((h, w), np.uint8)
    full_label[r0:r1, c0:c1] = np.where(m, label, 0)
    return value, mask, full_label


def make_scan(
    kind: str, rng: np.random.Generator, config: PhantomConfig = PhantomConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 HxW, lesion mask bool HxW) for one phantom B-scan of class ``kind``."""
    r = _render(kind, rng, config)
    return r.image, r.mask

