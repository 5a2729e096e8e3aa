"""Lesions drawn by inserting material into the tissue and displacing the layers around it: drusen, DME cysts, CNV with subretinal fluid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from medvq.data.phantom.anatomy import _Anatomy, _ramp, _smooth1d, _Tex
from medvq.data.phantom.config import LABEL_CNV, LABEL_DRUSEN, LABEL_FLUID, LABEL_FOCUS, PhantomConfig


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

