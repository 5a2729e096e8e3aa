"""A curved, layered retina with a foveal pit, vessel shadows and choroid texture: the scan without lesions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medvq.data.phantom.config import _REF_H, _REF_W, PhantomConfig


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


