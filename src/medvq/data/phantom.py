"""Synthetic retinal OCT B-scans with pixel-exact lesion masks.

The phantom imitates Kermany OCT2017 B-scans (log-compressed, 8-bit): a curved,
layered retina with a foveal pit, vessel shadows, choroid texture, speckle and
white registration padding. Lesions (drusen, diabetic macular oedema cysts,
choroidal neovascularisation with subretinal fluid) are drawn by inserting
material into the tissue and displacing the layers around it.

The mask of a scan is the set of pixels the lesion changed: the lesion material
(drusen, cysts, fluid, fibrovascular tissue), the retina it pushed aside by at
least ``PhantomConfig.mask_min_shift`` pixels, and the tissue it shadows. Outside
the mask the scan is bit-identical to the same scan drawn without lesions (same
speckle, same padding); padding is never lesion.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from medvq.config import PhantomConfig

__all__ = ["CLASSES", "PhantomConfig", "make_scan", "write_phantom"]

CLASSES: tuple[str, ...] = ("NORMAL", "CNV", "DME", "DRUSEN")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Reference geometry: all sizes below are fractions of a 496 x 512 scan.
_REF_H, _REF_W = 496, 512

# Labels of the internal material map (used by tests and diagnostics).
LABEL_NONE, LABEL_FLUID, LABEL_DRUSEN, LABEL_CNV, LABEL_FOCUS = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------- helpers


def _smooth1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random curve of length n."""
    z = ndi.gaussian_filter1d(rng.standard_normal(n), max(sigma, 0.5), mode="reflect")
    return (z - z.mean()) / (z.std() + 1e-9)


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Unit-variance smooth Gaussian random field (float32), Gaussian-filtered white noise."""
    z = rng.standard_normal(shape, dtype=np.float32)
    norm = 1.0
    for axis, s in enumerate(sigma):
        if s > 0.05:
            r = max(1, int(2.5 * s + 0.5))
            k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
            k /= k.sum()
            z = ndi.correlate1d(z, k.astype(np.float32), axis=axis, mode="reflect")
            norm *= float(np.sqrt(np.sum(k**2)))
    z *= np.float32(1.0 / norm)
    return z


def _ramp(t: np.ndarray) -> np.ndarray:
    """Soft unit step with a one-pixel linear edge (box-filtered boundary)."""
    return np.clip(t + 0.5, 0.0, 1.0)


@dataclass
class _Tex:
    """A texture covering image rows r0.. and columns x0.. (clamped outside, rows only)."""

    data: np.ndarray
    r0: int
    x0: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator, rows: tuple[float, float], cols: tuple[int, int],
             sigma: tuple[float, float]) -> "_Tex":
        r0, r1 = int(math.floor(rows[0])), int(math.ceil(rows[1])) + 2
        return cls(_field(rng, (max(r1 - r0, 2), max(cols[1] - cols[0], 1)), sigma), r0, cols[0])

    def rows(self, a: int, b: int, c0: int, c1: int) -> np.ndarray:
        """Texture at integer image rows a..b-1."""
        n = self.data.shape[0]
        c0, c1 = c0 - self.x0, c1 - self.x0
        if a - self.r0 >= 0 and b - self.r0 <= n:
            return self.data[a - self.r0 : b - self.r0, c0:c1]
        idx = np.clip(np.arange(a, b) - self.r0, 0, n - 1)
        return self.data[idx, c0:c1]

    def sample(self, y: np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Texture at fractional image rows y (shape (h, c1-c0)), linear in y."""
        n = self.data.shape[0]
        yc = np.clip(y - self.r0, 0.0, n - 1.001)
        i = yc.astype(np.intp)
        f = yc - i
        cols = np.arange(c0 - self.x0, c1 - self.x0)[None, :]
        return self.data[i, cols] * (1.0 - f) + self.data[i + 1, cols] * f


def _row_span(y: np.ndarray, lo: float, hi: float, row0: int | None) -> tuple[int, int]:
    """Rows of y (monotonic down each column) that may hold values in [lo, hi]."""
    n = y.shape[0]
    if row0 is not None:
        a = int(np.clip(math.floor(lo) - row0, 0, n)) if math.isfinite(lo) else 0
        b = int(np.clip(math.ceil(hi) - row0 + 1, 0, n)) if math.isfinite(hi) else n
        return a, max(a, b)
    a = int(np.searchsorted(y.max(axis=1), lo, side="left")) if math.isfinite(lo) else 0
    b = int(np.searchsorted(y.min(axis=1), hi, side="right")) if math.isfinite(hi) else n
    return a, max(a, b)


# --------------------------------------------------------------------------- anatomy


# Layer boundaries from the inner limiting membrane down to Bruch's membrane.
_BOUNDARIES = ("ilm", "gcl", "ipl", "inl", "opl", "onl", "elm", "is", "ez", "iz", "rpe", "bm")
# Intensity (grey levels above the noise floor) of the layer *below* each boundary.
_LAYER_LEVEL = {
    "ilm": 108.0,  # nerve fibre layer
    "gcl": 60.0,  # ganglion cell layer
    "ipl": 70.0,  # inner plexiform layer
    "inl": 44.0,  # inner nuclear layer
    "opl": 62.0,  # outer plexiform layer
    "onl": 30.0,  # outer nuclear layer
    "elm": 50.0,  # external limiting membrane
    "is": 34.0,  # inner segments
    "ez": 145.0,  # ellipsoid zone
    "iz": 100.0,  # interdigitation zone
    "rpe": 182.0,  # retinal pigment epithelium
    "bm": 0.0,  # below Bruch's membrane: the choroid term takes over
}


@dataclass
class _Anatomy:
    h: int
    w: int
    sy: float
    sx: float
    edge: float
    floor: float
    gain: np.ndarray  # (W,) per-column gain
    bounds: np.ndarray  # (K, W) boundary rows
    dlevel: np.ndarray  # (K, W) intensity step at each boundary
    tex_retina: _Tex
    tex_lumen_small: _Tex
    tex_lumen_large: _Tex
    choroid_thickness: float
    choroid_level: float
    choroid_decay: float
    deep_level: float
    deep_decay: float
    streaks: np.ndarray  # (W,)
    deep_start: np.ndarray  # (W,) row where the deep (post-choroid) region begins
    deep_drop: float  # fraction by which the floor falls deep below the choroid
    vessels: list[tuple[float, float, float, float, float]]  # x, y, r, shadow, brightness
    fovea_x: float
    fovea_w: float

    def __post_init__(self) -> None:
        self.bounds32 = self.bounds.astype(np.float32)
        self.dlevel32 = self.dlevel.astype(np.float32)

    def b(self, name: str) -> np.ndarray:
        return self.bounds[_BOUNDARIES.index(name)]

    def base(self, y: np.ndarray, c0: int, c1: int, *, row0: int | None = None) -> np.ndarray:
        """Noise-free intensity (grey levels) at source rows y (h, c1-c0), monotonic down columns.

        ``row0`` says y is the integer row grid starting at row0 (fast path).
        """
        bounds = self.bounds32[:, c0:c1]
        dlev = self.dlevel32[:, c0:c1]
        inv_e = np.float32(1.0 / self.edge)
        f32 = np.float32
        v = np.zeros(y.shape, np.float32)

        def tex(t: _Tex, a: int, b: int) -> np.ndarray:
            return t.rows(row0 + a, row0 + b, c0, c1) if row0 is not None else t.sample(y[a:b], c0, c1)

        # Layered retina (zero above the ILM and below Bruch's membrane).
        a, b = _row_span(y, float(bounds[0].min()) - 2, float(bounds[-1].max()) + 2, row0)
        if b > a:
            ys = y[a:b]
            stack = np.zeros(ys.shape, np.float32)
            for k in range(bounds.shape[0]):
                stack += dlev[k] * _ramp((ys - bounds[k]) * inv_e)
            v[a:b] = stack * (1.0 + f32(0.1) * tex(self.tex_retina, a, b))
        # Choroid: stroma with vessel lumens that grow with depth, fading into the deep.
        bm = bounds[-1]
        ch = f32(self.choroid_thickness)
        a2, _ = _row_span(y, float(bm.min()) - 2, math.inf, row0)
        _, a3 = _row_span(y, -math.inf, float(bm.max() + ch) + 0.05 * self.h, row0)
        a3 = max(a3, a2)
        if a2 < y.shape[0]:
            d = y[a2:] - bm
            dpos = np.maximum(d, 0.0)
            stroma = f32(self.choroid_level) * np.exp(-dpos / f32(self.choroid_decay))
            if a3 > a2:
                dl = d[: a3 - a2]
                wdepth = np.clip(dl / ch, 0.0, 1.0)
                field = tex(self.tex_lumen_small, a2, a3) * (1.0 - wdepth) + tex(self.tex_lumen_large, a2, a3) * wdepth
                lumen = 1.0 / (1.0 + np.exp(f32(-3.0) * (field - f32(0.2))))
                cc = f32(0.012 * self.h)
                win = np.clip((dl - cc) / cc, 0.0, 1.0) * np.clip(1.0 - (dl - ch) / f32(0.05 * self.h), 0.0, 1.0)
                stroma[: a3 - a2] *= (1.0 - f32(0.68) * lumen * win) * (1.0 + f32(0.06) * field)
            deep = f32(self.deep_level) * np.exp(-dpos / f32(self.deep_decay)) * self.streaks[None, c0:c1]
            v[a2:] += (stroma + deep) * _ramp(d * inv_e)
        # Retinal vessels: bright dot in the inner retina, shadow below it.
        for xv, yv, r, shadow, bright in self.vessels:
            rx = r * self.sx / self.sy
            v0, v1 = max(c0, int(xv - 4 * rx) - 1), min(c1, int(xv + 4 * rx) + 2)
            if v0 >= v1:
                continue
            xs = np.arange(v0, v1, dtype=np.float32)[None, :] - f32(xv)
            yy = y[:, v0 - c0 : v1 - c0]
            prof = np.exp(-((xs / f32(1.3 * rx)) ** 2))
            att = 1.0 - f32(shadow) * prof * _ramp((yy - f32(yv)) / f32(r))
            dot = f32(bright) * np.exp(-((xs / f32(rx)) ** 2) - ((yy - f32(yv)) / f32(r)) ** 2)
            v[:, v0 - c0 : v1 - c0] = v[:, v0 - c0 : v1 - c0] * att + dot
        v *= self.gain[None, c0:c1]
        v += self.floor_at(y, c0, c1, row0=row0)
        return v

    def deepness(self, y: np.ndarray, c0: int, c1: int) -> np.ndarray:
        return np.clip((y - self.deep_start[None, c0:c1]) / np.float32(0.2 * self.h), 0.0, 1.0)

    def floor_at(self, y: np.ndarray, c0: int, c1: int, *, row0: int | None = None) -> np.ndarray:
        out = np.full(y.shape, self.floor, np.float32)
        a, _ = _row_span(y, float(self.deep_start[c0:c1].min()), math.inf, row0)
        if a < y.shape[0]:
            out[a:] -= np.float32(self.floor * self.deep_drop) * self.deepness(y[a:], c0, c1)
        return out


def _anatomy(rng: np.random.Generator, cfg: PhantomConfig) -> _Anatomy:
    h, w = cfg.height, cfg.width
    sy, sx = h / _REF_H, w / _REF_W
    x = np.arange(w, dtype=np.float64)
    u = (x - w / 2) / (w / 2)

    # Retinal pigment epithelium: depth, tilt, bowl curvature, gentle wobble.
    rpe = h * rng.uniform(0.42, 0.62) + h * float(np.clip(rng.normal(0.0, 0.07), -0.2, 0.2)) * u
    rpe -= h * rng.choice([rng.uniform(-0.02, 0.03), rng.uniform(0.03, 0.11)], p=[0.6, 0.4]) * (u**2 - 0.3)
    for _ in range(2):
        rpe += h * rng.uniform(0.0, 0.008) * np.sin(2 * np.pi * rng.uniform(0.3, 1.3) * u + rng.uniform(0, 2 * np.pi))
    rpe = 0.52 * h + 0.22 * h * np.tanh((rpe - 0.52 * h) / (0.22 * h))  # keep it in frame, smoothly

    # Foveal pit: position, width (asymmetric), depth, rim.
    xf = w * (0.5 + rng.uniform(-0.15, 0.15))
    wf = w * rng.uniform(0.065, 0.1)
    wl, wr = wf * rng.uniform(0.85, 1.15), wf * rng.uniform(0.85, 1.15)
    dx = x - xf
    wside = np.where(dx < 0, wl, wr)
    pit = np.exp(-0.5 * (dx / wside) ** 2)
    rim = np.exp(-0.5 * ((np.abs(dx) - 1.7 * wside) / (0.8 * wside)) ** 2)
    far = np.clip((np.abs(dx) - 2.5 * wside) / (0.6 * w), 0.0, 1.0)
    ti = h * rng.uniform(0.08, 0.1) * (1 - rng.uniform(0.72, 0.95) * pit) * (1 + rng.uniform(0.04, 0.18) * rim)
    ti *= 1 - 0.22 * far
    onl = h * rng.uniform(0.03, 0.045) * (1 + rng.uniform(0.15, 0.4) * pit)

    # Nerve fibre layer thickens towards the (random) nasal side.
    side = rng.choice([-1.0, 1.0])
    nfl_frac = rng.uniform(0.08, 0.14) + rng.uniform(0.1, 0.3) * np.clip(side * dx / (0.5 * w), 0.0, 1.0)
    nfl = ti * nfl_frac * (1 - 0.7 * pit)
    rest = ti - nfl
    fr = np.array([0.31, 0.25, 0.25, 0.19]) * rng.uniform(0.85, 1.15, 4)
    fr /= fr.sum()

    t_rpe, t_iz, t_ez, t_is, t_elm = (h * f * rng.uniform(0.85, 1.15) for f in (0.014, 0.01, 0.008, 0.014, 0.003))
    b = {}
    b["rpe"] = rpe
    b["bm"] = rpe + t_rpe
    b["iz"] = rpe - t_iz
    b["ez"] = b["iz"] - t_ez
    b["is"] = b["ez"] - t_is
    b["elm"] = b["is"] - t_elm
    b["onl"] = b["elm"] - onl
    b["opl"] = b["onl"] - rest * fr[3]
    b["inl"] = b["opl"] - rest * fr[2]
    b["ipl"] = b["inl"] - rest * fr[1]
    b["gcl"] = b["ipl"] - rest * fr[0]
    b["ilm"] = b["gcl"] - nfl
    bounds = np.stack([b[k] for k in _BOUNDARIES])

    # Layer intensities with per-scan jitter; NFL brightness varies along x.
    levels = np.array([_LAYER_LEVEL[k] for k in _BOUNDARIES]) * rng.uniform(0.85, 1.15, len(_BOUNDARIES))
    levels[-1] = 0.0
    lev = np.repeat(levels[:, None], w, axis=1)
    lev[0] *= 1 + 0.15 * _smooth1d(rng, w, 40 * sx)
    dlevel = np.diff(np.vstack([np.zeros((1, w)), lev]), axis=0)

    floor = rng.uniform(18.0, 34.0)
    gain = rng.uniform(0.95, 1.3) * (1 - rng.uniform(0.0, 0.25) * u**2) * (1 + 0.05 * _smooth1d(rng, w, 60 * sx))

    # Textures (image coordinates; they move with the tissue when displaced).
    ch = h * rng.uniform(0.09, 0.17)
    retina_rows = (float(b["ilm"].min()) - 3, float(b["bm"].max()) + 3)
    choroid_rows = (float(b["bm"].min()) - 0.08 * h, float(b["bm"].max() + 1.1 * ch + 0.05 * h))
    tex_retina = _Tex.draw(rng, retina_rows, (0, w), (0.8 * sy, 3.0 * sx))
    tex_ls = _Tex.draw(rng, choroid_rows, (0, w), (3.0 * sy, 4.5 * sx))
    tex_ll = _Tex.draw(rng, choroid_rows, (0, w), (6.0 * sy, 9.0 * sx))
    streaks = np.clip(1 + 0.35 * _smooth1d(rng, w, 1.5 * sx), 0.3, 2.0)

    choroid_level = rng.uniform(90.0, 125.0)
    choroid_decay = ch * rng.uniform(0.45, 0.75)
    deep_level = choroid_level * rng.uniform(0.08, 0.2)
    deep_decay = h * rng.uniform(0.06, 0.15)

    # Retinal vessels in the inner retina, away from the fovea.
    vessels = []
    for _ in range(int(rng.integers(2, 9))):
        xv = rng.uniform(0.02, 0.98) * w
        if abs(xv - xf) < 1.4 * wf:
            xv = xf + np.sign(xv - xf + 1e-6) * (1.4 * wf + abs(xv - xf))
        xv = float(np.clip(xv, 1, w - 2))
        xi = int(xv)
        yv = float(b["ilm"][xi] + rng.uniform(0.2, 0.55) * ti[xi])
        r = max(0.6, h * rng.uniform(0.003, 0.007))
        vessels.append((xv, yv, r, rng.uniform(0.15, 0.5), rng.uniform(30.0, 70.0)))

    return _Anatomy(
        h=h, w=w, sy=sy, sx=sx, edge=max(1.0, 1.1 * sy), floor=floor, gain=gain.astype(np.float32),
        bounds=bounds, dlevel=dlevel, tex_retina=tex_retina, tex_lumen_small=tex_ls, tex_lumen_large=tex_ll,
        choroid_thickness=ch, choroid_level=choroid_level, choroid_decay=choroid_decay,
        deep_level=deep_level, deep_decay=deep_decay, streaks=streaks.astype(np.float32),
        deep_start=(b["bm"] + 0.8 * ch).astype(np.float32), deep_drop=rng.uniform(0.45, 0.75),
        vessels=vessels, fovea_x=xf, fovea_w=wf,
    )


# --------------------------------------------------------------------------- lesions


@dataclass
class _Gap:
    """Material inserted at row y0 of columns c0:c1, displacing tissue around it.

    In the image, rows y0-up .. y0+down hold the material; tissue above is lifted
    by ``up`` at the gap, easing linearly to ``top`` at source row ``ytop`` (and
    staying ``top`` above it); tissue below is pushed down by ``down``, easing to
    zero at source row ``ybot``. Maps stay monotonic, so no tissue is lost.
    """

    c0: int
    c1: int
    y0: np.ndarray
    up: np.ndarray
    down: np.ndarray
    top: np.ndarray
    ytop: np.ndarray
    ybot: np.ndarray
    material: Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
    shadow: np.ndarray | None = None  # per-column attenuation of what lies below
    shadow_from: np.ndarray | None = None

    def fit(self, margin: float = 0.9) -> float:
        """Shrink the lesion as a whole until the tissue maps stay monotonic; return the factor."""
        room_up = margin * np.maximum(self.y0 - self.ytop, 0.0)
        room_dn = margin * np.maximum(self.ybot - self.y0, 0.0)
        need_up, need_dn = self.up - self.top, self.down
        f = 1.0
        if (need_up > 1e-9).any():
            f = min(f, float(np.min(np.where(need_up > 1e-9, room_up / np.maximum(need_up, 1e-9), np.inf))))
        if (need_dn > 1e-9).any():
            f = min(f, float(np.min(np.where(need_dn > 1e-9, room_dn / np.maximum(need_dn, 1e-9), np.inf))))
        f = max(f, 0.0)
        self.up, self.down, self.top = self.up * f, self.down * f, self.top * f
        # Guard against rounding: never more than the room.
        self.up = np.minimum(self.up, room_up / margin + self.top)
        self.down = np.minimum(self.down, room_dn / margin)
        return f

    def rows(self) -> tuple[float, float]:
        lo = float(np.min(self.ytop - self.top)) - 2
        hi = float(np.max(self.ybot)) + 2
        return lo, hi

    def apply(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Map image rows y (columns self.c0:self.c1) to the previous stage.

        Returns (source rows, material alpha, material value, material label).
        """
        y0, up, dn, top = self.y0[None], self.up[None], self.down[None], self.top[None]
        gtop, gbot = y0 - up, y0 + dn
        # Above the gap: lift eases from `up` (at the gap) to `top` (at ytop).
        ztop = (self.ytop - self.top)[None]
        span_up = np.maximum(gtop - ztop, 1e-6)
        t = np.clip((y - ztop) / span_up, 0.0, 1.0)
        above = y + top + (up - top) * t
        # Below the gap: push eases from `down` to 0 at ybot.
        span_dn = np.maximum(self.ybot[None] - gbot, 1e-6)
        t2 = np.clip((self.ybot[None] - y) / span_dn, 0.0, 1.0)
        below = y - dn * t2
        src = np.where(y < gtop, above, np.where(y > gbot, below, y0))
        alpha = np.clip(np.minimum(y - gtop, gbot - y) + 0.5, 0.0, 1.0)
        alpha = np.where(up + dn > 1e-3, alpha, 0.0)
        value, label = self.material(y, alpha, self.c0, self.c1)
        return src.astype(np.float32), alpha.astype(np.float32), value, label


def _bump(x: np.ndarray, xc: float, a: float, power: float) -> np.ndarray:
    r2 = ((x - xc) / a) ** 2
    return np.where(r2 < 1, np.clip(1 - r2, 0, 1) ** power, 0.0)


def _cols(xc: float, reach: float, w: int) -> tuple[int, int]:
    return max(0, int(math.floor(xc - reach)) - 1), min(w, int(math.ceil(xc + reach)) + 2)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _smooth_cols(v: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter1d(v, max(sigma, 0.5), mode="constant")


def _drusen(rng: np.random.Generator, an: _Anatomy, cfg: PhantomConfig) -> list[_Gap]:
    h, w = an.h, an.w
    gaps = []
    xc = an.fovea_x + rng.normal(0, 0.07 * w)
    for _ in range(int(rng.integers(1, 5))):
        s = _loguniform(rng, *cfg.lesion_size)
        x0 = float(np.clip(xc + rng.normal(0, 0.09 * w), 0.1 * w, 0.9 * w))
        a = max(2.0, w * rng.uniform(0.012, 0.035) * s)
        height = max(1.5, h * rng.uniform(0.01, 0.028) * s)
        power = rng.uniform(0.6, 1.2)
        level = rng.uniform(55.0, 95.0)
        c0, c1 = _cols(x0, a, w)
        x = np.arange(c0, c1, dtype=np.float64)
        bm = an.b("bm")[c0:c1]
        ytop = an.b("onl")[c0:c1] + 0.4 * (an.b("elm")[c0:c1] - an.b("onl")[c0:c1])
        up = height * _bump(x, x0, a, power)
        def material(y, alpha, m0, m1, bm=bm.astype(np.float32), level=level):
            t = an.tex_lumen_small.sample(y, m0, m1)
            val = level * (1 + 0.12 * t) + 45.0 * np.exp(-(((y - bm[None]) / max(1.0, 0.8 * an.sy)) ** 2))
            return an.floor + val * an.gain[None, m0:m1], np.full(y.shape, LABEL_DRUSEN, np.uint8)

        g = _Gap(c0, c1, y0=bm, up=up, down=np.zeros_like(up), top=np.zeros_like(up), ytop=ytop,
                 ybot=bm + 1.0, material=material)
        g.fit(0.7)
        gaps.append(g)
    return gaps


def _dme(rng: np.random.Generator, an: _Anatomy, cfg: PhantomConfig) -> list[_Gap]:
    w = an.w
    gaps = []
    n = int(rng.integers(1, 7))
    xm = float(np.clip(an.fovea_x + rng.normal(0, 0.06 * w), 0.12 * w, 0.88 * w))
    a_main = None
    kappa = rng.uniform(0.6, 0.95)
    for i in range(n):
        s = _loguniform(rng, *cfg.lesion_size)
        if i == 0:
            a = w * rng.uniform(0.012, 0.04) * s
            x0 = xm
            a_main = a
        else:
            a = w * rng.uniform(0.006, 0.022) * s
            x0 = float(np.clip(xm + rng.normal(0, 1.6 * a_main + 0.01 * w), 0.08 * w, 0.92 * w))
        a = max(a, 1.5)
        b = max(1.2, a * rng.uniform(0.7, 1.6) * an.sy / an.sx)
        xi = int(np.clip(x0, 0, w - 1))
        ilm_c, ybot_c = an.b("ilm")[xi], an.b("is")[xi]
        # Depth: between the inner nuclear layer and the middle of the outer nuclear layer,
        # then moved so that the cyst fits between the ILM and the photoreceptors.
        top_row = an.b("inl")[xi] + 0.3 * (an.b("opl")[xi] - an.b("inl")[xi])
        bot_row = an.b("onl")[xi] + 0.5 * (an.b("elm")[xi] - an.b("onl")[xi])
        yc = top_row + rng.uniform(0.0, 1.0) * max(bot_row - top_row, 0.0)
        b = min(b, max(1.0, (ybot_c - ilm_c) / 2.3))
        yc = float(np.clip(yc, ilm_c + 0.9 * b, ybot_c - 1.35 * b))
        level = rng.uniform(0.0, 8.0)
        swell = kappa * rng.uniform(0.9, 1.4)
        reach = 2.5 * a + 4
        c0, c1 = _cols(x0, reach, w)
        x = np.arange(c0, c1, dtype=np.float64)
        rpe = an.b("rpe")[c0:c1]
        y0 = yc + (rpe - an.b("rpe")[xi])
        prof = b * _bump(x, x0, a, 0.6)
        top = swell * _smooth_cols(prof, 0.5 * a)
        g = _Gap(c0, c1, y0=y0, up=prof, down=prof.copy(), top=top, ytop=an.b("ilm")[c0:c1],
                 ybot=an.b("is")[c0:c1], material=_flat_material(an, level, LABEL_FLUID))
        g.fit()
        gaps.append(g)
    # Hyper-reflective foci: tiny bright dots in the inner retina near the cysts.
    for _ in range(int(rng.integers(0, 6))):
        r = max(0.7, an.sy * rng.uniform(0.8, 2.0))
        x0 = float(np.clip(xm + rng.normal(0, 2.5 * a_main + 0.02 * w), 0.05 * w, 0.95 * w))
        xi = int(np.clip(x0, 0, w - 1))
        yc = an.b("gcl")[xi] + rng.uniform(0.2, 1.0) * (an.b("elm")[xi] - an.b("gcl")[xi])
        level = rng.uniform(110.0, 170.0)
        c0, c1 = _cols(x0, 3 * r * an.sx / an.sy + 2, w)
        x = np.arange(c0, c1, dtype=np.float64)
        prof = r * np.sqrt(_bump(x, x0, r * an.sx / an.sy, 1.0))
        g = _Gap(c0, c1, y0=yc + an.b("rpe")[c0:c1] - an.b("rpe")[xi], up=prof, down=prof.copy(),
                 top=0.5 * _smooth_cols(prof, r), ytop=an.b("ilm")[c0:c1], ybot=an.b("is")[c0:c1],
                 material=_flat_material(an, level, LABEL_FOCUS))
        g.fit()
        gaps.append(g)
    return gaps


def _flat_material(an: _Anatomy, level: float, label: int):
    def material(y, alpha, m0, m1):
        return (an.floor + level * an.gain[None, m0:m1] + np.zeros(y.shape, np.float32),
                np.full(y.shape, label, np.uint8))

    return material


def _cnv(rng: np.random.Generator, an: _Anatomy, cfg: PhantomConfig) -> list[_Gap]:
    """Pigment epithelial detachment, subretinal fluid and/or a fibrovascular lesion."""
    h, w = an.h, an.w
    has_ped, has_fluid, has_lesion = rng.random() < 0.35, rng.random() < 0.7, rng.random() < 0.6
    if not (has_ped or has_fluid or has_lesion):
        has_fluid = True
    xc = float(np.clip(an.fovea_x + rng.normal(0, 0.06 * w), 0.15 * w, 0.85 * w))
    s_p, s_f, s_l = (_loguniform(rng, *cfg.lesion_size) for _ in range(3))
    a_p = max(3.0, w * rng.uniform(0.04, 0.11) * s_p)
    h_p = max(2.0, h * rng.uniform(0.02, 0.1) * s_p)
    x_p = xc + rng.normal(0, 0.3 * a_p)
    fibro_ped = rng.random() < 0.5
    level_p = rng.uniform(50.0, 90.0) if fibro_ped else rng.uniform(5.0, 20.0)
    a_f = max(3.0, w * rng.uniform(0.035, 0.14) * s_f)
    h_f = max(1.5, h * rng.uniform(0.01, 0.06) * s_f)
    x_f = xc + rng.normal(0, 0.5 * a_f)
    a_l = max(2.5, w * rng.uniform(0.025, 0.08) * s_l)
    h_l = max(2.0, h * rng.uniform(0.015, 0.1) * s_l)
    x_l = xc + rng.normal(0, 0.3 * a_l)
    kappa = rng.uniform(0.6, 1.0)
    level_l = rng.uniform(90.0, 150.0)
    level_f = rng.uniform(0.0, 8.0)
    shadow_l, shadow_p = rng.uniform(0.45, 0.85), rng.uniform(0.2, 0.5)
    irregular = _smooth1d(rng, w, 4 * an.sx)
    reach = max(a_p if has_ped else 0, a_f if has_fluid else 0, a_l if has_lesion else 0)
    offset = max(abs(x_p - xc), abs(x_f - xc), abs(x_l - xc))
    c0, c1 = _cols(xc, 1.8 * reach + 3 * offset + 4, w)
    x = np.arange(c0, c1, dtype=np.float64)
    rpe, bm, ilm = (an.b(k)[c0:c1] for k in ("rpe", "bm", "ilm"))
    tallest = (h_p if has_ped else 0.0) + h_f + h_l
    tex = _Tex.draw(rng, (float(rpe.min()) - tallest - 2, float(bm.max()) + 2), (c0, c1), (3.0 * an.sy, 0.8 * an.sx))
    gaps = []

    # Pigment epithelial detachment: the RPE lifted off Bruch's membrane.
    hp = h_p * _bump(x, x_p, a_p, 0.5) if has_ped else np.zeros_like(x)
    if has_ped:
        tp = kappa * _smooth_cols(hp, 0.35 * a_p)
        label_p = LABEL_CNV if fibro_ped else LABEL_FLUID

        def ped_material(y, alpha, m0, m1):
            val = level_p * (1 + (0.2 if fibro_ped else 0.05) * tex.sample(y, m0, m1))
            return an.floor + val * an.gain[None, m0:m1], np.full(y.shape, label_p, np.uint8)

        ped = _Gap(c0, c1, y0=bm.copy(), up=hp, down=np.zeros_like(hp), top=tp, ytop=ilm, ybot=bm + 1.0,
                   material=ped_material, shadow=shadow_p * np.sqrt(np.clip(hp / h_p, 0, 1)), shadow_from=bm.copy())
        ped.fit(0.8)
        hp = ped.up
        gaps.append(ped)

    # Subretinal fluid and fibrovascular tissue between photoreceptors and RPE.
    hf = h_f * _bump(x, x_f, a_f, 1.4) if has_fluid else np.zeros_like(x)
    hl = h_l * _bump(x, x_l, a_l, 0.6) * (1 + 0.15 * irregular[c0:c1]) if has_lesion else np.zeros_like(x)
    hl = np.maximum(hl, 0.0)
    if has_fluid or has_lesion:
        rpe_now = rpe - hp  # the RPE as the detachment left it
        ilm_now = ilm - (gaps[0].top if gaps else 0.0)
        up = hf + hl
        top = kappa * _smooth_cols(up, 0.4 * reach)

        def material(y, alpha, m0, m1):
            in_lesion = _ramp(hl[None] - (rpe_now[None] - y))
            lv = level_l * (1 + 0.22 * tex.sample(y, m0, m1))
            val = in_lesion * lv + (1 - in_lesion) * level_f
            label = np.where(in_lesion >= 0.5, LABEL_CNV, LABEL_FLUID).astype(np.uint8)
            return an.floor + val * an.gain[None, m0:m1], label

        sh = shadow_l * np.sqrt(np.clip(hl / max(h_l, 1e-6), 0, 1)) if has_lesion else None
        g = _Gap(c0, c1, y0=rpe_now, up=up, down=np.zeros_like(up), top=top, ytop=ilm_now,
                 ybot=rpe_now + 1.0, material=material, shadow=sh,
                 shadow_from=rpe_now + 0.5 * (bm - rpe))
        hl *= g.fit(0.8)  # the material closure sees the shrunken lesion
        gaps.append(g)
    return gaps


_LESIONS = {"NORMAL": lambda rng, an, cfg: [], "DRUSEN": _drusen, "DME": _dme, "CNV": _cnv}


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


# --------------------------------------------------------------------------- dataset writer


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder and os.replace, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _quota(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions."""
    raw = [n * f for f in fractions]
    out = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - out[i], -i), reverse=True)
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def _check_fractions(name: str, values: list[float], count: int) -> None:
    if len(values) != count:
        raise ValueError(f"{name} must have {count} entries, got {len(values)}")
    if any((not math.isfinite(v)) or v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative numbers, got {values!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {sum(values):.6g}")


def write_phantom(
    root: str | Path,
    n: int,
    *,
    seed: int = 0,
    config: PhantomConfig = PhantomConfig(),
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    class_fractions: dict[str, float] | None = None,
    scans_per_patient: tuple[int, int] = (1, 3),
    progress: bool = False,
) -> Path:
    """Write n scans in the OCT2017 layout (split by patient) with lesion masks; return root.

    Images go to ``root/{split}/{CLASS}/{CLASS}-{patient}-{k}.jpeg``, masks (255 =
    lesion) to ``root/masks/{split}/{CLASS}/...png`` and the settings to
    ``root/phantom.json``. Same seed, same bytes.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(config, PhantomConfig):
        raise ValueError(f"config must be a PhantomConfig, got {type(config).__name__}")
    splits = [float(f) for f in split_fractions]
    _check_fractions("split_fractions", splits, 3)
    if class_fractions is None:
        class_fractions = {"NORMAL": 0.5, "CNV": 0.5 / 3, "DME": 0.5 / 3, "DRUSEN": 0.5 / 3}
    unknown = sorted(set(class_fractions) - set(CLASSES))
    if unknown:
        raise ValueError(f"class_fractions has unknown classes {unknown}; valid: {', '.join(CLASSES)}")
    cf = [float(class_fractions.get(c, 0.0)) for c in CLASSES]
    _check_fractions("class_fractions", cf, len(CLASSES))
    lo, hi = (int(v) for v in scans_per_patient)
    if not 1 <= lo <= hi:
        raise ValueError(f"scans_per_patient must be (low, high) with 1 <= low <= high, got {scans_per_patient!r}")

    root = Path(root)
    settings = {
        "generator": "medvq.data.phantom",
        "format": 1,
        "seed": int(seed),
        "n": int(n),
        "config": config.model_dump(mode="json"),
        "split_fractions": splits,
        "class_fractions": dict(zip(CLASSES, cf)),
        "scans_per_patient": [lo, hi],
    }
    meta_path = root / "phantom.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        old.pop("counts", None)
        old.pop("complete", None)
        if old != json.loads(json.dumps(settings)):
            raise FileExistsError(f"{root} already holds a phantom made with other settings; use an empty root")
    elif root.exists() and any((root / d).exists() for d in (*SPLITS, "masks")):
        raise FileExistsError(f"{root} already holds data without phantom.json; use an empty root")

    plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    # Patients per class, then patients to splits (stratified by class, by scan count).
    scans: list[tuple[str, str, int, int]] = []  # split, class, patient, k
    used_ids: set[int] = set()
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    for cls, quota in zip(CLASSES, _quota(n, cf)):
        patients = []
        left = quota
        while left > 0:
            k = min(left, int(plan_rng.integers(lo, hi + 1)))
            pid = int(plan_rng.integers(10_000, 10_000_000))
            while pid in used_ids:
                pid = int(plan_rng.integers(10_000, 10_000_000))
            used_ids.add(pid)
            patients.append((pid, k))
            left -= k
        order = plan_rng.permutation(len(patients))
        target = [quota * f for f in splits]
        filled = [0, 0, 0]
        for j in order:
            pid, k = patients[j]
            deficit = [target[i] - filled[i] - 0.5 * k if splits[i] > 0 else -math.inf for i in range(3)]
            si = int(np.argmax(deficit))
            filled[si] += k
            counts[SPLITS[si]][cls] += k
            scans.extend((SPLITS[si], cls, pid, kk) for kk in range(1, k + 1))

    meta = dict(settings, counts=counts, complete=False)
    _atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    for split in SPLITS:
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / cls).mkdir(parents=True, exist_ok=True)

    for i, (split, cls, pid, k) in enumerate(scans):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), pid, k]))
        img, mask = make_scan(cls, rng, config)
        name = f"{cls}-{pid}-{k}"
        im = Image.fromarray(img)
        mk = Image.fromarray(mask.astype(np.uint8) * 255)
        _atomic_write(root / split / cls / f"{name}.jpeg",
                      lambda p, im=im: im.save(p, format="JPEG", quality=config.jpeg_quality))
        _atomic_write(root / "masks" / split / cls / f"{name}.png", lambda p, mk=mk: mk.save(p, format="PNG"))
        if progress and (i + 1 == len(scans) or (i + 1) % max(1, len(scans) // 20) == 0):
            print(f"phantom: {i + 1}/{len(scans)} scans", file=sys.stderr, flush=True)

    meta["complete"] = True
    _atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    return root
